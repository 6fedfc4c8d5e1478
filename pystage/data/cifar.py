"""CIFAR-10 from the standard python-pickle folder (``cifar-10-batches-py``).

Pixels are scaled to [0, 1], then standardised per channel with the fixed
CIFAR-10 *training-set* statistics ``CIFAR10_MEAN`` / ``CIFAR10_STD`` (mean and
std over all training pixels of each channel), for both splits: no statistics
are computed from the test split, and a subset normalises like the full set.
The pickles are read with an unpickler that only admits numpy arrays.
"""
from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from pystage.data.base import DataError, MissingDataError, TensorData, standardize

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles builtins and numpy arrays; refuses any other global (a pickle can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _folder(path: Union[str, Path]) -> Path:
    """``path`` itself or its ``cifar-10-batches-py`` child, whichever holds the batches."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise MissingDataError(f"CIFAR-10 path {p} is a file; expected the folder cifar-10-batches-py (or its parent) "
                               f"holding data_batch_1..5 and test_batch")
    sub = p / "cifar-10-batches-py"
    return sub if not (p / "test_batch").exists() and sub.is_dir() else p


def _load_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data (N, 3072) uint8, labels (N,) int64)`` of one batch file."""
    try:
        with open(file, "rb") as f:
            d = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{file}: cannot read the CIFAR-10 batch ({type(e).__name__}: {e})") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as e:
        raise DataError(f"{file}: not a CIFAR-10 python pickle batch ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{file}: expected a dict with keys b'data' and b'labels', got {keys}")
    data, labels = np.asarray(d[b"data"]), np.asarray(d[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{file}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DataError(f"{file}: b'labels' must hold {len(data)} labels (one per image), got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{file}: labels must be in [0, 9], got range [{labels.min()}, {labels.max()}]")
    return data, labels


def cifar10(path: Union[str, Path], split: str = "train", normalize: bool = True) -> TensorData:
    """CIFAR-10 ``split`` ("train": data_batch_1..5, "test": test_batch) from the folder ``path``."""
    if split not in FILES:
        raise DataError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = _folder(path)
    missing = [name for name in FILES[split] if not (folder / name).is_file()]
    if missing:
        raise MissingDataError(f"CIFAR-10 folder {folder} lacks {', '.join(missing)}; expected the python version "
                               f"(cifar-10-batches-py) with {', '.join(FILES['train'] + FILES['test'])}")
    batches = [_load_batch(folder / name) for name in FILES[split]]
    data = np.concatenate([b[0] for b in batches])  # (N, 3072): 1024 R, 1024 G, 1024 B, row-major
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)  # (N, 3, 32, 32) in [0, 1]
    if normalize:
        standardize(x, CIFAR10_MEAN, CIFAR10_STD)
    y = torch.from_numpy(np.concatenate([b[1] for b in batches]))  # (N,)
    logger.info("loaded CIFAR-10 %s: %d images from %s", split, len(y), folder)
    return TensorData(x, y, num_classes=10, classes=CIFAR10_CLASSES, name=f"cifar10-{split}")
