"""Data sources: every loader returns a Dataset of ``(x: float32 (C, H, W), y: int64 scalar)``.

``get(name, path, split)`` is the CLI's entry point; the loaders live one per module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pystage.data.arrays import as_dataset, numpy_arrays, numpy_file, train_val_split
from pystage.data.base import DataError, MissingDataError, TensorData, standardize
from pystage.data.cifar import CIFAR10_MEAN, CIFAR10_STD, cifar10
from pystage.data.mnist import MNIST_MEAN, MNIST_STD, mnist
from pystage.data.synthetic import SyntheticConfig, synthetic

NAMES = ("synthetic", "cifar10", "mnist", "npz")

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "DataError", "MNIST_MEAN", "MNIST_STD", "MissingDataError", "NAMES",
           "SyntheticConfig", "TensorData", "as_dataset", "cifar10", "get", "mnist", "numpy_arrays", "numpy_file",
           "standardize", "synthetic", "train_val_split"]


def get(name: str, path: Optional[Union[str, Path]] = None, split: str = "train", **kw: Any) -> TensorData:
    """Data set ``name`` (one of ``NAMES``) for ``split``; ``path`` is required for all but "synthetic".

    "synthetic" takes ``n``, ``num_classes``, ``shape``, ``seed`` and the difficulty
    knobs as ``kw``; "npz" reads ``x_<split>``/``y_<split>`` or ``x``/``y`` from ``path``.
    """
    key = name.lower()
    if key not in NAMES:
        raise DataError(f"unknown data set name {name!r}; expected one of {', '.join(NAMES)}")
    if key == "synthetic":
        return synthetic(split=split, **kw)
    if path is None:
        raise DataError(f"data set {name!r} needs path (its folder or file), got None")
    if key == "cifar10":
        return cifar10(path, split, **kw)
    if key == "mnist":
        return mnist(path, split, **kw)
    return numpy_file(path, split=split, **kw)
