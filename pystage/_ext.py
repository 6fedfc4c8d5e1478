"""Load the compiled extension: ``pystage._C`` always, ``pystage._C_cuda`` when built.

Importing registers the ``torch.ops.pystage.*`` kernels. A CUDA extension that
cannot load (no driver, a mismatched torch) is reported once as a warning and
the package keeps working on CPU.
"""
from __future__ import annotations

import importlib
import logging
import warnings

import torch  # noqa: F401  (loads libtorch before the extension)

log = logging.getLogger(__name__)

try:
    from pystage import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pystage: the compiled extension pystage._C is missing or does not load "
        f"({exc}). Reinstall with `pip install --no-build-isolation .` in an environment "
        "that has the torch you run with."
    ) from exc


def _load_cuda() -> bool:
    try:
        importlib.import_module("pystage._C_cuda")
    except ModuleNotFoundError:
        return False  # built without CUDA: CPU kernels only
    except (ImportError, OSError) as exc:
        warnings.warn(f"pystage: CUDA kernels built but not loadable ({exc}); CUDA tensors will not run masked ops",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


HAS_CUDA_KERNELS = _load_cuda()
