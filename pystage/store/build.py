"""Build one entry: a single no-grad forward pass of a frozen stage; its rows go to a writer thread (a temporary
HDF5 file, renamed into place once complete) and, when the entry fits the device budget, stay in memory (sink.py)."""
from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm import tqdm

from pystage.store.chunkfile import STAGING_BYTES  # passed on when a build starts (tests shrink it)
from pystage.store.errors import StoreArgumentError
from pystage.store.format import CHUNK_BYTES, FORMAT_NAME, FORMAT_VERSION, entry_path
from pystage.store.keys import dtype_name
from pystage.store.sink import Built, Sink

log = logging.getLogger(__name__)
PARTIAL = ".partial-"  # temporary files: <key>.h5.partial-<pid>-<random>


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
    memory_budget: int = 0  # bytes of features that may stay in memory on the build device (memory.py)
    disk_copy: str = "wait"  # of an entry kept in memory: "background", "wait" (before build returns), "never"


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


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(dtype)  # raw bits
    return t.numpy().astype(dtype, copy=False)


def _input_dtype(module: nn.Module) -> Optional[torch.dtype]:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def build_entry(directory: str, module: nn.Module, data: Any, spec: BuildSpec, lock: Any = None,
                on_publish: Optional[Callable[[], None]] = None) -> Built:
    """Run ``module`` once over ``data`` into ``<directory>/<key>.h5`` (and, if it fits ``spec.memory_budget``,
    into memory on the build device). ``lock``: the key's lock, released once the entry is published or the
    build failed (by the writer thread when the disk copy is written in the background)."""
    if not isinstance(module, nn.Module):
        _release(lock)
        raise StoreArgumentError("module", type(module).__name__, "a torch.nn.Module")
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        _release(lock)
        raise StoreArgumentError("batch_size", spec.batch_size, "a positive int")
    final = entry_path(directory, spec.key)
    tmp = f"{final}{PARTIAL}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    device = torch.device(spec.device)
    sink: Optional[Sink] = None
    t0, calls, was_training = time.perf_counter(), 0, module.training
    module.eval()
    bar = None
    try:
        batches, expected_rows, (start, stop), source_rows = _batches(data, spec)
        bar = tqdm(total=expected_rows, unit="row", desc=f"store {spec.key[:8]}", disable=not spec.progress, leave=False)
        with torch.no_grad():
            for i, item in enumerate(batches):
                out, y = _forward(module, item, i, device)
                calls += 1
                if sink is None:
                    sink = Sink.open(directory, tmp, final, spec, out, y, expected_rows, device, _numpy, lock, on_publish,
                                     STAGING_BYTES)
                sink.add(i, out.to(sink.stored), y, _numpy)
                bar.update(len(out))
        if sink is None:
            raise StoreArgumentError("data", "0 rows", "at least one row")
        attrs = _attrs(spec, module, sink, device, calls, time.perf_counter() - t0, source_rows)
        built = sink.close(attrs, start, final, spec.key, wait=spec.disk_copy == "wait")
    except BaseException:
        if sink is not None:
            sink.abort()  # the writer thread removes the temporary file and releases the lock
        else:
            _release(lock)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
        module.train(was_training)
    log.info("built %s: %d rows in %d forward calls, %.1f s%s", final, sink.rows, calls, time.perf_counter() - t0,
             "" if built.writer is None else " (disk copy still being written)")
    return built


def _forward(module: nn.Module, item: Any, i: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features ``(B, *feature_shape)``, labels) of batch ``i``."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise StoreArgumentError(f"data batch {i}", type(item).__name__, "a pair (x, y)")
    x, y = item
    x = x.to(device, non_blocking=True)
    in_dtype = _input_dtype(module)
    if in_dtype is not None and x.is_floating_point():
        x = x.to(in_dtype)
    if device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)  # oneDNN's convolutions run ~2x faster on NHWC here
    out = module(x)  # (B, *feature_shape)
    y = torch.as_tensor(y)
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != x.shape[0] or len(y) != len(out):
        raise StoreArgumentError(f"module output for batch {i}", getattr(out, "shape", type(out).__name__),
                                 f"a tensor with {x.shape[0]} rows and as many labels, got {len(y)} labels")
    return out, y


def _numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return _to_numpy(t, dtype)  # looked up when called: what the stored bytes are made with


def _release(lock: Any) -> None:
    if lock is not None:
        lock.release()


def _attrs(spec: BuildSpec, module: nn.Module, sink: Sink, device: torch.device, calls: int, seconds: float,
           source_rows: Optional[int]) -> dict[str, Any]:
    import pystage

    info = dict(spec.info or {})
    fshape = sink.memory.x.shape[1:] if sink.memory is not None else sink.writer.file.xs.shape[1:]  # type: ignore[union-attr]
    lshape = sink.memory.y.shape[1:] if sink.memory is not None else sink.writer.file.ys.shape[1:]  # type: ignore[union-attr]
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "key": spec.key,
        "feature_shape": np.asarray(fshape, dtype=np.int64), "feature_dtype": dtype_name(sink.stored),
        "stored_dtype": sink.fdtype.str, "bfloat16_as_uint16": sink.stored == torch.bfloat16,
        "label_shape": np.asarray(lshape, dtype=np.int64), "label_dtype": sink.ldtype.str,
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
