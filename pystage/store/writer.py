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

import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np
import torch

from pystage.store.chunkfile import STAGING_BYTES, ChunkFile, fsync_dir, is_enospc
from pystage.store.errors import StoreDiskFullError

log = logging.getLogger(__name__)
CRC_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))
THREAD_NAME = "pystage-store-writer"
_FINISH, _ABORT = "finish", "abort"


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
