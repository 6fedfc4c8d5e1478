"""Build one entry: a single no-grad forward pass of a frozen stage, streamed into a temporary HDF5 file, then renamed."""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from pystage.store.errors import StoreArgumentError, StoreDiskFullError
from pystage.store.format import (CHECKSUMS, CHUNK_BYTES, FEATURES, FORMAT_NAME, FORMAT_VERSION, LABELS,
                                  chunk_checksum, chunk_rows_for, entry_path, label_storage_dtype, storage_dtype)
from pystage.store.keys import dtype_name

log = logging.getLogger(__name__)
PARTIAL = ".partial-"  # temporary files: <key>.h5.partial-<pid>-<random>
STAGING_BYTES = 8 << 20  # rows gathered before each write: whole chunks


@dataclass
class BuildSpec:
    """Everything one build needs besides the module and the data."""

    key: str
    batch_size: int = 256
    device: str = "cpu"
    storage_dtype: Optional[torch.dtype] = None  # None: the module's output dtype
    shard: Optional[tuple[int, int]] = None
    progress: bool = True
    info: Optional[dict[str, Any]] = None  # upstream, split, transforms, extra: recorded in the metadata


def shard_range(num_rows: int, shard: Optional[tuple[int, int]]) -> tuple[int, int]:
    """Contiguous rows ``[start, stop)`` of shard ``(index, count)``: ``index * n // count`` to ``(index + 1) * n // count``."""
    if shard is None:
        return 0, num_rows
    index, count = shard
    return index * num_rows // count, (index + 1) * num_rows // count


def remove_partials(directory: str, key: str) -> list[str]:
    """Delete temporary files of ``key`` left by a killed build (call with the key's lock held)."""
    paths = glob.glob(glob.escape(entry_path(directory, key)) + PARTIAL + "*")
    for p in paths:
        log.warning("removing %s: left by a build that did not finish", p)
        os.remove(p)
    return paths


def _batches(data: Any, spec: BuildSpec) -> tuple[Iterator[Any], Optional[int], tuple[int, int], Optional[int]]:
    """(batch iterator, rows to expect, row range in the source, source rows) for a Dataset, DataLoader or StoreEntry."""
    from pystage.store.entry import StoreEntry  # entry imports stream; build needs it only here

    if isinstance(data, StoreEntry):
        start, stop = shard_range(data.num_rows, spec.shard)
        return data.iter_rows(start, stop, spec.batch_size), stop - start, (start, stop), data.num_rows
    if isinstance(data, DataLoader):
        if spec.shard is None:
            n = len(data.dataset) if hasattr(data.dataset, "__len__") else None  # type: ignore[arg-type]
            return iter(data), n, (0, n if n is not None else -1), n
        if isinstance(data.dataset, IterableDataset):
            raise StoreArgumentError("data", "a DataLoader over an IterableDataset", "a map-style dataset when shard is set")
        n = len(data.dataset)  # type: ignore[arg-type]
        start, stop = shard_range(n, spec.shard)
        loader = DataLoader(Subset(data.dataset, range(start, stop)), batch_size=data.batch_size,
                            num_workers=data.num_workers, collate_fn=data.collate_fn, pin_memory=data.pin_memory)
        return iter(loader), stop - start, (start, stop), n
    if isinstance(data, Dataset):
        if isinstance(data, IterableDataset):
            return _batches(DataLoader(data, batch_size=spec.batch_size), spec)
        n = len(data)  # type: ignore[arg-type]
        start, stop = shard_range(n, spec.shard)
        ds = data if (start, stop) == (0, n) else Subset(data, range(start, stop))
        return iter(DataLoader(ds, batch_size=spec.batch_size)), stop - start, (start, stop), n
    raise StoreArgumentError("data", type(data).__name__, "a torch Dataset or DataLoader yielding (x, y), or a StoreEntry")


