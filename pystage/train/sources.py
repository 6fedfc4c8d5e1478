"""Where a stage's training batches come from: raw data, the feature store, or the frozen prefix recomputed.

Every source yields the single-process batches of an epoch: global batch ``i`` is rows
``order[i*B:(i+1)*B]`` of the epoch's order (``DatasetSource``: ``randperm`` seeded by ``(seed, epoch)``;
``StoreSource``: the stream order of one unsharded entry, ``pystage.store.order.epoch_order``). With
``part=(rank, size)`` (data-parallel) a source yields rank ``rank``'s contiguous part
``[rank*n//size, (rank+1)*n//size)`` of each global batch of ``n`` rows, so the union over ranks of step ``i``
is the single process's step ``i``; every rank yields as many batches (a part may be empty).
``global_rows(i)`` is the size of global batch ``i``: every rank knows it without communicating.

Batches come on the CPU, or already on the device: a tensor data set that fits the device budget is moved there
once (``DatasetSource(device=...)``, ``data_device``) and an entry held in device memory is gathered there, so
neither crosses the bus per batch. ``Feed`` (feed.py) moves the others (pinned, on a copy stream, one batch
ahead) and casts stored fp16/bf16 features on the device. ``prefetch``: whether a source's host work per batch
(row-by-row reads) is worth a background thread on the CPU.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

Batch = tuple[Tensor, Tensor]  # (x, y)
Part = tuple[int, int]  # (rank, size)


class BatchSource(Protocol):
    rows: int  # rows of one epoch (all ranks together)
    batch_size: int  # global batch size
    split_by_rank: bool  # yields this rank's part of each global batch
    prefetch: bool  # its batches cost host work worth overlapping (a background thread on the CPU)

    def batches(self, epoch: int) -> Iterator[Batch]: ...


def steps_per_epoch(source: BatchSource) -> int:
    return -(-source.rows // source.batch_size)


def global_rows(source: BatchSource, batch: int) -> int:
    """Rows of global batch ``batch`` (every batch is full but the last)."""
    return min(source.batch_size, source.rows - batch * source.batch_size)


def rank_parts(order: Any, batch_size: int, rank: int, size: int) -> Iterator[Any]:
    """This rank's contiguous part of each global batch of ``order``."""
    for i in range(0, len(order), batch_size):
        g = order[i:i + batch_size]
        yield g[rank * len(g) // size:(rank + 1) * len(g) // size]


def _seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def data_device(device: torch.device, store: Any, *datasets: Optional[Dataset]) -> Optional[torch.device]:
    """``device`` when it is a GPU and every dataset is two tensors (``.tensors``) that fit, together, the store's
    device budget (half the free device memory without a store); None: the data stays on the host."""
    from pystage.store.memory import budget_bytes

    data = [d for d in datasets if d is not None]
    tensors = [getattr(d, "tensors", None) for d in data]
    if torch.device(device).type == "cpu" or not data or any(t is None or len(t) != 2 for t in tensors):
        return None
    c = store.config if store is not None else None
    budget = budget_bytes(c.device_budget if c else "auto", device, c.ram_budget if c else 0)
    need = sum(x.numel() * x.element_size() for t in tensors for x in t)  # type: ignore[union-attr]
    return device if need <= budget else None


class DatasetSource:
    """Shuffled batches of a dataset: tensors (``.tensors``) are sliced directly, other datasets read row by row.

    ``device``: the tensors are moved there once and every batch is gathered there (the order is drawn on the
    CPU as without it, so the batches are the same)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 part: Part = (0, 1), device: Optional[torch.device] = None) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle, self.part = dataset, batch_size, seed, shuffle, part
        self.rows = len(dataset)  # type: ignore[arg-type]
        self.split_by_rank = part[1] > 1
        tensors = getattr(dataset, "tensors", None)
        self.tensors = tuple(tensors) if tensors is not None and len(tensors) == 2 else None
        if self.tensors is not None and device is not None:
            self.tensors = tuple(t.to(device) for t in self.tensors)  # (N, ...) each, held on the device
        self.prefetch = self.tensors is None  # row-by-row reads and collation

    def order(self, epoch: int) -> Tensor:
        gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
        return torch.randperm(self.rows, generator=gen) if self.shuffle else torch.arange(self.rows)

    def batches(self, epoch: int) -> Iterator[Batch]:
        order = self.order(epoch)
        if self.tensors is not None:
            x, y = self.tensors
            if x.device.type == "cuda":
                order = order.pin_memory().to(x.device, non_blocking=True)  # one small copy per epoch, no wait
            for idx in rank_parts(order, self.batch_size, *self.part):
                yield x[idx], y[idx]
            return
        parts = list(rank_parts(order, self.batch_size, *self.part))
        many = getattr(self.dataset, "__getitems__", None)  # one call per batch where the dataset offers it
        for idx in parts:
            if not len(idx):
                yield self._empty()
                continue
            rows = idx.tolist()
            yield default_collate(many(rows) if many else [self.dataset[i] for i in rows])

    def _empty(self) -> Batch:
        """An empty part of a global batch smaller than the world."""
        x0, y0 = default_collate([self.dataset[0]])
        return x0[:0], y0[:0]


class StoreSource:
    """Batches of stored features: one ``StoreEntry`` (streamed: windows, prefetch, checksums verified as read), or
    the shards of one split (a ``ShardSet``) read in the order one unsharded entry would be streamed."""

    def __init__(self, data: Any, batch_size: int, seed: int = 0, shuffle: bool = True, part: Part = (0, 1),
                 device: Optional[torch.device] = None) -> None:
        self.data, self.batch_size, self.seed, self.shuffle, self.part = data, batch_size, seed, shuffle, part
        self.device = device  # an entry's stream copies to it from its pinned windows (non-blocking)
        self.rows = data.num_rows
        self.split_by_rank = part[1] > 1
        self.prefetch = False  # the store's stream reads ahead in its own threads
        self.sharded = not hasattr(data, "stream")
        if self.split_by_rank and not self.sharded:
            raise ValueError("a StoreSource split by rank reads a ShardSet, got one entry")

    def batches(self, epoch: int) -> Iterator[Batch]:
        if not self.sharded:
            yield from self.data.stream(batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                                        device=self.device, check=True)
            return
        from pystage.store.order import epoch_order, global_meta

        meta = global_meta(self.data.meta, self.rows)
        order = epoch_order(meta, self.data.ram_budget, self.batch_size, self.shuffle, self.seed, epoch)
        for idx in rank_parts(order, self.batch_size, *self.part):
            yield self.data.rows(np.asarray(idx))


class PrefixSource:
    """Batches of ``inner`` pushed through frozen ``prefix`` modules every time (the paper's recompute)."""

    def __init__(self, inner: BatchSource, prefix: Sequence[nn.Module], feed: Any) -> None:
        self.inner, self.prefix, self.feed = inner, list(prefix), feed
        self.rows, self.batch_size, self.split_by_rank = inner.rows, inner.batch_size, inner.split_by_rank
        self.prefetch = False  # its work is compute on the training device

    def batches(self, epoch: int) -> Iterator[Batch]:
        for x, y in self.inner.batches(epoch):
            x, y = self.feed(x, y)
            with torch.no_grad():
                for module in self.prefix:
                    x = module(x)
            yield x, y
