"""Fill windows ahead of the consumer: each window's blocks are read at once by a small thread pool.

The reads are os.preadv calls (scatter.py), which release the GIL, so they overlap with each other
(several requests in flight for a cold cache) and with the consumer's work. Each window's row
permutation is drawn when the window is started, in window order, so the order depends only on
``(seed, epoch, worker)``.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np

from pystage.store.format import EntryMeta
from pystage.store.scatter import ScatterReader
from pystage.store.window import Window, WindowPool

READ_THREADS = max(2, min(4, os.cpu_count() or 1))  # preadv calls in flight at once
THREAD_NAME = "pystage-store-prefetch"


class Filling:
    """A window whose blocks are being read into rows ``[lead, lead + rows)``; ``wait()`` returns it once
    every block is in. Rows ``[0, lead)`` are left for the previous window's last, incomplete batch."""

    def __init__(self, window: Window, lead: int, rows: int, futures: list[Future]) -> None:
        self.window, self.lead, self.rows, self.futures = window, lead, rows, futures

    def wait(self) -> Window:
        for f in self.futures:
            f.result()  # re-raises a read error (StoreCorruptError...) in the consumer
        return self.window


class WindowFiller:
    """Starts windows (groups of blocks) into pooled buffers; ``close()`` waits for reads in flight."""

    def __init__(self, meta: EntryMeta, pool: WindowPool, capacity: int, pinned: bool, shuffle: bool,
                 rng: np.random.Generator, check: bool) -> None:
        self.meta, self.pool, self.capacity, self.pinned, self.shuffle, self.rng = meta, pool, capacity, pinned, shuffle, rng
        self.reader = ScatterReader(meta, check=check)
        self.executor = ThreadPoolExecutor(READ_THREADS, thread_name_prefix=THREAD_NAME)
        self.started: list[Filling] = []

    def acquire(self, new: bool) -> Optional[Window]:
        return self.pool.acquire(self.capacity, self.meta, self.pinned, new)

    def start(self, group: list[tuple[int, int]], window: Window, lead: int) -> Filling:
        """Read ``group``'s blocks into ``window`` after ``lead`` rows, permuted within the window when shuffling."""
        n = sum(b - a for a, b in group)
        dest: Optional[np.ndarray] = None
        if self.shuffle:
            order = self.rng.permutation(n)  # batch position p holds the window's row order[p]
            dest = np.empty(n, np.int64)
            dest[order] = np.arange(lead, lead + n)  # so window row j is read into position dest[j]
        futures, at = [], lead
        for a, b in group:
            part = None if dest is None else dest[at - lead:at - lead + b - a]
            futures.append(self.executor.submit(self.reader.read, a, b, window, part, at))
            at += b - a
        filling = Filling(window, lead, n, futures)
        self.started.append(filling)
        return filling

    def close(self) -> None:
        for filling in self.started:
            for f in filling.futures:
                f.cancel()
        self.executor.shutdown(wait=True)
        for filling in self.started:
            filling.window.busy = False  # unfinished contents are overwritten by the next fill
        self.started = []
        self.reader.close()
