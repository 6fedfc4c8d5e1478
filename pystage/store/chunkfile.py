"""An entry's HDF5 file written in whole chunks with a CRC-32 per chunk (the writer thread's file; format.py's layout).

Rows are gathered in a staging buffer of whole chunks and written with one ``write_direct`` per column; the
chunks' CRCs are computed as they are written (several chunks at once on a thread pool: zlib releases the GIL).
``finish`` writes the checksum table and the metadata (``complete`` last), flushes, closes and fsyncs.
"""
from __future__ import annotations

import errno
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import h5py
import numpy as np

from pystage.store.format import CHECKSUMS, FEATURES, LABELS, chunk_rows_for
from pystage.store.layout import _layout

STAGING_BYTES = 8 << 20  # rows gathered before each write: whole chunks


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def chunk_crcs(x: np.ndarray, y: np.ndarray, chunk_rows: int, pool: Optional[ThreadPoolExecutor] = None
               ) -> list[tuple[int, int]]:
    """``[(crc32(features), crc32(labels))]`` of each chunk of rows ``x``, ``y`` (chunk-aligned; the last may be short)."""
    n = len(x)
    parts = [p for s in range(0, n, chunk_rows) for p in (x[s:min(s + chunk_rows, n)], y[s:min(s + chunk_rows, n)])]
    sums = list(pool.map(_crc, parts)) if pool is not None and len(parts) > 2 else [_crc(p) for p in parts]
    return list(zip(sums[0::2], sums[1::2]))


