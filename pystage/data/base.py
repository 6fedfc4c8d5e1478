"""The in-memory dataset every loader returns (``TensorData``) and the data errors."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from pystage.errors import PystageError


class DataError(PystageError, ValueError):
    """Data that is malformed or inconsistent; the message names the file or argument and what was expected."""


class MissingDataError(DataError, FileNotFoundError):
    """A data file or folder that is not there; the message names the path and the files expected in it."""


class TensorData(TensorDataset):
    """Samples ``(x: float32 (C, H, W), y: int64 scalar)`` held as two tensors in ``.tensors``.

    ``.tensors == (x, y)`` with ``x`` ``(N, C, H, W)`` float32 and ``y`` ``(N,)``
    int64, so later code can fingerprint or slice the whole set at once.
    """

    tensors: tuple[Tensor, Tensor]

    def __init__(self, x: Tensor, y: Tensor, *, num_classes: Optional[int] = None,
                 classes: Optional[Sequence[str]] = None, name: str = "") -> None:
        if x.dim() != 4 or x.dtype != torch.float32:
            raise DataError(f"x must be a float32 (N, C, H, W) tensor, got {x.dtype} of shape {tuple(x.shape)}")
        if y.dim() != 1 or y.dtype != torch.int64:
            raise DataError(f"y must be an int64 (N,) tensor, got {y.dtype} of shape {tuple(y.shape)}")
        if len(x) != len(y):
            raise DataError(f"x and y must have the same length, got {len(x)} samples and {len(y)} labels")
        if num_classes is None:
            num_classes = len(classes) if classes is not None else int(y.max()) + 1 if len(y) else 0
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise DataError(f"labels must be in [0, {num_classes}), got range "
                            f"[{int(y.min())}, {int(y.max())}]")
        super().__init__(x, y)
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        self.name = name

    @property
    def x(self) -> Tensor:
        """Inputs, ``(N, C, H, W)`` float32."""
        return self.tensors[0]

    @property
    def y(self) -> Tensor:
        """Labels, ``(N,)`` int64."""
        return self.tensors[1]

    def subset(self, index: Tensor) -> "TensorData":
        """The samples at ``index`` (a 1-D index tensor), still a ``TensorData``."""
        return TensorData(self.x[index], self.y[index], num_classes=self.num_classes,
                          classes=self.classes, name=self.name)

    def __repr__(self) -> str:
        return (f"TensorData(name={self.name!r}, n={len(self)}, shape={tuple(self.x.shape[1:])}, "
                f"num_classes={self.num_classes})")


def standardize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel, in place; ``x`` is ``(N, C, H, W)``."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)  # (1, C, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if m.shape[1] != x.shape[1] or s.shape[1] != x.shape[1]:
        raise DataError(f"mean and std need one value per channel ({x.shape[1]}), got {len(mean)} and {len(std)}")
    return x.sub_(m).div_(s)
