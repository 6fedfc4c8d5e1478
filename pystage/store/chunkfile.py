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
    (``checksum=False``: the caller computes the CRC table and hands it to ``finish``)."""

    def __init__(self, path: str, feature_shape: tuple[int, ...], fdtype: np.dtype, label_shape: tuple[int, ...],
                 ldtype: np.dtype, staging_bytes: int = STAGING_BYTES, pool: Optional[ThreadPoolExecutor] = None,
                 soft: bool = False, checksum: bool = True) -> None:
        self.path, self.rows, self.crcs, self.pool, self.checksum = path, 0, [], pool, checksum  # type: ignore[var-annotated]
        self.soft, self.failed = soft, None  # soft: an I/O error drops the file, the CRCs go on (``failed``)
        row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * fdtype.itemsize
        self.chunk_rows = chunk_rows_for(row_bytes)
        self.stage_rows = self.chunk_rows * max(1, staging_bytes // (self.chunk_rows * max(row_bytes, 1)))
        self.f: Optional[h5py.File] = h5py.File(path, "w")
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

    def close(self) -> None:
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


