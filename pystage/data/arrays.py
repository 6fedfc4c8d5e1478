"""Datasets from arrays and ``.npy`` / ``.npz`` files, any-``Dataset`` adaptation, and the train/val split."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from pystage.data.base import DataError, MissingDataError, TensorData


ArrayLike = Union[np.ndarray, Tensor]
PathLike = Union[str, Path]


def _tensor(a: Any, name: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(a))
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} must be a numpy array or a tensor, got {type(a).__name__}") from e


def numpy_arrays(x: ArrayLike, y: ArrayLike, *, layout: str = "NCHW", num_classes: Optional[int] = None,
                 name: str = "arrays") -> TensorData:
    """A :class:`TensorData` from images ``x`` and integer labels ``y``.

    ``x``: ``(N, C, H, W)`` (``layout="NCHW"``), ``(N, H, W, C)`` (``"NHWC"``) or
    ``(N, H, W)`` (one channel). uint8 is scaled to [0, 1]; floats are kept as they are.
    """
    xt, yt = _tensor(x, "x"), _tensor(y, "y")
    if layout not in ("NCHW", "NHWC"):
        raise DataError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    if xt.dim() == 3:
        xt = xt.unsqueeze(1)  # (N, 1, H, W)
    elif xt.dim() == 4 and layout == "NHWC":
        xt = xt.permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
    elif xt.dim() != 4:
        raise DataError(f"x must have 3 or 4 dimensions ({layout} or (N, H, W)), got shape {tuple(xt.shape)}")
    if xt.dtype == torch.uint8:
        xt = xt.float().div_(255.0)
    elif xt.is_floating_point():
        xt = xt.float()
    else:
        raise DataError(f"x must be uint8 or floating point, got {xt.dtype}")
    if yt.dtype.is_floating_point or yt.dtype == torch.bool or yt.dim() != 1:
        raise DataError(f"y must be a 1-D integer array, got {yt.dtype} of shape {tuple(yt.shape)}")
    return TensorData(xt.contiguous(), yt.long(), num_classes=num_classes, name=name)


def _load_npy(path: Path) -> np.ndarray:
    """The array in the .npy file ``path`` (no pickled objects)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array file, expected numpy's .npy format "
                        f"({type(e).__name__}: {e})") from e


def numpy_file(path: PathLike, y_path: Optional[PathLike] = None, split: Optional[str] = None,
               **kw: Any) -> TensorData:
    """From an ``.npz`` holding ``x_<split>``/``y_<split>`` or ``x``/``y``, or from ``.npy`` files ``path`` and ``y_path``.

    ``kw`` goes to :func:`numpy_arrays` (``layout``, ``num_classes``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingDataError(f"array file {p} not found; expected an .npz with keys x, y (or x_<split>, "
                               f"y_<split>), or an .npy of images plus y_path")
    if p.suffix == ".npy":
        if y_path is None or not Path(y_path).expanduser().is_file():
            raise MissingDataError(f"y_path must name the .npy of labels that goes with {p}, got {y_path!r}")
        return numpy_arrays(_load_npy(p), _load_npy(Path(y_path).expanduser()), name=p.stem, **kw)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = set(z.files)
            for kx, ky in ((f"x_{split}", f"y_{split}"), ("x", "y")):
                if kx in keys and ky in keys:
                    return numpy_arrays(z[kx], z[ky], name=f"{p.stem}-{split}" if split else p.stem, **kw)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{p}: not a readable .npz file, expected a numpy zip archive ({type(e).__name__}: {e})") from e
    want = f"x_{split}/y_{split} or x/y" if split else "x/y"
    raise DataError(f"{p}: expected arrays {want}, got keys {sorted(keys)}")


def as_dataset(obj: Any) -> Dataset:
    """``obj`` as a map-style Dataset: a Dataset is returned as is; ``(x, y)`` arrays and .npz/.npy paths are loaded."""
    if isinstance(obj, Dataset):
        return obj
    if isinstance(obj, (str, Path)):
        return numpy_file(obj)
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return numpy_arrays(obj[0], obj[1])
    raise DataError(f"expected a torch Dataset, an (x, y) pair of arrays or an .npz path, got {type(obj).__name__}")


def train_val_split(dataset: Dataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A deterministic random ``(train, val)`` split; :class:`TensorData` stays ``TensorData``, else ``Subset``."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = round(n * val_fraction)
    if not 0.0 < val_fraction < 1.0 or not 0 < n_val < n:
        raise DataError(f"val_fraction must be in (0, 1) and leave both parts non-empty for {n} samples, "
                        f"got {val_fraction} ({n_val} validation samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (N,)
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    if isinstance(dataset, TensorData):
        return dataset.subset(train_idx), dataset.subset(val_idx)
    return Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