class _Writer:
    """Appends rows to '/features' and '/labels' of a temporary file in whole chunks, with a CRC per chunk."""

    def __init__(self, path: str, feature_shape: tuple[int, ...], fdtype: np.dtype, label_shape: tuple[int, ...],
                 ldtype: np.dtype) -> None:
        self.path, self.rows, self.crcs = path, 0, []
        row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * fdtype.itemsize
        self.chunk_rows = chunk_rows_for(row_bytes)
        self.stage_rows = self.chunk_rows * max(1, STAGING_BYTES // (self.chunk_rows * max(row_bytes, 1)))
        self.f = h5py.File(path, "w")
        self.x = self.f.create_dataset(FEATURES, shape=(0, *feature_shape), maxshape=(None, *feature_shape),
                                       chunks=(self.chunk_rows, *feature_shape), dtype=fdtype)
        self.y = self.f.create_dataset(LABELS, shape=(0, *label_shape), maxshape=(None, *label_shape),
                                       chunks=(self.chunk_rows, *label_shape), dtype=ldtype)
        self.xs = np.empty((self.stage_rows, *feature_shape), fdtype)  # (S, *feature_shape) staging
        self.ys = np.empty((self.stage_rows, *label_shape), ldtype)  # (S, *label_shape)
        self.fill = 0

    def append(self, x: np.ndarray, y: np.ndarray) -> None:
        pos = 0
        while pos < len(x):
            n = min(len(x) - pos, self.stage_rows - self.fill)
            self.xs[self.fill:self.fill + n] = x[pos:pos + n]
            self.ys[self.fill:self.fill + n] = y[pos:pos + n]
            self.fill, pos = self.fill + n, pos + n
            if self.fill == self.stage_rows:
                self._flush()

    def _flush(self) -> None:
        n, a = self.fill, self.rows
        if n == 0:
            return
        self.x.resize(a + n, axis=0)
        self.y.resize(a + n, axis=0)
        self.x.write_direct(self.xs, np.s_[0:n], np.s_[a:a + n])
        self.y.write_direct(self.ys, np.s_[0:n], np.s_[a:a + n])
        for s in range(0, n, self.chunk_rows):
            self.crcs.append(chunk_checksum(self.xs[s:s + self.chunk_rows][: n - s], self.ys[s:s + self.chunk_rows][: n - s]))
        self.rows, self.fill = a + n, 0

    def finish(self, attrs: dict[str, Any], row_start: int) -> None:
        """Write the last rows, the checksums and the metadata; flush, fsync and close."""
        self._flush()
        attrs["row_range"] = np.asarray([row_start, row_start + self.rows], dtype=np.int64)
        self.f.create_dataset(CHECKSUMS, data=np.asarray(self.crcs, dtype="<u4").reshape(-1, 2))
        for k, v in attrs.items():
            self.f.attrs[k] = v
        self.f.attrs["chunk_rows"] = self.chunk_rows
        self.f.attrs["num_rows"] = self.rows
        self.f.attrs["complete"] = True  # last attribute written
        self.f.flush()
        self.f.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left" in str(e) or "errno = 28" in str(e))


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)  # raw bits
    return t.numpy().astype(dtype, copy=False)


