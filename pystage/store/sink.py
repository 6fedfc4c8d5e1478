"""Where a build's rows go: the writer thread, and, for an entry that fits the device budget, memory on the device.

``Sink.open`` decides, from the first batch: an entry of a known row count whose bytes fit ``memory_budget``
(unsharded) is kept where it is computed (GPU memory, or host RAM for a CPU build) and served from there;
its disk copy is written by the writer thread from that memory, beside whatever runs next
(``disk_copy="background"``), before ``build`` returns (``"wait"``), or not at all (``"never"``: only the
CRC table is computed, for the entry's content digest). Any other entry is written to disk by the writer
thread while the forward pass goes on, and published before ``build`` returns.

On CUDA nothing here waits for the device per batch: rows are handed to the writer with an event, and the
finiteness of every batch is collected on the device and checked once, after the last batch.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from pystage.store.errors import StoreArgumentError, StoreDiskFullError
from pystage.store.format import EntryMeta, attr_value, label_storage_dtype, storage_dtype
from pystage.store.memory import MemoryRows, as_numpy
from pystage.store.writer import EntryWriter

DISK_COPIES = ("auto", "background", "wait", "never")


@dataclass
class Built:
    """What a build made: the path; for an entry kept in memory, its metadata, rows and the writer still at work."""

    path: str
    meta: Optional[EntryMeta] = None
    memory: Optional[MemoryRows] = None
    writer: Optional[EntryWriter] = None


def check_space(directory: str, tmp: str, rows: Optional[int], out: torch.Tensor, y: torch.Tensor) -> None:
    """Fail before writing when the entry cannot fit on the disk."""
    if rows is None:
        return
    row = out[0].numel() * out.element_size() + y[0].numel() * y.element_size()
    needed, free = rows * row, shutil.disk_usage(directory).free
    if needed > free:
        raise StoreDiskFullError(tmp, "not enough free space for the entry", needed, free)


class Sink:
    """Takes each batch's features (already in the storage dtype) and labels, in order."""

    def __init__(self, stored: torch.dtype, y_dtype: torch.dtype, memory: Optional[MemoryRows]) -> None:
        self.stored, self.memory = stored, memory
        self.fdtype, self.ldtype = storage_dtype(stored), label_storage_dtype(y_dtype)
        self.rows, self.flags = 0, []  # type: ignore[var-annotated]
        if memory is not None and memory.device.type == "cpu":
            self.x_np, self.y_np = as_numpy(memory.x), as_numpy(memory.y)
        self.writer: EntryWriter = None  # type: ignore[assignment]

    @classmethod
    def open(cls, directory: str, tmp: str, final: str, spec: Any, out: torch.Tensor, y: torch.Tensor,
             rows: Optional[int], device: torch.device, to_numpy: Callable, lock: Any,
             on_publish: Optional[Callable[[], None]], staging_bytes: int) -> "Sink":
        stored = spec.storage_dtype or out.dtype
        fdtype, ldtype = storage_dtype(stored), label_storage_dtype(y.dtype)
        fshape, lshape = tuple(out.shape[1:]), tuple(y.shape[1:])
        row_bytes = int(np.prod(fshape, dtype=np.int64)) * fdtype.itemsize + \
            int(np.prod(lshape, dtype=np.int64)) * ldtype.itemsize
        in_memory = rows is not None and spec.shard is None and rows * row_bytes <= spec.memory_budget
        to_disk = not (in_memory and spec.disk_copy == "never")
        if to_disk:
            check_space(directory, tmp, rows, out, y)
        memory = MemoryRows(torch.empty((rows, *fshape), dtype=stored, device=device),  # (N, *fshape)
                            torch.empty((rows, *lshape), dtype=y.dtype, device=device)) if in_memory else None  # (N, *lshape)
        sink = cls(stored, y.dtype, memory)
        background = in_memory and spec.disk_copy == "background"
        sink.writer = EntryWriter(tmp if to_disk else None, final, fshape, fdtype, lshape, ldtype, to_numpy, lock=lock,
                                  on_publish=on_publish, staging_bytes=staging_bytes, soft=background, memory=memory,
                                  defer_writes=background)
        return sink

    def add(self, i: int, cast: torch.Tensor, y: torch.Tensor, to_numpy: Callable) -> None:
        """Batch ``i``: ``cast: (B, *fshape)`` in the storage dtype on the build device, ``y: (B, *lshape)``."""
        a, b = self.rows, self.rows + len(cast)
        if self.memory is not None and b > self.memory.x.shape[0]:
            raise StoreArgumentError("data", f"more than the {self.memory.x.shape[0]} rows it has", "as many rows "
                                     "as its length")
        if cast.device.type == "cuda":
            self._add_cuda(a, b, cast, y)
        else:
            if cast.is_floating_point() and not bool(torch.isfinite(cast).all()):
                raise _non_finite(i, self.stored)
            xn, yn = to_numpy(cast, self.fdtype), to_numpy(y, self.ldtype)
            if self.memory is None:
                self.writer.put(xn, yn)
            else:
                self.x_np[a:b], self.y_np[a:b] = xn, yn
                self.writer.rows_ready(b)
        self.rows = b

    def _add_cuda(self, a: int, b: int, cast: torch.Tensor, y: torch.Tensor) -> None:
        if cast.is_floating_point():
            self.flags.append(torch.isfinite(cast).all())  # checked once, after the last batch
        if self.memory is not None:
            self.memory.x[a:b].copy_(cast)
            self.memory.y[a:b].copy_(y, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        if self.memory is None:
            self.writer.put(cast, y, ready)
        else:
            self.writer.rows_ready(b, ready)

    def close(self, attrs: dict[str, Any], row_start: int, path: str, key: str, wait: bool) -> Built:
        """Check finiteness (once, on CUDA), hand the metadata to the writer; wait for it unless in memory."""
        if self.flags:
            ok = torch.stack(self.flags)
            if not bool(ok.all()):  # the one wait for the device of a CUDA build
                raise _non_finite(int((~ok).nonzero()[0, 0]), self.stored)
        self.writer.close(dict(attrs), row_start, self.rows)
        if self.memory is None or wait:
            self.writer.wait()
        if self.memory is None:
            return Built(path)
        if self.rows < self.memory.x.shape[0]:
            self.memory = MemoryRows(self.memory.x[:self.rows], self.memory.y[:self.rows])
        meta = _meta(attrs, path, key, self.rows, self.stored, self.fdtype, self.ldtype, self.writer.chunk_rows,
                     row_start)
        return Built(path, meta, self.memory, None if self.writer.published else self.writer)

    def abort(self) -> None:
        self.writer.abort()


def _non_finite(i: int, stored: torch.dtype) -> StoreArgumentError:
    return StoreArgumentError(f"module output for batch {i} in {stored}", "non-finite values (NaN, inf, or beyond the "
                              "storage dtype's range)", "finite features: non-finite features are never stored")


def _meta(attrs: dict[str, Any], path: str, key: str, rows: int, stored: torch.dtype, fdtype: np.dtype,
          ldtype: np.dtype, chunk_rows: int, row_start: int) -> EntryMeta:
    """The metadata the published file will hold, as ``read_meta`` would return it."""
    full = {k: attr_value(v) for k, v in attrs.items()}
    full.update(row_range=[row_start, row_start + rows], chunk_rows=chunk_rows, num_rows=rows, complete=True)
    return EntryMeta(path=path, key=key, num_rows=rows, feature_shape=tuple(full["feature_shape"]), dtype=stored,
                     stored_dtype=fdtype, label_shape=tuple(full["label_shape"]), label_dtype=ldtype,
                     chunk_rows=chunk_rows, attrs=full)
