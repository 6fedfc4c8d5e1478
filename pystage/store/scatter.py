"""Read row blocks straight from the file into (permuted) window rows: os.preadv, no HDF5 call per read.

``os.preadv(fd, views, offset)`` scatters one contiguous file range over many buffers in one system
call and releases the GIL, so a block is read *and* row-shuffled with a single kernel copy, and
several blocks can be read at once from a thread pool. Rows smaller than SCATTER_MIN_ROW_BYTES (labels,
tiny features) are read contiguously and scattered with numpy. A dataset whose layout is not plain
(see layout.py) is read through HDF5 instead, with the same results.
"""
from __future__ import annotations

import operator
import os
import zlib
from typing import Optional, Sequence

import h5py
import numpy as np

from pystage.store.errors import StoreCorruptError
from pystage.store.format import CHECKSUMS, FEATURES, LABELS, EntryMeta
from pystage.store.layout import ChunkLayout, chunk_layout
from pystage.store.window import Buffers

IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if hasattr(os, "sysconf") else 1024
MAX_CALL_BYTES = 1 << 30  # Linux caps one read at 2 GiB - 4 KiB


def preadv_all(fd: int, views: Sequence[memoryview], offset: int, want: int, path: str) -> None:
    """Fill every view (``want`` bytes in all) from ``offset`` on, continuing after short reads;
    StoreCorruptError at the end of the file."""
    while views:
        got = os.preadv(fd, views, offset)
        if got == want:
            return
        if got <= 0:
            raise StoreCorruptError(path, f"bytes {offset}:{offset + want}", "readable data", "end of file (truncated?)")
        offset, want = offset + got, want - got
        views = list(views)
        while got and views[0].nbytes <= got:
            got -= views[0].nbytes
            views = views[1:]
        if got:
            views = [views[0][got:]] + views[1:]


class _Column:
    """One dataset: its plain layout (or None: read through HDF5), its row size and its per-chunk CRCs."""

    def __init__(self, dset: h5py.Dataset, chunk_rows: int) -> None:
        self.dset, self.layout = dset, chunk_layout(dset, chunk_rows)
        self.row_bytes = int(np.prod(dset.shape[1:], dtype=np.int64)) * dset.dtype.itemsize


