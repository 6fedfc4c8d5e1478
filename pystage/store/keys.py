"""Content-addressed keys: dataset fingerprints and stage keys (hash of upstream, architecture, weights, options)."""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pystage.store.errors import StoreArgumentError

KEY_VERSION = 1  # bump when what goes into a key changes: old keys then simply miss
_KEY_PATTERN = re.compile(r"^[0-9a-f]{32}$")
_DIGEST = 16  # bytes -> 32 hex characters


def _hasher() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=_DIGEST)


def _update_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    """Hash a tensor's raw bytes (any dtype, bfloat16 included) in row-major order."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel():
        h.update(t.view(torch.uint8).numpy().data)


def _as_tensor(v: Any, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (np.ndarray, np.generic, int, float, bool)):
        return torch.as_tensor(np.asarray(v))
    raise StoreArgumentError(name, type(v).__name__, "a tensor, numpy array or number")


class _Column:
    """Running hash of one column (inputs or labels): dtype, row shape and every row's bytes."""

    def __init__(self, name: str) -> None:
        self.name, self.h, self.rows, self.row_shape, self.dtype = name, _hasher(), 0, None, None

    def add(self, t: torch.Tensor, rows: int) -> None:
        shape, dtype = tuple(t.shape[1:]), t.dtype  # t: (rows, *row_shape)
        if self.row_shape is None:
            self.row_shape, self.dtype = shape, dtype
        elif (shape, dtype) != (self.row_shape, self.dtype):
            raise StoreArgumentError(f"dataset {self.name} row {self.rows}", (shape, str(dtype)),
                                     f"every row of shape {self.row_shape} and dtype {self.dtype}")
        _update_tensor(self.h, t)
        self.rows += rows

    def digest(self) -> str:
        return f"{self.name}:{self.rows}:{self.row_shape}:{self.dtype}:{self.h.hexdigest()}"


def _finish(columns: Sequence[_Column]) -> str:
    h = _hasher()
    h.update(f"pystage-dataset-v{KEY_VERSION}".encode())
    for c in columns:
        h.update(c.digest().encode())
    return h.hexdigest()


def _column_of(array: Any, name: str) -> _Column:
    t = _as_tensor(array, name)
    if t.dim() == 0:
        raise StoreArgumentError(name, tuple(t.shape), "an array with a leading row dimension")
    c = _Column(name)
    c.row_shape, c.dtype = tuple(t.shape[1:]), t.dtype
    _update_tensor(c.h, t)
    c.rows = t.shape[0]
    return c


def dataset_fingerprint(dataset: Any) -> str:
    """Hash of a dataset's input and label bytes (a torch Dataset of (x, y), a TensorDataset, or (X, y) arrays).

    Same rows in the same order give the same fingerprint whatever the container: a TensorDataset,
    a tuple of numpy arrays and a Dataset yielding the same rows one by one all hash alike. In-memory
    tensors are hashed in one pass over their bytes; other datasets are iterated row by row.
    """
    if isinstance(dataset, torch.utils.data.TensorDataset):
        arrays: Optional[Sequence[Any]] = dataset.tensors
    elif isinstance(dataset, (torch.Tensor, np.ndarray)):
        arrays = (dataset,)
    elif isinstance(dataset, (tuple, list)) and dataset and all(isinstance(a, (torch.Tensor, np.ndarray)) for a in dataset):
        arrays = dataset
    else:
        arrays = None
    if arrays is not None:
        if len({len(a) for a in arrays}) != 1:
            raise StoreArgumentError("dataset", [tuple(a.shape) for a in arrays], "arrays with the same number of rows")
        return _finish([_column_of(a, n) for a, n in zip(arrays, ("x", "y", "z", "w"))])
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise StoreArgumentError("dataset", type(dataset).__name__,
                                 "a map-style torch Dataset of (x, y), a TensorDataset, or numpy arrays")
    return _finish(_hash_rows((dataset[i] for i in range(len(dataset)))))


