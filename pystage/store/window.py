"""Window buffers that rows are read into and batches are sliced from without a copy.

Lifetime rule: a batch served from a window is a view of it, so a window is refilled only once **no
batch of it is alive** (every view of its arrays is gone: checked with the owner arrays' reference
counts, which each view holds through its ``.base``) and, on CUDA, once its non-blocking copies are
done. A normal training loop drops each batch before the next few, so two windows are reused all
epoch; a caller who keeps batches makes the pool allocate fresh windows instead, so a kept batch is
never overwritten (it keeps its whole window alive: ``.clone()`` a batch you keep for long).
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Optional

import numpy as np
import torch

from pystage.store.format import EntryMeta

PAGE = 4096
SCATTER_MIN_ROW_BYTES = 2048  # smaller rows are read contiguously and scattered with numpy (iovecs cost per row)


def _owner(a: np.ndarray) -> Any:
    """The array that owns ``a``'s memory: every view of ``a`` keeps a reference to it."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _flat(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


class Buffers:
    """Feature and label arrays of ``rows`` rows, with the byte views that os.preadv writes into."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y  # (R, *feature_shape), (R, *label_shape)
        self.xbytes, self.ybytes = _flat(x), _flat(y)
        self.xrows = self._rows(self.xbytes, x)  # per-row views, for scatter reads; None for small rows
        self.yrows = self._rows(self.ybytes, y)

    @staticmethod
    def _rows(flat: memoryview, a: np.ndarray) -> Optional[list[memoryview]]:
        rb = a[0].nbytes if len(a) else 0
        if rb < SCATTER_MIN_ROW_BYTES:
            return None
        return [flat[i * rb:(i + 1) * rb] for i in range(len(a))]


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty starting on a page boundary: the kernel copies into it several times faster than into
    malloc's large blocks, which start 16 bytes past a page (measured: ~2 GB/s vs ~7 GB/s for preadv)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + PAGE, np.uint8)
    at = -raw.ctypes.data % PAGE
    return raw[at:at + nbytes].view(dtype).reshape(shape)


def alloc_arrays(rows: int, meta: EntryMeta, pinned: bool) -> tuple[np.ndarray, np.ndarray]:
    """Page-aligned feature and label arrays; in pinned (page-locked) memory when batches go to CUDA."""
    if not pinned:
        return (aligned_empty((rows, *meta.feature_shape), meta.stored_dtype),
                aligned_empty((rows, *meta.label_shape), meta.label_dtype))
    xt = torch.empty((rows, meta.row_bytes), dtype=torch.uint8, pin_memory=True)
    yt = torch.empty((rows, meta.label_row_bytes), dtype=torch.uint8, pin_memory=True)
    return (xt.numpy().view(meta.stored_dtype).reshape(rows, *meta.feature_shape),
            yt.numpy().view(meta.label_dtype).reshape(rows, *meta.label_shape))


class Window(Buffers):
    """A pooled window: ``busy`` while being filled or cut into batches; reusable when no batch of it is alive."""

    def __init__(self, rows: int, meta: EntryMeta, pinned: bool) -> None:
        super().__init__(*alloc_arrays(rows, meta, pinned))
        self.rows, self.pinned, self.busy = rows, pinned, True
        self.event: Optional[Any] = None  # CUDA event after the last copy out of this window
        self._owners = (_owner(self.x), _owner(self.y))
        self._base = self._refs()  # our own references; each live batch view adds one

    def _refs(self) -> tuple[int, int]:
        return sys.getrefcount(self._owners[0]), sys.getrefcount(self._owners[1])

    def release(self, cuda: bool = False) -> None:
        """All batches have been cut: reusable once they are dropped (and, on CUDA, copied)."""
        if cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.busy = False

    def reusable(self) -> bool:
        if self.busy or self._refs() != self._base:
            return False
        if self.event is not None:
            self.event.synchronize()  # the non-blocking copies out of it finish before it is refilled
            self.event = None
        return True


class WindowPool:
    """Up to ``keep`` windows kept for reuse (across epochs too); more are allocated when all are held."""

    def __init__(self, keep: int = 2) -> None:
        self.keep, self.windows, self.lock = keep, [], threading.Lock()  # type: ignore[var-annotated]

    def acquire(self, rows: int, meta: EntryMeta, pinned: bool, new: bool) -> Optional[Window]:
        """A free window of ``rows`` rows, marked busy; a fresh one if none is free and ``new``; else None."""
        with self.lock:
            self.windows = [w for w in self.windows if w.rows == rows and w.pinned == pinned]
            for w in self.windows:
                if w.reusable():
                    w.busy = True
                    return w
            if not new:
                return None
            w = Window(rows, meta, pinned)
            if len(self.windows) < self.keep:
                self.windows.append(w)
            return w

    def clear(self) -> None:
        with self.lock:
            self.windows = []
