"""StoreEntry: one complete entry of the store, opened for reading."""
from __future__ import annotations

import threading
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch

from pystage.store.format import EntryMeta, decode_json_attr
from pystage.store.reader import content_digest, verify_checksums
from pystage.store.scatter import ScatterReader
from pystage.store.stream import StoreDataset, StreamOptions, iter_stream, plan_stream
from pystage.store.window import Buffers, WindowPool, aligned_empty

Device = Union[str, torch.device, None]


class StoreEntry:
    """Features and labels of one key: metadata, ``stream()`` of batches, ``dataset()`` for DataLoader workers."""

    def __init__(self, meta: EntryMeta, ram_budget: int) -> None:
        self._meta, self.ram_budget = meta, ram_budget
        self._resident: Optional[tuple[np.ndarray, np.ndarray, bool]] = None  # (x, y, checksums verified)
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

    def stream(self, batch_size: int = 50, shuffle: bool = True, seed: int = 0, epoch: int = 0, device: Device = None,
               drop_last: bool = False, check: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x, y)`` batches, ``x: (B, *feature_shape)``; same (seed, epoch) -> same order.

        Reads chunk-aligned blocks in shuffled order straight into windows of ``ram_budget / 4`` (os.preadv
        scatters each row to its shuffled place, several reads in flight, ahead of the consumer); a CPU batch
        is a view of its window, not a copy. A window is refilled only when none of its batches is alive, so
        a batch you keep is never overwritten, but it keeps its window's memory: ``.clone()`` batches you keep
        for long. Two windows are kept for reuse between epochs (``release_buffers()`` frees them). An entry
        that fits half the budget is loaded once and kept in RAM. ``check`` (the default) verifies each chunk's
        CRC as it is read (a resident entry once, when it is loaded): a mismatch raises StoreCorruptError naming
        the file and the chunk. On CUDA, windows are pinned and batches are copied non-blocking.
        """
        opts = self._options(batch_size, shuffle, seed, epoch, device, drop_last, check)
        return iter_stream(self._meta, self.ram_budget, opts, resident=lambda: self._load_resident(check),
                           pool=self._pool)

    def dataset(self, batch_size: int = 50, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, check: bool = True) -> StoreDataset:
        """A torch IterableDataset of CPU batches for ``DataLoader(ds, batch_size=None, num_workers=k)``."""
        return StoreDataset(self._meta, self.ram_budget, self._options(batch_size, shuffle, seed, epoch, None,
                                                                        drop_last, check))

    def iter_rows(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rows ``[start, stop)`` in order, in batches, every chunk's CRC verified (what build() reads)."""
        opts = StreamOptions(batch_size=batch_size, shuffle=False, rows=(start, stop), check=True)
        return iter_stream(self._meta, self.ram_budget, opts, resident=None, pool=self._pool)

    def release_buffers(self) -> None:
        """Free the stream windows kept between epochs and the in-RAM copy of a resident entry."""
        self._pool.clear()
        with self._lock:
            self._resident = None

    def verify(self) -> list[tuple[int, int, int]]:
        """Chunks whose CRC does not match, as ``(chunk, first_row, stop_row)``; empty when the data is intact."""
        return verify_checksums(self._meta, plan_stream(self._meta, self.ram_budget, 1).block_rows)

    @property
    def content_digest(self) -> str:
        """Hash of what the entry holds: row count, shapes, dtypes and every chunk's CRC (read from the file once).

        Reads that verify the CRCs serve exactly the bytes this digest describes, so it keys what was
        computed from the entry (a stage trained on it, the next stage's features)."""
        if self._digest is None:
            self._digest = content_digest(self._meta)
        return self._digest

    def _load_resident(self, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The whole entry in RAM, read once in chunk-aligned blocks (only when it fits half of ram_budget);
        with ``check`` every chunk's CRC is verified (once: a verified copy is kept)."""
        with self._lock:
            if self._resident is None or (check and not self._resident[2]):
                m = self._meta
                x = aligned_empty((m.num_rows, *m.feature_shape), m.stored_dtype)  # (N, *feature_shape)
                y = aligned_empty((m.num_rows, *m.label_shape), m.label_dtype)  # (N, *label_shape)
                reader = ScatterReader(m, check=check)
                try:
                    if m.num_rows:
                        reader.read(0, m.num_rows, Buffers(x, y))
                finally:
                    reader.close()
                self._resident = (x, y, check)
            return self._resident[0], self._resident[1]

    def __getstate__(self) -> dict[str, Any]:
        return {"_meta": self._meta, "ram_budget": self.ram_budget}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_meta"], state["ram_budget"])  # type: ignore[misc]