def _input_dtype(module: nn.Module) -> Optional[torch.dtype]:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def build_entry(directory: str, module: nn.Module, data: Any, spec: BuildSpec) -> str:
    """Run ``module`` once over ``data`` and publish the features as ``<directory>/<key>.h5``; returns the path."""
    if not isinstance(module, nn.Module):
        raise StoreArgumentError("module", type(module).__name__, "a torch.nn.Module")
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise StoreArgumentError("batch_size", spec.batch_size, "a positive int")
    final = entry_path(directory, spec.key)
    tmp = f"{final}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    batches, expected_rows, (start, stop), source_rows = _batches(data, spec)
    device, in_dtype = torch.device(spec.device), _input_dtype(module)
    writer: Optional[_Writer] = None
    t0, calls, was_training = time.perf_counter(), 0, module.training
    module.eval()
    bar = tqdm(total=expected_rows, unit="row", desc=f"store {spec.key[:8]}", disable=not spec.progress, leave=False)
    try:
        with torch.no_grad():
            for i, item in enumerate(batches):
                if not isinstance(item, (tuple, list)) or len(item) != 2:
                    raise StoreArgumentError(f"data batch {i}", type(item).__name__, "a pair (x, y)")
                x, y = item
                x = x.to(device, non_blocking=True)
                if in_dtype is not None and x.is_floating_point():
                    x = x.to(in_dtype)
                out = module(x)  # (B, *feature_shape)
                calls += 1
                y = torch.as_tensor(y)
                if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0] or len(y) != len(out):
                    raise StoreArgumentError(f"module output for batch {i}", getattr(out, "shape", type(out).__name__),
                                             f"a tensor with {x.shape[0]} rows and as many labels, got {len(y)} labels")
                if writer is None:
                    fdtype = storage_dtype(spec.storage_dtype or out.dtype)
                    writer = _Writer(tmp, tuple(out.shape[1:]), fdtype, tuple(y.shape[1:]), label_storage_dtype(y.dtype))
                    _check_space(directory, tmp, expected_rows, out, y)
                    stored = spec.storage_dtype or out.dtype
                cast = out.to(stored)
                if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
                    raise StoreArgumentError(f"module output for batch {i} in {stored}", "non-finite values (NaN, "
                                             "inf, or beyond the storage dtype's range)",
                                             "finite features: non-finite features are never stored")
                writer.append(_to_numpy(cast, writer.x.dtype), _to_numpy(y, writer.y.dtype))
                bar.update(len(out))
        if writer is None:
            raise StoreArgumentError("data", "0 rows", "at least one row")
        attrs = _attrs(spec, module, stored, writer, device, calls, time.perf_counter() - t0, source_rows)
        writer.finish(attrs, start)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException as e:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        if _is_enospc(e) and not isinstance(e, StoreDiskFullError):
            raise StoreDiskFullError(tmp, str(e)) from e
        raise
    finally:
        bar.close()
        module.train(was_training)
    log.info("built %s: %d rows in %d forward calls, %.1f s", final, writer.rows, calls, time.perf_counter() - t0)
    return final


def _check_space(directory: str, tmp: str, rows: Optional[int], out: torch.Tensor, y: torch.Tensor) -> None:
    """Fail before writing when the entry cannot fit on the disk."""
    if rows is None:
        return
    row = out[0].numel() * out.element_size() + y[0].numel() * y.element_size()
    needed, free = rows * row, shutil.disk_usage(directory).free
    if needed > free:
        raise StoreDiskFullError(tmp, "not enough free space for the entry", needed, free)


def _attrs(spec: BuildSpec, module: nn.Module, stored: torch.dtype, w: _Writer, device: torch.device, calls: int,
           seconds: float, source_rows: Optional[int]) -> dict[str, Any]:
    import pystage

    info = dict(spec.info or {})
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "key": spec.key,
        "feature_shape": np.asarray(w.x.shape[1:], dtype=np.int64), "feature_dtype": dtype_name(stored),
        "stored_dtype": w.x.dtype.str, "bfloat16_as_uint16": stored == torch.bfloat16,
        "label_shape": np.asarray(w.y.shape[1:], dtype=np.int64), "label_dtype": w.y.dtype.str,
        "checksum": "crc32", "checksum_layout": "one row per chunk: [crc32(feature bytes), crc32(label bytes)]",
        "upstream": info.get("upstream", ""), "split": info.get("split", ""), "transforms": info.get("transforms", ""),
        "module_digest": info.get("module_digest", ""), "shard": json.dumps(spec.shard), "extra": json.dumps(info.get("extra")),
        "source_rows": -1 if source_rows is None else source_rows,
        "module": repr(module)[:4096], "forward_calls": calls, "batch_size": spec.batch_size, "device": str(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "created_unix": time.time(),
        "build_seconds": seconds, "host": socket.gethostname(), "pid": os.getpid(),
        "pystage_version": getattr(pystage, "__version__", ""), "torch_version": str(torch.__version__),
        "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version,
        "chunk_bytes_target": CHUNK_BYTES,
    }
