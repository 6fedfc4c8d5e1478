"""The one training loop every method shares: steps over a batch source, and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pystage.train.config import TrainConfig
from pystage.train.progress import Progress
from pystage.train.sources import BatchSource


class CheckpointedChain(nn.Module):
    """Runs modules in sequence, each under ``torch.utils.checkpoint`` (activations recomputed in backward)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = checkpoint(part, x, use_reentrant=False) if torch.is_grad_enabled() else part(x)
        return x


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Cursor:
    """Where a trial is in its data: completed epochs and steps (successive halving stops trials mid-epoch)."""

    epoch: int = 0
    steps: int = 0


@dataclass
class StepStats:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource, n_steps: Optional[int],
                cursor: Cursor, progress: Progress, desc: str = "") -> StepStats:
    """Train ``n_steps`` batches (``None``: one whole epoch), crossing epochs as needed; returns running stats."""
    net.train()
    stats = StepStats()
    remaining = n_steps
    while remaining is None or remaining > 0:
        for x, y in progress.wrap(source.batches(cursor.epoch), desc=f"{desc} epoch {cursor.epoch + 1}"):
            logits = net(x)  # (B, num_classes)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            stats.loss += loss.item() * len(y)
            stats.correct += int((logits.argmax(1) == y).sum())
            stats.seen += len(y)
            cursor.steps += 1
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    break
        else:
            cursor.epoch += 1
            if remaining is None:
                break
    stats.loss /= max(stats.seen, 1)
    return stats


@torch.no_grad()
def evaluate(net: nn.Module, source: Optional[BatchSource]) -> Optional[float]:
    """Accuracy of ``net`` on every batch of ``source`` (epoch 0 order; order does not matter)."""
    if source is None:
        return None
    net.eval()
    correct = seen = 0
    for x, y in source.batches(0):
        correct += int((net(x).argmax(1) == y).sum())
        seen += len(y)
    return correct / seen if seen else None