class ScatterReader:
    """One open entry; ``read(start, stop, bufs, dest, at)`` puts row ``start + i`` in row ``dest[i]`` of ``bufs``
    (or, with ``dest=None``, in row ``at + i``). Thread-safe: calls may run at once from several threads."""

    def __init__(self, meta: EntryMeta, check: bool = False) -> None:
        self.meta = meta
        try:
            self.f = h5py.File(meta.path, "r", rdcc_nbytes=0)
            self.cols = (_Column(self.f[FEATURES], meta.chunk_rows), _Column(self.f[LABELS], meta.chunk_rows))
            self.crcs: Optional[np.ndarray] = self.f[CHECKSUMS][()] if check else None  # (num_chunks, 2)
        except (OSError, KeyError) as e:
            raise StoreCorruptError(meta.path, "HDF5 structure", "a readable entry", f"{type(e).__name__}: {e}") from None
        self.fd = os.open(meta.path, os.O_RDONLY)

    def read(self, start: int, stop: int, bufs: Buffers, dest: Optional[np.ndarray] = None, at: int = 0) -> None:
        if stop <= start:
            return
        sums = []
        for col, arr, rows, flat in zip(self.cols, (bufs.x, bufs.y), (bufs.xrows, bufs.yrows), (bufs.xbytes, bufs.ybytes)):
            sums.append(self._read_column(col, start, stop, arr, rows, flat, dest, at, self.crcs is not None))
        if self.crcs is not None:
            self._verify(start, stop, sums)

    def _read_column(self, col: _Column, start: int, stop: int, arr: np.ndarray, rows: Optional[list[memoryview]],
                     flat: memoryview, dest: Optional[np.ndarray], at: int, check: bool) -> dict[int, int]:
        """Read one column; returns ``{chunk: crc32}`` of the chunks wholly inside ``[start, stop)`` when ``check``."""
        rb, n = col.row_bytes, stop - start
        if dest is None or (rows is not None and col.layout is not None):
            if dest is None:
                self._contiguous(col, start, stop, flat[at * rb:(at + n) * rb])
                view = arr[at:at + n]
                return self._crcs(start, stop, lambda a, b: memoryview(view[a - start:b - start].reshape(-1).view(np.uint8)))
            self._scatter(col, start, stop, rows, dest)  # type: ignore[arg-type]
            return self._crcs(start, stop, lambda a, b: [rows[d] for d in dest[a - start:b - start]])  # type: ignore[index]
        stage = np.empty((n, *arr.shape[1:]), arr.dtype)  # small rows, or no plain layout: read, then scatter
        self._contiguous(col, start, stop, memoryview(stage.reshape(-1).view(np.uint8)))
        arr[dest] = stage
        return self._crcs(start, stop, lambda a, b: memoryview(stage[a - start:b - start].reshape(-1).view(np.uint8)))

    def _crcs(self, start: int, stop: int, parts) -> dict[int, int]:  # type: ignore[no-untyped-def]
        if self.crcs is None:
            return {}
        cr, out = self.meta.chunk_rows, {}
        for c in range(-(-start // cr), len(self.crcs)):
            a, b = c * cr, min((c + 1) * cr, self.meta.num_rows)
            if b > stop:
                break
            p = parts(a, b)
            crc = 0
            for v in (p if isinstance(p, list) else [p]):
                crc = zlib.crc32(v, crc)
            out[c] = crc
        return out

    def _verify(self, start: int, stop: int, sums: list[dict[int, int]]) -> None:
        cr = self.meta.chunk_rows
        for c in sums[0]:
            got, want = (sums[0][c], sums[1][c]), tuple(int(v) for v in self.crcs[c])  # type: ignore[index]
            if got != want:
                raise StoreCorruptError(self.meta.path, f"checksum of chunk {c} (rows {c * cr}:{min((c + 1) * cr, self.meta.num_rows)})",
                                        want, got)

    def _contiguous(self, col: _Column, start: int, stop: int, out: memoryview) -> None:
        """Rows ``[start, stop)`` in order into the byte view ``out``."""
        if col.layout is None:
            try:
                col.dset.read_direct(np.frombuffer(out, col.dset.dtype).reshape(stop - start, *col.dset.shape[1:]),
                                     np.s_[start:stop])
            except OSError as e:
                raise StoreCorruptError(self.meta.path, f"rows {start}:{stop}", "readable data", str(e)) from None
            return
        rb = col.row_bytes
        for off, a, b in col.layout.runs(start, stop):
            for p in range(a, b, max(1, MAX_CALL_BYTES // rb)):
                q = min(b, p + max(1, MAX_CALL_BYTES // rb))
                preadv_all(self.fd, [out[(p - start) * rb:(q - start) * rb]], off + (p - a) * rb, (q - p) * rb,
                           self.meta.path)

    def _scatter(self, col: _Column, start: int, stop: int, rows: list[memoryview], dest: np.ndarray) -> None:
        """Row ``start + i`` into ``rows[dest[i]]``: one preadv per contiguous run of up to IOV_MAX rows."""
        layout: ChunkLayout = col.layout  # type: ignore[assignment]
        rb, targets = col.row_bytes, dest.tolist()
        for off, a, b in layout.runs(start, stop):
            for p in range(a, b, IOV_MAX):
                q = min(b, p + IOV_MAX)
                idx = targets[p - start:q - start]
                views = operator.itemgetter(*idx)(rows) if len(idx) > 1 else (rows[idx[0]],)
                preadv_all(self.fd, views, off + (p - a) * rb, (q - p) * rb, self.meta.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.f.id.valid:
            self.f.close()
