"""Write an entry's file from a background thread, beside the forward pass that computes its rows.

Two ways in. *Streamed rows* (an entry written to disk only): the builder hands row blocks to ``put`` (a
bounded queue: at most ``depth`` blocks wait) and goes on computing; the thread gathers them into whole
chunks, writes them and computes each chunk's CRC-32. *Rows in memory* (an entry kept on the build device):
the builder only says how many rows are ready (``rows_ready``); the thread reads them from that memory (a CUDA
block is copied to page-locked memory on the thread's own stream, after the event that marks it computed, so
the copies neither wait behind the compute stream nor stall it), checksums each whole chunk as soon as it is
complete, and writes them: at once (``defer_writes=False``), or only after the last CRC (``defer_writes``, a
disk copy in the background), so the CRC table, and with it the entry's content digest, is ready as soon as
the forward pass ends. CRCs of several chunks run at once (zlib releases the GIL).

After ``close`` the thread writes the checksum table and the metadata, flushes, fsyncs, renames the file to
``<key>.h5`` and fsyncs the directory: the same steps and crash-safety as a build that writes inline (a
build killed at any point leaves at most the temporary file ``<key>.h5.partial-<pid>-<random>``, which the
next build of the key removes). An error in the thread removes the temporary file and is raised by the
builder's next call, by ``checksums`` or by ``wait``; with ``soft`` an I/O error (a full disk) only drops the
file: the CRCs go on and only ``wait`` raises it.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np
import torch

from pystage.store.chunkfile import STAGING_BYTES, ChunkFile, chunk_crcs, fsync_dir, is_enospc
from pystage.store.errors import StoreDiskFullError
from pystage.store.format import chunk_rows_for
from pystage.store.memory import MemoryRows, as_numpy, trim_host_heap

log = logging.getLogger(__name__)
CRC_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
BLOCK_BYTES = 64 << 20  # rows read from memory at once (whole chunks)
THREAD_NAME = "pystage-store-writer"
_FINISH, _ABORT = "finish", "abort"


class _DeviceCopier:
    """Device tensors to numpy arrays in the writer thread: a side stream and one reused page-locked buffer each."""

    def __init__(self) -> None:
        self.stream: Optional[Any] = None
        self.buffers: dict[int, torch.Tensor] = {}

    def __call__(self, i: int, t: torch.Tensor, ready: Optional[Any], to_numpy: Callable[[torch.Tensor], np.ndarray]
                 ) -> np.ndarray:
        """``t`` as a numpy array (valid until the next call with the same ``i``)."""
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
    """A thread that writes one entry file; ``close`` with the metadata, then it publishes.

    ``tmp=None``: no file, only the CRC table (an entry kept in memory without a disk copy). ``memory``: the
    rows are read from there (``rows_ready``), else handed over (``put``). ``lock``: the key's file lock,
    released by the thread once the entry is published (or the build failed). ``on_publish``: called in the
    thread after the rename (the store prunes to its disk budget there). ``to_numpy(tensor, np_dtype)``: how a
    tensor block becomes the stored bytes.
    """

    def __init__(self, tmp: Optional[str], final: str, feature_shape: tuple[int, ...], fdtype: np.dtype,
                 label_shape: tuple[int, ...], ldtype: np.dtype, to_numpy: Callable[[torch.Tensor, np.dtype], np.ndarray],
                 depth: int = 4, lock: Any = None, on_publish: Optional[Callable[[], None]] = None,
                 staging_bytes: int = STAGING_BYTES, soft: bool = False, memory: Optional[MemoryRows] = None,
                 defer_writes: bool = False) -> None:
        self.tmp, self.final, self.lock, self.on_publish, self.to_numpy = tmp, final, lock, on_publish, to_numpy
        self.memory, self.defer_writes, self.fdtype, self.ldtype = memory, defer_writes, fdtype, ldtype
        self.pool = ThreadPoolExecutor(CRC_THREADS, thread_name_prefix=THREAD_NAME + "-crc") if CRC_THREADS > 1 else None
        self.file = None if tmp is None else ChunkFile(
            tmp, feature_shape, fdtype, label_shape, ldtype, staging_bytes, self.pool, soft, checksum=memory is None,
            rows=None if memory is None else memory.x.shape[0])
        row_bytes = int(np.prod(feature_shape, dtype=np.int64)) * fdtype.itemsize
        self.chunk_rows = chunk_rows_for(row_bytes)
        self.block_rows = self.chunk_rows * max(1, BLOCK_BYTES // max(1, self.chunk_rows * row_bytes))
        if memory is not None and memory.device.type == "cpu":
            self._np = (as_numpy(memory.x), as_numpy(memory.y))  # views of the rows in RAM
        self.error: Optional[BaseException] = None
        self.table: Optional[np.ndarray] = None  # (chunks, 2) CRCs, once every row is checksummed
        self._crcs: list[tuple[int, int]] = []
        self._checked = self._written = 0  # rows checksummed / written (memory mode)
        self._ready_event: Any = None  # the CUDA event after the last rows handed over (memory mode)
        self._queue: "queue.Queue[tuple]" = queue.Queue(maxsize=0 if memory is not None else max(1, depth))
        self._checksummed, self._done = threading.Event(), threading.Event()
        self._copy = _DeviceCopier()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME)
        self._thread.start()

    # -- the builder's side ----------------------------------------------------------------------------------
    def put(self, x: Any, y: Any, ready: Any = None) -> None:
        """Queue rows ``x: (R, *feature_shape)``, ``y: (R, *label_shape)`` (numpy arrays, or tensors: CUDA ones are
        read after the event ``ready``); blocks while ``depth`` blocks wait. Raises the thread's error."""
        self._enqueue(("rows", x, y, ready))

    def rows_ready(self, stop: int, ready: Any = None) -> None:
        """Rows ``[0, stop)`` of ``memory`` are computed (on CUDA: once the event ``ready`` has passed)."""
        self._enqueue(("ready", stop, ready))

    def close(self, attrs: dict[str, Any], row_start: int, rows: int) -> None:
        """No more rows (``rows`` in all): the thread writes the metadata and publishes the entry."""
        self._enqueue((_FINISH, attrs, row_start, rows))

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
        """The CRC table ``(chunks, 2)`` once every row is checksummed (before the last writes, fsync and rename)."""
        self._checksummed.wait()
        self._raise()
        return self.table  # type: ignore[return-value]

    def wait(self) -> str:
        """Block until the entry is published; returns its path. Raises the thread's error (a soft one too)."""
        self._done.wait()
        self._thread.join()
        self._raise()
        if self.file is not None and self.file.failed is not None:
            raise _disk_error(self.file.failed, self.tmp or self.final)
        return self.final

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def published(self) -> bool:
        """The file is in place."""
        return self.done and self.error is None and self.file is not None and self.file.failed is None

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
                    self._finish(*item[1:])
                    return
                if item[0] == "ready":
                    self._ready_event = item[2]
                    self._from_memory(item[1] // self.chunk_rows * self.chunk_rows)
                    continue
                _, x, y, ready = item
                self.file.append(self._numpy(0, x, ready), self._numpy(1, y, ready))  # type: ignore[union-attr]
        except BaseException as e:  # noqa: BLE001 - handed to the builder
            if self.file is not None:
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
            # the rows belong to the entry (it frees them once the copy is on disk): the writer lets go of them,
            # and of its page-locked staging buffers, as soon as it is done
            host = self.memory is not None and self.memory.device.type == "cpu"
            self.memory, self._np, self._copy = None, None, _DeviceCopier()
            if host:  # the last reference to rows the entry already released
                trim_host_heap()
            self._checksummed.set()
            self._done.set()

    def _numpy(self, i: int, t: Any, ready: Any) -> np.ndarray:
        if isinstance(t, np.ndarray):
            return t
        return self._copy(i, t, ready, lambda h: self.to_numpy(h, self.fdtype if i == 0 else self.ldtype))

    def _from_memory(self, stop: int, write: Optional[bool] = None) -> None:
        """Checksum rows ``[checked, stop)`` of ``memory`` (and write them, unless writes are deferred)."""
        write = not self.defer_writes if write is None else write
        while self._checked < stop:
            a, b = self._checked, min(stop, self._checked + self.block_rows)
            x, y = self._rows(a, b)
            self._crcs.extend(chunk_crcs(x, y, self.chunk_rows, self.pool))
            if write and self.file is not None:
                self.file.write_at(a, x, y)
                self._written = b
            self._checked = b

    def _rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[a, b)`` of ``memory`` as numpy arrays (CUDA rows: copied, valid until the next call)."""
        if self.memory.device.type == "cpu":  # type: ignore[union-attr]
            return self._np[0][a:b], self._np[1][a:b]
        return (self._numpy(0, self.memory.x[a:b], self._ready_event),  # type: ignore[union-attr]
                self._numpy(1, self.memory.y[a:b], self._ready_event))  # type: ignore[union-attr]

    def _finish(self, attrs: dict[str, Any], row_start: int, rows: int) -> None:
        if self.memory is not None:
            self._from_memory(rows)
            self._checksummed_as(np.asarray(self._crcs, dtype="<u4").reshape(-1, 2))
            for a in range(self._written, rows, self.block_rows):  # deferred writes
                if self.file is None or self.file.failed is not None:
                    break
                self.file.write_at(a, *self._rows(a, min(rows, a + self.block_rows)))
        if self.file is None:
            return
        self.file.finish(attrs, row_start, self._checksummed_as, table=self.table)
        if self.file.failed is not None:
            return
        try:
            os.replace(self.tmp, self.final)  # type: ignore[arg-type]
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

    def _checksummed_as(self, table: np.ndarray) -> None:
        self.table = table
        self._checksummed.set()

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
