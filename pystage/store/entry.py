"""StoreEntry: one complete entry of the store, opened for reading (or built in memory, its disk copy on the way)."""
from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from pystage.store.errors import StoreNotFoundError
from pystage.store.format import EntryMeta, decode_json_attr
from pystage.store.memory import (DeviceBudget, MemoryRows, as_numpy, as_tensor, budget_bytes, memory_batches,
                                  trim_host_heap)
from pystage.store.order import epoch_order
from pystage.store.reader import content_digest, digest_of, verify_checksums
from pystage.store.scatter import ScatterReader
from pystage.store.stream import StoreDataset, StreamOptions, iter_stream, plan_stream
from pystage.store.window import Buffers, WindowPool, aligned_empty
from pystage.store.writer import EntryWriter

Device = Union[str, torch.device, None]


class StoreEntry:
    """Features and labels of one key: metadata, ``stream()`` of batches, ``dataset()`` for DataLoader workers.

    An entry built in memory (``FeatureStore(device_budget=...)``) serves its rows from there at once; its disk copy
    may still be being written (``on_disk``, ``wait()``). Reads that need the file (``dataset()``, ``verify()``, a
    stream once the rows were released) wait for it.
    """

    def __init__(self, meta: EntryMeta, ram_budget: int, device_budget: DeviceBudget = "auto",
                 memory: Optional[MemoryRows] = None, writer: Optional[EntryWriter] = None) -> None:
        self._meta, self.ram_budget, self.device_budget = meta, ram_budget, device_budget
        self._memory = memory  # every row, on a device or in RAM (verified or not: MemoryRows.verified)
        self._writer = writer  # the disk copy being written; None once published (or for an entry read from disk)
        self._file = writer is None or writer.tmp is not None  # whether there is (or will be) a disk copy
        self._digest: Optional[str] = None
        self._lock = threading.Lock()
        self._pool = WindowPool()  # two stream windows, reused from epoch to epoch

    path = property(lambda self: self._meta.path, doc="The entry's HDF5 file.")
    key = property(lambda self: self._meta.key, doc="The entry's key (32 hex digits).")
    num_rows = property(lambda self: self._meta.num_rows, doc="Rows (samples) in the entry.")
    feature_shape = property(lambda self: self._meta.feature_shape, doc="Shape of one row's features.")
    label_shape = property(lambda self: self._meta.label_shape, doc="Shape of one row's label (() for class ids).")
    dtype = property(lambda self: self._meta.dtype, doc="torch dtype of the features as served.")
    nbytes = property(lambda self: self._meta.nbytes, doc="Bytes of features and labels (the file is a little larger).")
    chunk_rows = property(lambda self: self._meta.chunk_rows, doc="Rows per HDF5 chunk.")

    @property
    def meta(self) -> dict[str, Any]:
        """All metadata attributes, with ``shard`` and ``extra`` decoded."""
        m = dict(self._meta.attrs)
        m["shard"], m["extra"] = decode_json_attr(m, "shard"), decode_json_attr(m, "extra")
        return m

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"StoreEntry(key={self.key}, rows={self.num_rows}, feature_shape={self.feature_shape}, "
                f"dtype={self.dtype}, path={self.path!r})")

    def _options(self, batch_size: int, shuffle: bool, seed: int, epoch: int, device: Device, drop_last: bool,
                 check: bool) -> StreamOptions:
        return StreamOptions(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last,
                             device=None if device is None else torch.device(device), check=check)

    @property
    def on_disk(self) -> bool:
        """True once the entry's file is complete and in place (False while it is written, or with no disk copy)."""
        return self._file and (self._writer is None or self._writer.published)

    @property
    def memory_device(self) -> Optional[torch.device]:
        """Where the entry's rows are held in memory (None: streamed from the file)."""
        return None if self._memory is None else self._memory.device

    def wait(self) -> "StoreEntry":
        """Block until the disk copy is published (at once for an entry read from disk); raises the writer's error
        (``StoreDiskFullError``...). Returns the entry."""
        writer = self._writer
        if writer is not None:
            writer.wait()
            if writer.published:
                self._writer = None
        return self

    def stream(self, batch_size: int = 50, shuffle: bool = True, seed: int = 0, epoch: int = 0, device: Device = None,
               drop_last: bool = False, check: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` batches, ``x: (B, *feature_shape)``; same (seed, epoch) -> same order.

        Reads chunk-aligned blocks in shuffled order straight into windows of ``ram_budget / 4`` (os.preadv
        scatters each row to its shuffled place, several reads in flight, ahead of the consumer); a CPU batch
        is a view of its window, not a copy. A window is refilled only when none of its batches is alive, so
        a batch you keep is never overwritten, but it keeps its window's memory: ``.clone()`` batches you keep
        for long. Two windows are kept for reuse between epochs (``release_buffers()`` frees them). An entry
        that fits half the budget is loaded once and kept in RAM; one streamed to CUDA that fits the device budget
        is loaded into GPU memory once. Rows held in memory are gathered where they are, in the same order (and
        so the same batches) as the file would be read in. ``check`` (the default) verifies each chunk's CRC as
        it is read (rows held in memory once, when loaded): a mismatch raises StoreCorruptError naming the file
        and the chunk. On CUDA, windows are pinned and batches are copied non-blocking.
        """
        opts = self._options(batch_size, shuffle, seed, epoch, device, drop_last, check)
        rows = self._rows_for(opts.device, batch_size, check)
        if rows is not None:
            order = epoch_order(self._meta, self.ram_budget, batch_size, shuffle, seed, epoch)
            return memory_batches(rows, order, batch_size, drop_last, opts.device)
        return iter_stream(self._meta, self.ram_budget, opts, pool=self._file_pool())

    def dataset(self, batch_size: int = 50, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, check: bool = True) -> StoreDataset:
        """A torch IterableDataset of CPU batches for ``DataLoader(ds, batch_size=None, num_workers=k)`` (read from
        the file: waits for the disk copy)."""
        self._need_file()
        return StoreDataset(self._meta, self.ram_budget, self._options(batch_size, shuffle, seed, epoch, None,
                                                                        drop_last, check))

    def iter_rows(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``[start, stop)`` in order, in batches, every chunk's CRC verified (what build() reads); from
        memory (where the rows are held) when the entry is held there."""
        rows = self._memory
        if rows is not None:
            return ((rows.x[a:min(a + batch_size, stop)], rows.y[a:min(a + batch_size, stop)])
                    for a in range(start, stop, batch_size))
        opts = StreamOptions(batch_size=batch_size, shuffle=False, rows=(start, stop), check=True)
        return iter_stream(self._meta, self.ram_budget, opts, pool=self._file_pool())

    def release_buffers(self) -> None:
        """Free the stream windows kept between epochs and the rows held in memory (kept when there is no disk copy,
        or its writing failed: they are the entry; a copy still being written reads its own reference)."""
        self._pool.clear()
        writer = self._writer
        failed = writer is not None and (writer.error is not None or (writer.file is not None and writer.file.failed))
        with self._lock:
            freed = self._file and not failed and self._memory is not None
            host = freed and self._memory.device.type == "cpu"  # type: ignore[union-attr]
            if self._file and not failed:
                self._memory = None
        if host:
            trim_host_heap()

    def verify(self) -> list[tuple[int, int, int]]:
        """Chunks of the file whose CRC does not match, as ``(chunk, first_row, stop_row)``; empty when the data is
        intact (waits for the disk copy)."""
        self._need_file()
        return verify_checksums(self._meta, plan_stream(self._meta, self.ram_budget, 1).block_rows)

    @property
    def content_digest(self) -> str:
        """Hash of what the entry holds: row count, shapes, dtypes and every chunk's CRC (read from the file once).

        Reads that verify the CRCs serve exactly the bytes this digest describes, so it keys what was
        computed from the entry (a stage trained on it, the next stage's features)."""
        if self._digest is None:
            writer = self._writer
            self._digest = digest_of(self._meta, writer.checksums()) if writer is not None else \
                content_digest(self._meta)
        return self._digest

    # -- rows in memory ------------------------------------------------------------------------------------------
    def _rows_for(self, device: Optional[torch.device], batch_size: int, check: bool) -> Optional[MemoryRows]:
        """The rows in memory to serve a stream to ``device`` from, loading them if they fit; None: stream the file."""
        with self._lock:
            rows = self._memory
            if rows is not None and not rows.verified and check:
                rows = self._memory = None  # loaded unchecked; a checked read loads them again
            cuda = device is not None and device.type == "cuda"
            if cuda and (rows is None or rows.device.type != "cuda"):
                if self._meta.nbytes <= budget_bytes(self.device_budget, device, self.ram_budget):  # type: ignore[arg-type]
                    self._memory = rows = rows.to(device) if rows is not None else self._load(device, check)
            if rows is None and plan_stream(self._meta, self.ram_budget, batch_size).resident:
                self._memory = rows = self._load(torch.device("cpu"), check)
            return rows

    def _load(self, device: torch.device, check: bool) -> MemoryRows:
        """Every row from the file (blocks of whole chunks, verified with ``check``) into memory on ``device``."""
        self._need_file()
        m = self._meta
        x = aligned_empty((m.num_rows, *m.feature_shape), m.stored_dtype)  # (N, *feature_shape)
        y = aligned_empty((m.num_rows, *m.label_shape), m.label_dtype)  # (N, *label_shape)
        reader = ScatterReader(m, check=check)
        try:
            if m.num_rows:
                reader.read(0, m.num_rows, Buffers(x, y))
        finally:
            reader.close()
        rows = MemoryRows(as_tensor(x, m.dtype == torch.bfloat16), as_tensor(y, False), verified=check)
        return rows if device.type == "cpu" else rows.to(device)

    def host_rows(self, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every row as numpy arrays in RAM, as stored (bfloat16 as raw uint16): the rows held in RAM, else loaded
        from the file (verified with ``check``) and kept."""
        with self._lock:
            rows = self._memory
            if rows is None or (check and not rows.verified):
                rows = self._memory = self._load(torch.device("cpu"), check)
            elif rows.device.type != "cpu":
                rows = rows.to(torch.device("cpu"))
        return as_numpy(rows.x), as_numpy(rows.y)

    def _need_file(self) -> None:
        if not self._file:
            raise StoreNotFoundError(self.key, self.path, "this entry was built with disk_copy='never': it lives only in "
                                     "memory (stream() it)")
        self.wait()

    def _file_pool(self) -> WindowPool:
        self._need_file()
        return self._pool

    def __getstate__(self) -> dict[str, Any]:
        self._need_file()  # another process reads the file
        return {"_meta": self._meta, "ram_budget": self.ram_budget, "device_budget": self.device_budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_meta"], state["ram_budget"], state.get("device_budget", "auto"))  # type: ignore[misc]