class ChunkFile:
    """Appends rows to '/features' and '/labels' of a new HDF5 file in whole chunks, with a CRC per chunk
    (``checksum=False``: the caller computes the CRC table and hands it to ``finish``).

    ``rows`` (known row count): the datasets get their final shape and every chunk is allocated when the file is
    made (no fill), and ``write_at`` puts rows straight into their chunks with ``os.pwrite``: no staging copy, and
    the GIL is released for the whole write (h5py holds it while it writes), so a training loop in another
    thread keeps running. The file is the same as an appended one."""

    def __init__(self, path: str, feature_shape: tuple[int, ...], fdtype: np.dtype, label_shape: tuple[int, ...],
                 ldtype: np.dtype, staging_bytes: int = STAGING_BYTES, pool: Optional[ThreadPoolExecutor] = None,
                 soft: bool = False, checksum: bool = True, rows: Optional[int] = None) -> None:
        self.path, self.rows, self.crcs, self.pool, self.checksum = path, 0, [], pool, checksum  # type: ignore[var-annotated]
        self.soft, self.failed = soft, None  # soft: an I/O error drops the file, the CRCs go on (``failed``)
        row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * fdtype.itemsize
        self.chunk_rows = chunk_rows_for(row_bytes)
        self.stage_rows = self.chunk_rows * max(1, staging_bytes // (self.chunk_rows * max(row_bytes, 1)))
        self.f: Optional[h5py.File] = h5py.File(path, "w")
        self.fixed, self.fd, self.layouts = rows is not None, -1, (None, None)
        self.x, self.y = (self._dataset(name, shape, dtype, rows) for name, shape, dtype in
                          ((FEATURES, feature_shape, fdtype), (LABELS, label_shape, ldtype)))
        if self.fixed:
            self.layouts = (_layout(self.x, self.chunk_rows), _layout(self.y, self.chunk_rows))
            self.fd = os.open(path, os.O_WRONLY)
        self.xs = np.empty((self.stage_rows, *feature_shape), fdtype)  # (S, *feature_shape) staging
        self.ys = np.empty((self.stage_rows, *label_shape), ldtype)  # (S, *label_shape)
        self.fill = 0

    def _dataset(self, name: str, shape: tuple[int, ...], dtype: np.dtype, rows: Optional[int]) -> h5py.Dataset:
        chunks = (self.chunk_rows, *shape)
        if rows is None:
            return self.f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), chunks=chunks,  # type: ignore[union-attr]
                                         dtype=dtype)
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # every chunk has its place in the file now
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        return self.f.create_dataset(name, shape=(rows, *shape), maxshape=(None, *shape), chunks=chunks,  # type: ignore[union-attr]
                                     dtype=dtype, dcpl=dcpl)

    def write_at(self, a: int, x: np.ndarray, y: np.ndarray) -> None:
        """Rows ``[a, a + len(x))`` into their chunks (a file made with ``rows``); ``a`` is chunk-aligned."""
        if self.f is None:
            return
        try:
            for arr, layout, dset in zip((x, y), self.layouts, (self.x, self.y)):
                if layout is None:  # not a plain layout (never for what pystage writes): through HDF5
                    dset.write_direct(np.ascontiguousarray(arr), np.s_[0:len(arr)], np.s_[a:a + len(arr)])
                    continue
                flat, rb = memoryview(np.ascontiguousarray(arr)).cast("B"), layout.row_bytes
                for off, r0, r1 in layout.runs(a, a + len(arr)):
                    _pwrite_all(self.fd, flat[(r0 - a) * rb:(r1 - a) * rb], off)
        except OSError as e:
            self.fail(e)
        self.rows = max(self.rows, a + len(x))

    def append(self, x: np.ndarray, y: np.ndarray) -> None:
        pos = 0
        while pos < len(x):
            n = min(len(x) - pos, self.stage_rows - self.fill)
            self.xs[self.fill:self.fill + n] = x[pos:pos + n]
            self.ys[self.fill:self.fill + n] = y[pos:pos + n]
            self.fill, pos = self.fill + n, pos + n
            if self.fill == self.stage_rows:
                self.flush()

    def flush(self) -> None:
        """Write the staged rows (the last chunk may be partial only at the end) and their CRCs (``checksum``)."""
        n, a = self.fill, self.rows
        if n == 0:
            return
        if self.f is not None:
            try:
                self.x.resize(a + n, axis=0)
                self.y.resize(a + n, axis=0)
                self.x.write_direct(self.xs, np.s_[0:n], np.s_[a:a + n])
                self.y.write_direct(self.ys, np.s_[0:n], np.s_[a:a + n])
            except OSError as e:
                self.fail(e)
        if self.checksum:
            self.crcs.extend(chunk_crcs(self.xs[:n], self.ys[:n], self.chunk_rows, self.pool))
        self.rows, self.fill = a + n, 0

    def finish(self, attrs: dict[str, Any], row_start: int, on_checksums: Callable[[np.ndarray], None] = lambda t: None,
               table: Optional[np.ndarray] = None) -> None:
        """Write the last rows, the checksums (``table``, else the ones computed here) and the metadata; flush,
        fsync and close."""
        self.flush()
        table = np.asarray(self.crcs if table is None else table, dtype="<u4").reshape(-1, 2)
        on_checksums(table)
        if self.f is None:
            return
        try:
            self._close_fd()
            attrs["row_range"] = np.asarray([row_start, row_start + self.rows], dtype=np.int64)
            self.f.create_dataset(CHECKSUMS, data=table)
            for k, v in attrs.items():
                self.f.attrs[k] = v
            self.f.attrs["chunk_rows"] = self.chunk_rows
            self.f.attrs["num_rows"] = self.rows
            self.f.attrs["complete"] = True  # last attribute written
            self.f.flush()
            self.f.close()
            fd = os.open(self.path, os.O_RDONLY)  # type: ignore[arg-type]
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            self.fail(e)

    def fail(self, e: OSError) -> None:
        """An I/O error: raised, or (``soft``) the file is removed and only the CRCs go on."""
        if not self.soft:
            raise e
        self.failed = e
        self.close()
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)
        self.f = None

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self._close_fd()
        if self.f is not None and self.f.id.valid:
            try:
                self.f.close()
            except OSError:
                pass


def is_enospc(e: BaseException) -> bool:
    """A full disk, however HDF5 or the OS words it."""
    return isinstance(e, OSError) and (e.errno == errno.ENOSPC or "No space left" in str(e) or "errno = 28" in str(e))


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write fewer)."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
