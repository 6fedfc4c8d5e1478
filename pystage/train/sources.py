"""Where a stage's training batches come from: raw data, the feature store, or the frozen prefix recomputed."""
from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

Batch = tuple[Tensor, Tensor]  # (x, y)


class BatchSource(Protocol):
    rows: int

    def batches(self, epoch: int) -> Iterator[Batch]: ...


def _seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


class DatasetSource:
    """Shuffled batches of a dataset; a dataset holding tensors (``.tensors``) is sliced directly, others use a DataLoader."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 device: Optional[torch.device] = None, num_workers: int = 0) -> None:
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.device, self.num_workers = device, num_workers
        self.rows = len(dataset)  # type: ignore[arg-type]

    def batches(self, epoch: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(_seed(self.seed, epoch))
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is not None and len(tensors) == 2:
            order = torch.randperm(self.rows, generator=gen) if self.shuffle else torch.arange(self.rows)
            for i in range(0, self.rows, self.batch_size):
                idx = order[i:i + self.batch_size]
                yield self._to(tensors[0][idx]), self._to(tensors[1][idx])
            return
        loader = DataLoader(self.dataset, self.batch_size, shuffle=self.shuffle, generator=gen,
                            num_workers=self.num_workers)
        for x, y in loader:
            yield self._to(x), self._to(y)

    def _to(self, t: Tensor) -> Tensor:
        return t if self.device is None else t.to(self.device, non_blocking=True)


class StoreSource:
    """Batches streamed from a feature-store entry (stored outputs of the stage before)."""

    def __init__(self, entry, batch_size: int, seed: int = 0, shuffle: bool = True,
                 device: Optional[torch.device] = None) -> None:
        self.entry, self.batch_size, self.seed, self.shuffle, self.device = entry, batch_size, seed, shuffle, device
        self.rows = entry.num_rows

    def batches(self, epoch: int) -> Iterator[Batch]:
        for x, y in self.entry.stream(batch_size=self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch,
                                      device=self.device):
            yield x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, y


class PrefixSource:
    """Batches of ``inner`` pushed through frozen ``prefix`` modules every time (the paper's recompute)."""

    def __init__(self, inner: BatchSource, prefix: Sequence[nn.Module]) -> None:
        self.inner, self.prefix = inner, list(prefix)
        self.rows = inner.rows
        self.split_by_rank = getattr(inner, "split_by_rank", False)  # distributed: inner yields this rank's part

    def batches(self, epoch: int) -> Iterator[Batch]:
        for x, y in self.inner.batches(epoch):
            with torch.no_grad():
                for module in self.prefix:
                    x = module(x)
            yield x, y
