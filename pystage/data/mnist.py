"""MNIST (or any IDX-format image set, e.g. Fashion-MNIST) from IDX files, plain or ``.gz``.

Pixels are scaled to [0, 1], then standardised with the MNIST training-set
mean and std (``MNIST_MEAN``, ``MNIST_STD``) for both splits. Images are
``(1, 28, 28)``.
"""
from __future__ import annotations

import gzip
import logging
from pathlib import Path
from typing import Union

import numpy as np
import torch

from pystage.data.base import DataError, MissingDataError, TensorData, standardize

logger = logging.getLogger(__name__)

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: uint8, 3 dims; 0x00000801: uint8, 1 dim


def _find(folder: Path, stem: str) -> Path:
    """``folder/stem`` (or the ``.``-separated spelling), plain or ``.gz``, also under ``MNIST/raw``."""
    names = [stem, stem.replace("-idx", ".idx")]
    for d in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for name in names:
            for candidate in (d / name, d / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    raise MissingDataError(f"MNIST folder {folder} lacks {stem} (or {stem}.gz); expected train-images-idx3-ubyte, "
                           f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


def read_idx(file: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file, after checking its magic number and its size against its header."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rb") as f:  # type: ignore[operator]
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{file}: cannot read ({type(e).__name__}: {e})") from e
    if len(raw) < 8:
        raise DataError(f"{file}: too short for an IDX header ({len(raw)} bytes)")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(f"{file}: bad IDX magic number {got:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        what = "truncated IDX file" if len(raw) < expected else "IDX file longer than its header says"
        raise DataError(f"{file}: {what}: size {len(raw)} bytes does not match its header {dims} "
                        f"(expected {expected} bytes)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def mnist(path: Union[str, Path], split: str = "train", normalize: bool = True) -> TensorData:
    """MNIST ``split`` ("train" or "test") from the IDX files in the folder ``path``."""
    if split not in PREFIX:
        raise DataError(f"split must be one of {sorted(PREFIX)}, got {split!r}")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise MissingDataError(f"MNIST path {folder} is a file; expected the folder holding the IDX files "
                               f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                               f"t10k-labels-idx1-ubyte (plain or .gz)")
    images = read_idx(_find(folder, f"{PREFIX[split]}-images-idx3-ubyte"), IMAGES_MAGIC)  # (N, H, W)
    labels = read_idx(_find(folder, f"{PREFIX[split]}-labels-idx1-ubyte"), LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise DataError(f"MNIST {split} in {folder}: {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise DataError(f"MNIST {split} in {folder}: labels must be in [0, 9], got max {labels.max()}")
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)  # (N, 1, H, W) in [0, 1]
    if normalize:
        standardize(x, MNIST_MEAN, MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    logger.info("loaded MNIST %s: %d images from %s", split, len(y), folder)
    return TensorData(x, y, num_classes=10, name=f"mnist-{split}")
