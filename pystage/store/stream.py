"""Shuffled, prefetched streaming of an entry in batches, under a RAM budget (and its DataLoader dataset)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pystage.store.errors import StoreArgumentError
from pystage.store.format import EntryMeta
from pystage.store.prefetch import Filling, WindowFiller
from pystage.store.window import WindowPool

log = logging.getLogger(__name__)
BLOCK_BYTES = 4 << 20  # largest contiguous read; blocks are whole chunks


@dataclass(frozen=True)
class StreamPlan:
    """How a stream uses its RAM budget: the whole entry in RAM, or two windows of whole blocks."""

    resident: bool
    block_rows: int
    window_rows: int


@dataclass(frozen=True)
class StreamOptions:
    """One epoch's stream: batch size, order, rows, device."""

    batch_size: int = 50
    shuffle: bool = True
    seed: int = 0
    epoch: int = 0
    drop_last: bool = False
    device: Optional[torch.device] = None
    check: bool = False  # verify each chunk's CRC as it is read
    worker: tuple[int, int] = (0, 1)  # (index, count): this worker reads every count-th block of the epoch's order
    rows: Optional[tuple[int, int]] = None  # a row range (sequential reads for build); None: all rows

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise StoreArgumentError("batch_size", self.batch_size, "a positive int")
        for name in ("seed", "epoch"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise StoreArgumentError(name, getattr(self, name), "a non-negative int")


def plan_stream(meta: EntryMeta, ram_budget: int, batch_size: int, workers: int = 1) -> StreamPlan:
    """Resident if the entry fits half the (per-worker) budget; else two windows of a quarter of it each."""
    budget = ram_budget // max(1, workers)
    row = meta.row_bytes + meta.label_row_bytes
    cr = meta.chunk_rows
    if meta.nbytes + 2 * batch_size * row <= budget // 2:
        return StreamPlan(True, cr, meta.num_rows)
    if budget // 4 < cr * row:
        log.warning("ram_budget %d bytes (per worker) holds less than four %d-byte chunks of %s: streaming one chunk "
                    "at a time, above the budget", budget, cr * row, meta.path)
    window_chunks = max(1, budget // 4 // (cr * row))
    block_chunks = max(1, min(BLOCK_BYTES // (cr * row), window_chunks // 8))
    window_chunks = max(block_chunks, window_chunks // block_chunks * block_chunks)
    return StreamPlan(False, block_chunks * cr, window_chunks * cr)


def _blocks(meta: EntryMeta, plan: StreamPlan, opts: StreamOptions, rng: np.random.Generator) -> list[tuple[int, int]]:
    """This worker's blocks ``(start, stop)`` in epoch order: chunk-grid aligned, clipped to ``opts.rows``."""
    lo, hi = opts.rows or (0, meta.num_rows)
    br = plan.block_rows
    edges = [lo] + list(range((lo // br + 1) * br, hi, br)) + [hi]
    blocks = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    if opts.shuffle:
        blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    index, count = opts.worker
    return blocks[index::count]


def _windows(blocks: list[tuple[int, int]], window_rows: int) -> list[list[tuple[int, int]]]:
    groups: list[list[tuple[int, int]]] = [[]]
    rows = 0
    for a, b in blocks:
        if rows + b - a > window_rows and groups[-1]:
            groups.append([])
            rows = 0
        groups[-1].append((a, b))
        rows += b - a
    return [g for g in groups if g]


def _emit(x: np.ndarray, y: np.ndarray, meta: EntryMeta, device: Optional[torch.device]) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if meta.dtype == torch.bfloat16 else torch.from_numpy(x)
    yt = torch.from_numpy(y)
    if device is not None and device.type != "cpu":
        return xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)
    return xt, yt


def cut_batches(filler: WindowFiller, groups: list[list[tuple[int, int]]], meta: EntryMeta, opts: StreamOptions
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches as views of filled windows (rows already permuted by the read).

    A window is read after ``lead`` spare rows, where the previous window's last, incomplete batch is
    copied (fewer than batch_size rows), so every batch is one contiguous slice. The next window is started
    as soon as a pooled buffer is free, at the latest once the first batch of the current window has been
    taken (by then a normal loop has dropped the previous window's batches).
    """
    bsz, device = opts.batch_size, opts.device
    cuda = device is not None and device.type == "cuda"
    if not groups:
        return
    nxt: Optional[Filling] = filler.start(groups[0], filler.acquire(new=True), 0)  # type: ignore[arg-type]
    for i in range(len(groups)):
        filling, nxt = nxt, None
        window = filling.wait()  # type: ignore[union-attr]
        total = filling.lead + filling.rows  # type: ignore[union-attr]
        more, lead = i + 1 < len(groups), total % bsz  # lead: rows carried into the next window
        if more:
            w = filler.acquire(new=False)
            nxt = None if w is None else filler.start(groups[i + 1], w, lead)
        for pos in range(0, total - lead, bsz):
            yield _emit(window.x[pos:pos + bsz], window.y[pos:pos + bsz], meta, device)
            if more and nxt is None:  # the previous window is free now unless the caller kept one of its batches
                nxt = filler.start(groups[i + 1], filler.acquire(new=True), lead)  # type: ignore[arg-type]
        if more:
            if nxt is None:
                nxt = filler.start(groups[i + 1], filler.acquire(new=True), lead)  # type: ignore[arg-type]
            nxt.window.x[:lead] = window.x[total - lead:total]  # rows [0, lead) are not being read into
            nxt.window.y[:lead] = window.y[total - lead:total]
        elif lead and not opts.drop_last:
            yield _emit(window.x[total - lead:total], window.y[total - lead:total], meta, device)
        window.release(cuda)
        del window


def iter_stream(meta: EntryMeta, ram_budget: int, opts: StreamOptions, pool: Optional[WindowPool] = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` batches read from the file in windows (an entry held in memory is served by
    ``memory.memory_batches`` in the same order).

    ``pool`` keeps window buffers between epochs (StoreEntry passes its own); None: a pool for this epoch.
    """
    plan = plan_stream(meta, ram_budget, opts.batch_size, opts.worker[1])
    rng = np.random.default_rng((opts.seed, opts.epoch, 0))
    blocks = _blocks(meta, plan, opts, rng)
    rows_rng = np.random.default_rng((opts.seed, opts.epoch, 1 + opts.worker[0]))
    groups = _windows(blocks, plan.window_rows)
    capacity = min(plan.window_rows, max((sum(b - a for a, b in g) for g in groups), default=1)) + opts.batch_size - 1
    pinned = opts.device is not None and opts.device.type == "cuda"
    filler = WindowFiller(meta, pool if pool is not None else WindowPool(), capacity, pinned, opts.shuffle, rows_rng,
                          opts.check)
    try:
        yield from cut_batches(filler, groups, meta, opts)
    finally:
        filler.close()


class StoreDataset(IterableDataset):
    """An entry as an IterableDataset of ready batches; use ``DataLoader(ds, batch_size=None, num_workers=k)``.

    Each worker opens the file itself (lazily, in the worker) and reads every k-th block of the epoch's
    shuffled block order, with ``ram_budget / k``. Call ``set_epoch(e)`` before each epoch for a new order.
    """

    def __init__(self, meta: EntryMeta, ram_budget: int, opts: StreamOptions) -> None:
        super().__init__()
        self.meta, self.ram_budget, self.opts = meta, ram_budget, opts
        self._pool: Optional[WindowPool] = None  # made in the worker process, kept across its epochs

    def set_epoch(self, epoch: int) -> None:
        self.opts = StreamOptions(**{**self.opts.__dict__, "epoch": epoch})

    def __len__(self) -> int:
        n, b = self.meta.num_rows, self.opts.batch_size
        return n // b if self.opts.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = (info.id, info.num_workers) if info is not None else (0, 1)
        opts = StreamOptions(**{**self.opts.__dict__, "worker": worker})
        if self._pool is None:
            self._pool = WindowPool()
        return iter_stream(self.meta, self.ram_budget, opts, pool=self._pool)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pool": None}  # window buffers stay in the process that made them
