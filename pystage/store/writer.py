"""Write an entry's file from a background thread, beside the forward pass that computes its rows.

The builder hands row blocks to ``EntryWriter.put`` (a bounded queue: at most ``depth`` blocks wait) and goes
on computing. The writer thread gathers rows into whole chunks, computes each chunk's CRC-32 (several chunks
at once: zlib releases the GIL), appends them to the temporary file ``<key>.h5.partial-<pid>-<random>``, and,
after ``close``, writes the checksum table and the metadata, flushes, fsyncs, renames the file to ``<key>.h5``
and fsyncs the directory: the same steps and the same crash-safety as a build that writes inline (a build
killed at any point leaves at most the temporary file, which the next build of the key removes). Blocks may be
numpy arrays or device tensors: a CUDA block is copied to page-locked memory on the writer's own stream, after
the event that marks it computed, so the copies never wait behind the compute stream nor stall it.

An error in the thread (a full disk...) removes the temporary file and is raised by the builder's next
``put``, by ``checksums`` or by ``wait``.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import h5py
import numpy as np
import torch

from pystage.store.errors import StoreDiskFullError
from pystage.store.format import CHECKSUMS, FEATURES, LABELS, chunk_rows_for

log = logging.getLogger(__name__)
STAGING_BYTES = 8 << 20  # rows gathered before each write: whole chunks
CRC_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
THREAD_NAME = "pystage-store-writer"
_FINISH, _ABORT = "finish", "abort"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


class ChunkFile:
    """Appends rows to '/features' and '/labels' of a new HDF5 file in whole chunks, with a CRC per chunk
    (``path=None``: no file, the CRCs only: an entry kept in memory without a disk copy)."""

    def __init__(self, path: Optional[str], feature_shape: tuple[int, ...], fdtype: np.dtype, label_shape: tuple[int, ...],
                 ldtype: np.dtype, staging_bytes: int = STAGING_BYTES, pool: Optional[ThreadPoolExecutor] = None,
                 soft: bool = False) -> None:
        self.path, self.rows, self.crcs, self.pool = path, 0, [], pool  # type: ignore[var-annotated]
        self.soft, self.failed = soft, None  # soft: an I/O error drops the file, the CRCs go on (``failed``)
        row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * fdtype.itemsize
        self.chunk_rows = chunk_rows_for(row_bytes)
        self.stage_rows = self.chunk_rows * max(1, staging_bytes // (self.chunk_rows * max(row_bytes, 1)))
        self.fdtype, self.ldtype = fdtype, ldtype
        self.f: Optional[h5py.File] = None
        if path is not None:
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
                self.flush()

    def flush(self) -> None:
        """Write the staged rows (the last chunk may be partial only at the end) and their CRCs."""
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
        parts = [p for s in range(0, n, self.chunk_rows)
                 for p in (self.xs[s:min(s + self.chunk_rows, n)], self.ys[s:min(s + self.chunk_rows, n)])]
        sums = list(self.pool.map(_crc, parts)) if self.pool is not None and len(parts) > 2 else [_crc(p) for p in parts]
        self.crcs.extend(zip(sums[0::2], sums[1::2]))
        self.rows, self.fill = a + n, 0

    def finish(self, attrs: dict[str, Any], row_start: int, on_checksums: Callable[[np.ndarray], None]) -> None:
        """Write the last rows, the checksums and the metadata; flush, fsync and close."""
        self.flush()
        table = np.asarray(self.crcs, dtype="<u4").reshape(-1, 2)
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


class _DeviceCopier:
    """Device tensors to numpy arrays in the writer thread: a side stream and one reused page-locked buffer."""

    def __init__(self) -> None:
        self.stream: Optional[Any] = None
        self.buffers: dict[int, torch.Tensor] = {}

    def __call__(self, i: int, t: torch.Tensor, ready: Optional[Any], to_numpy: Callable[[torch.Tensor], np.ndarray]
                 ) -> np.ndarray:
        if t.device.type != "cuda":
            return to_numpy(t)
        with torch.cuda.device(t.device):
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            buf = self.buffers.get(i)
            if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                buf = self.buffers[i] = torch.empty(max(t.numel(), 1), dtype=t.dtype, pin_memory=True)
            host = buf[:t.numel()].view(t.shape)
            with torch.cuda.stream(self.stream):
                if ready is not None:
                    self.stream.wait_event(ready)  # the rows are computed
                host.copy_(t, non_blocking=True)
            self.stream.synchronize()  # this stream only: training goes on
        return to_numpy(host)


class EntryWriter:
    """A thread that writes one entry file: ``put`` rows, ``close`` with the metadata, then it publishes.

    ``tmp=None``: no file, only the CRC table (an entry kept in memory without a disk copy). ``soft``: an I/O error
    (a full disk) drops the file but not the CRC table, and only ``wait`` raises it (the entry is in memory: the
    build and what reads the entry go on).
    ``lock``: the key's file lock, released by the thread once the entry is published (or the build failed).
    ``on_publish``: called in the thread after the rename (the store prunes to its disk budget there).
    ``to_numpy(tensor, np_dtype)``: how a tensor block becomes the stored bytes.
    """

    def __init__(self, tmp: Optional[str], final: str, feature_shape: tuple[int, ...], fdtype: np.dtype,
                 label_shape: tuple[int, ...], ldtype: np.dtype, to_numpy: Callable[[torch.Tensor, np.dtype], np.ndarray],
                 depth: int = 4, lock: Any = None, on_publish: Optional[Callable[[], None]] = None,
                 staging_bytes: int = STAGING_BYTES, soft: bool = False) -> None:
        self.tmp, self.final, self.lock, self.on_publish, self.to_numpy = tmp, final, lock, on_publish, to_numpy
        self.pool = ThreadPoolExecutor(CRC_THREADS, thread_name_prefix=THREAD_NAME + "-crc") if CRC_THREADS > 1 else None
        self.file = ChunkFile(tmp, feature_shape, fdtype, label_shape, ldtype, staging_bytes, self.pool, soft)
        self.chunk_rows = self.file.chunk_rows
        self.error: Optional[BaseException] = None
        self.table: Optional[np.ndarray] = None  # (chunks, 2) CRCs, once every row is written
        self._queue: "queue.Queue[tuple]" = queue.Queue(maxsize=max(1, depth))
        self._checksummed, self._done = threading.Event(), threading.Event()
        self._copy = _DeviceCopier()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME)
        self._thread.start()

    # -- the builder's side ----------------------------------------------------------------------------------
    def put(self, x: Any, y: Any, ready: Any = None) -> None:
        """Queue rows ``x: (R, *feature_shape)``, ``y: (R, *label_shape)`` (numpy arrays, or tensors: CUDA ones are
        read after the event ``ready``); blocks while ``depth`` blocks wait. Raises the thread's error."""
        self._enqueue(("rows", x, y, ready))

    def close(self, attrs: dict[str, Any], row_start: int) -> None:
        """No more rows: the thread writes the metadata and publishes the entry."""
        self._enqueue((_FINISH, attrs, row_start))

    def abort(self) -> None:
        """Stop without publishing; the temporary file is removed. Waits for the thread."""
        while self._thread.is_alive():
            try:
                self._queue.put((_ABORT,), timeout=0.05)
                break
            except queue.Full:
                continue
        self._thread.join()

    def checksums(self) -> np.ndarray:
        """The CRC table ``(chunks, 2)`` once every row is written (before the fsync and the rename)."""
        self._checksummed.wait()
        self._raise()
        return self.table  # type: ignore[return-value]

    def wait(self) -> str:
        """Block until the entry is published; returns its path. Raises the thread's error (a soft one too)."""
        self._done.wait()
        self._thread.join()
        self._raise()
        if self.file.failed is not None:
            raise _disk_error(self.file.failed, self.tmp or self.final)
        return self.final

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def published(self) -> bool:
        """The file is in place."""
        return self.done and self.error is None and self.file.failed is None and self.tmp is not None

    def _enqueue(self, item: tuple) -> None:
        while True:
            self._raise()
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    # -- the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item[0] == _ABORT:
                    raise _Aborted()
                if item[0] == _FINISH:
                    self._publish(*item[1:])
                    return
                _, x, y, ready = item
                self.file.append(self._numpy(0, x, ready), self._numpy(1, y, ready))
        except BaseException as e:  # noqa: BLE001 - handed to the builder
            self.file.close()
            if self.tmp is not None and os.path.exists(self.tmp):
                os.remove(self.tmp)
            if not isinstance(e, _Aborted):
                self.error = _disk_error(e, self.tmp or self.final)
                self._drain()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            if self.lock is not None:
                self.lock.release()
            self._checksummed.set()
            self._done.set()

    def _numpy(self, i: int, t: Any, ready: Any) -> np.ndarray:
        if isinstance(t, np.ndarray):
            return t
        dtype = self.file.fdtype if i == 0 else self.file.ldtype
        return self._copy(i, t, ready, lambda h: self.to_numpy(h, dtype))

    def _publish(self, attrs: dict[str, Any], row_start: int) -> None:
        def checksummed(table: np.ndarray) -> None:
            self.table = table
            self._checksummed.set()

        self.file.finish(attrs, row_start, checksummed)
        if self.tmp is None or self.file.failed is not None:
            return
        try:
            os.replace(self.tmp, self.final)
            fsync_dir(os.path.dirname(self.final))
        except OSError as e:
            self.file.fail(e)
            return
        log.info("published %s (%d rows)", self.final, self.file.rows)
        if self.on_publish is not None:
            try:
                self.on_publish()
            except Exception as e:  # noqa: BLE001 - the entry is published; pruning is best effort
                log.warning("after publishing %s: %s", self.final, e)

    def _drain(self) -> None:
        """After an error: take what the builder still queues until it stops (``put`` raises, ``close`` ends)."""
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                return
            if item[0] in (_FINISH, _ABORT):
                return


class _Aborted(Exception):
    pass


def _disk_error(e: BaseException, path: str) -> BaseException:
    return StoreDiskFullError(path, str(e)) if is_enospc(e) and not isinstance(e, StoreDiskFullError) else e