def _hash_rows(items: Iterable[Any]) -> list[_Column]:
    columns: list[_Column] = []
    for i, item in enumerate(items):
        parts = item if isinstance(item, (tuple, list)) else (item,)
        if not columns:
            columns = [_Column(n) for n in ("x", "y", "z", "w")[: len(parts)]]
        if len(parts) != len(columns):
            raise StoreArgumentError(f"dataset[{i}]", f"{len(parts)} parts", f"{len(columns)} parts like dataset[0]")
        for c, p in zip(columns, parts):
            c.add(_as_tensor(p, f"dataset[{i}]").unsqueeze(0), 1)
    return columns


def module_digest(module: nn.Module) -> str:
    """Hash of a module's architecture (repr, parameter/buffer names, shapes, dtypes) and every weight's bytes."""
    if not isinstance(module, nn.Module):
        raise StoreArgumentError("module", type(module).__name__, "a torch.nn.Module")
    tensors = [(f"param:{n}", t) for n, t in module.named_parameters(remove_duplicate=False)]
    tensors += [(f"buffer:{n}", t) for n, t in module.named_buffers(remove_duplicate=False) if t is not None]
    h = _hasher()
    header = {"repr": repr(module), "type": type(module).__qualname__,
              "tensors": [(n, list(t.shape), str(t.dtype)) for n, t in tensors]}
    h.update(json.dumps(header, sort_keys=True).encode())
    for _, t in tensors:
        _update_tensor(h, t)
    return h.hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


def check_shard(shard: Any) -> Optional[tuple[int, int]]:
    """``None`` or a validated ``(index, count)`` pair."""
    if shard is None:
        return None
    ok = (isinstance(shard, (tuple, list)) and len(shard) == 2 and all(isinstance(v, int) for v in shard)
          and shard[1] >= 1 and 0 <= shard[0] < shard[1])
    if not ok:
        raise StoreArgumentError("shard", shard, "None or (index, count) with 0 <= index < count")
    return int(shard[0]), int(shard[1])


def check_key(key: Any) -> str:
    """The key as a plain str, after checking it is 32 lowercase hex digits (so it is a safe file name)."""
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise StoreArgumentError("key", key, "32 lowercase hex digits, as returned by FeatureStore.key()")
    return str.__str__(key)


class StoreKey(str):
    """A key (32 hex digits) that also remembers what it was made from, so build() can check it."""

    upstream: str
    module: str
    dtype: torch.dtype
    transforms: str
    split_name: str  # not 'split': that would hide str.split
    shard: Optional[tuple[int, int]]
    extra: Any

    def __new__(cls, upstream: str, module: nn.Module | str, dtype: torch.dtype = torch.float16,
                transforms: str = "", split: str = "train", shard: Optional[tuple[int, int]] = None,
                extra: Any = None) -> "StoreKey":
        if not isinstance(upstream, str) or not upstream:
            raise StoreArgumentError("upstream", upstream, "a non-empty str: a dataset_fingerprint() or a stage key")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise StoreArgumentError("dtype", dtype, "a floating torch.dtype (float32, float16, bfloat16, float64)")
        for name, v in (("transforms", transforms), ("split", split)):
            if not isinstance(v, str):
                raise StoreArgumentError(name, v, "a str")
        try:
            extra_text = json.dumps(extra, sort_keys=True)
        except (TypeError, ValueError):
            raise StoreArgumentError("extra", extra, "None or a JSON-serialisable value") from None
        digest = module if isinstance(module, str) else module_digest(module)
        shard = check_shard(shard)
        fields = {"v": KEY_VERSION, "upstream": upstream, "module": digest, "dtype": dtype_name(dtype),
                  "transforms": transforms, "split": split, "shard": shard, "extra": extra_text}
        h = _hasher()
        h.update(json.dumps(fields, sort_keys=True).encode())
        self = super().__new__(cls, h.hexdigest())
        self.upstream, self.module, self.dtype, self.transforms = upstream, digest, dtype, transforms
        self.split_name, self.shard, self.extra = split, shard, extra
        return self

    def __reduce__(self) -> Any:
        return (StoreKey, (self.upstream, self.module, self.dtype, self.transforms, self.split_name, self.shard, self.extra))
