"""Batch sources for data-parallel ranks: the single-process global batches, each cut into contiguous rank parts.

Global batch ``i`` is rows ``order[i*B:(i+1)*B]`` of the epoch's order, where the order is exactly the one a
single process uses (``DatasetSource``: ``randperm`` of ``(seed, epoch)``; ``StoreSource``: the stream order of
one unsharded entry, ``pystage.store.order.epoch_order``). Rank ``r`` of ``size`` takes positions
``[r*n//size, (r+1)*n//size)`` of each global batch of ``n`` rows, so the union over ranks of step ``i`` is the
single process's step ``i``. Every rank yields the same number of batches (a part may be empty).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from pystage.store.order import epoch_order, global_meta
from pystage.train.sources import Batch, _seed


def rank_parts(order: Any, batch_size: int, rank: int, size: int) -> Iterator[Any]:
    """This rank's contiguous part of each global batch of ``order``."""
    for i in range(0, len(order), batch_size):
        g = order[i:i + batch_size]
        yield g[rank * len(g) // size:(rank + 1) * len(g) // size]


class ShardedDatasetSource:
    """``DatasetSource``'s global batches (same permutation), this rank's part of each."""

    split_by_rank = True

    def __init__(self, dataset: Dataset, batch_size: int, rank: int, size: int, seed: int = 0, shuffle: bool = True,
                 device: Optional[torch.device] = None) -> None:
        self.dataset, self.batch_size, self.rank, self.size = dataset, batch_size, rank, size
        self.seed, self.shuffle, self.device = seed, shuffle, device
        self.rows = len(dataset)  # type: ignore[arg-type]

    def batches(self, epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
        order = torch.randperm(self.rows, generator=gen) if self.shuffle else torch.arange(self.rows)
        tensors = getattr(self.dataset, "tensors", None)
        for idx in rank_parts(order, self.batch_size, self.rank, self.size):
            if tensors is not None and len(tensors) == 2:
                x, y = tensors[0][idx], tensors[1][idx]
            elif len(idx):
                x, y = default_collate([self.dataset[int(i)] for i in idx])
            else:  # an empty part of a global batch smaller than the world
                x0, y0 = default_collate([self.dataset[0]])
                x, y = x0[:0], y0[:0]
            yield self._to(x), self._to(y)

    def _to(self, t: Tensor) -> Tensor:
        return t if self.device is None else t.to(self.device, non_blocking=True)


class ShardedStoreSource:
    """``StoreSource``'s global batches over the shards of one split (a ``ShardSet``), this rank's part of each.

    The order is the one ``StoreEntry.stream`` gives an unsharded entry of the same rows: a function of
    (seed, epoch, rows, row bytes, ram budget, batch size) and never of the world size.
    """

    split_by_rank = True

    def __init__(self, shards: Any, batch_size: int, rank: int, size: int, ram_budget: int, seed: int = 0,
                 shuffle: bool = True, device: Optional[torch.device] = None) -> None:
        self.shards, self.batch_size, self.rank, self.size = shards, batch_size, rank, size
        self.ram_budget, self.seed, self.shuffle, self.device = ram_budget, seed, shuffle, device
        self.rows = shards.num_rows
        self._meta = global_meta(shards.meta, self.rows)

    def batches(self, epoch: int) -> Iterator[Batch]:
        order = epoch_order(self._meta, self.ram_budget, self.batch_size, self.shuffle, self.seed, epoch)
        for idx in rank_parts(order, self.batch_size, self.rank, self.size):
            x, y = self.shards.rows(np.asarray(idx))
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            if self.device is not None and self.device.type != "cpu":
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y
