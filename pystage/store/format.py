"""The on-disk format of one entry (docs/store-format.md): names, dtypes, chunking, metadata checks."""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import h5py
import numpy as np
import torch

from pystage.store.errors import StoreArgumentError, StoreCorruptError, StoreVersionError

FORMAT_NAME = "pystage-feature-store"
FORMAT_VERSION = 1
FEATURES, LABELS, CHECKSUMS = "features", "labels", "checksums"
SUFFIX = ".h5"
CHUNK_BYTES = 1 << 20  # target chunk size: whole rows, at most 1 MiB (at least 512 KiB unless a row is larger)

# torch dtype of the features -> numpy dtype on disk; bfloat16 has no numpy dtype: its raw bits go in uint16
_STORAGE = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"), torch.float64: np.dtype("<f8"),
            torch.bfloat16: np.dtype("<u2")}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "bfloat16": torch.bfloat16}
_REQUIRED_ATTRS = ("format", "format_version", "key", "num_rows", "feature_shape", "feature_dtype",
                   "label_shape", "chunk_rows", "checksum", "complete")


def storage_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that stores features of ``dtype`` (bfloat16 -> uint16 raw bits)."""
    if dtype not in _STORAGE:
        raise StoreArgumentError("storage_dtype", dtype, f"one of {', '.join(map(str, _STORAGE))}")
    return _STORAGE[dtype]


def label_storage_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype that stores labels of ``dtype`` (any numeric dtype numpy has)."""
    if dtype == torch.bfloat16 or dtype.is_complex:
        raise StoreArgumentError("label dtype", dtype, "an integer, bool or float dtype other than bfloat16")
    return torch.empty(0, dtype=dtype).numpy().dtype.newbyteorder("<")


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    return _TORCH[name]


def chunk_rows_for(row_bytes: int) -> int:
    """Rows per HDF5 chunk: as many whole rows as fit in CHUNK_BYTES, at least one."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def chunk_checksum(features: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    """CRC-32 of one chunk's feature bytes and of its label bytes."""
    return zlib.crc32(memoryview(np.ascontiguousarray(features)).cast("B")), \
        zlib.crc32(memoryview(np.ascontiguousarray(labels)).cast("B"))


def entry_path(directory: str, key: str) -> str:
    return os.path.join(directory, key + SUFFIX)


@dataclass(frozen=True)
class EntryMeta:
    """What an entry's metadata says, after validation."""

    path: str
    key: str
    num_rows: int
    feature_shape: tuple[int, ...]
    dtype: torch.dtype  # features as served
    stored_dtype: np.dtype  # features on disk
    label_shape: tuple[int, ...]
    label_dtype: np.dtype
    chunk_rows: int
    attrs: dict[str, Any] = field(repr=False)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.feature_shape, dtype=np.int64)) * self.stored_dtype.itemsize

    @property
    def label_row_bytes(self) -> int:
        return int(np.prod(self.label_shape, dtype=np.int64)) * self.label_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.num_rows * (self.row_bytes + self.label_row_bytes)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_rows // self.chunk_rows)


def attr_value(v: Any) -> Any:
    """HDF5 attribute -> plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray):
        return [attr_value(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_meta(path: str, key: Optional[str] = None) -> EntryMeta:
    """Open ``path``, check its structure and metadata (not the checksums), and return them; StoreCorruptError if bad."""
    try:
        with h5py.File(path, "r") as f:
            return _validate(f, path, key)
    except StoreCorruptError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise StoreCorruptError(path, "HDF5 structure", "a complete, readable HDF5 file", f"{type(e).__name__}: {e}") from None


def _validate(f: h5py.File, path: str, key: Optional[str]) -> EntryMeta:
    attrs = {k: attr_value(v) for k, v in f.attrs.items()}
    missing = [a for a in _REQUIRED_ATTRS if a not in attrs]
    if attrs.get("format") != FORMAT_NAME:
        raise StoreCorruptError(path, "attribute 'format'", repr(FORMAT_NAME), attrs.get("format"))
    if "format_version" in attrs and attrs["format_version"] != FORMAT_VERSION:
        raise StoreVersionError(path, attrs["format_version"], FORMAT_VERSION)
    if missing:
        raise StoreCorruptError(path, "metadata attributes", f"all of {list(_REQUIRED_ATTRS)}", f"missing {missing}")
    if key is not None and attrs["key"] != key:
        raise StoreCorruptError(path, "attribute 'key'", repr(key), attrs["key"])
    if attrs["complete"] is not True:
        raise StoreCorruptError(path, "attribute 'complete'", True, attrs["complete"])
    if attrs["feature_dtype"] not in _TORCH:
        raise StoreCorruptError(path, "attribute 'feature_dtype'", f"one of {list(_TORCH)}", attrs["feature_dtype"])
    for name in (FEATURES, LABELS, CHECKSUMS):
        if not isinstance(f.get(name), h5py.Dataset):
            raise StoreCorruptError(path, f"dataset '/{name}'", "present", "missing")
    n, chunk_rows = attrs["num_rows"], attrs["chunk_rows"]
    dtype = _TORCH[attrs["feature_dtype"]]
    x, y, c = f[FEATURES], f[LABELS], f[CHECKSUMS]
    fshape, lshape = tuple(attrs["feature_shape"]), tuple(attrs["label_shape"])
    checks = [("shape of '/features'", x.shape, (n, *fshape)), ("dtype of '/features'", x.dtype, _STORAGE[dtype]),
              ("shape of '/labels'", y.shape, (n, *lshape)),
              ("chunks of '/features'", x.chunks, (chunk_rows, *fshape) if n else x.chunks),
              ("filters of '/features'", x.compression, None),
              ("shape of '/checksums'", c.shape, (-(-n // chunk_rows), 2))]
    for what, got, expected in checks:
        if got != expected:
            raise StoreCorruptError(path, what, expected, got)
    stored = x.id.get_storage_size() + y.id.get_storage_size()
    size = os.path.getsize(path)
    if stored > size:
        raise StoreCorruptError(path, "file size", f">= {stored} bytes (the datasets' storage)", size)
    return EntryMeta(path=path, key=attrs["key"], num_rows=n, feature_shape=fshape, dtype=dtype,
                     stored_dtype=x.dtype, label_shape=lshape, label_dtype=y.dtype, chunk_rows=chunk_rows, attrs=attrs)


def decode_json_attr(attrs: dict[str, Any], name: str) -> Any:
    """A JSON-encoded attribute (``shard``, ``extra``), or None when absent."""
    v = attrs.get(name)
    return None if v is None else json.loads(v)
