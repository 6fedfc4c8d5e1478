"""The one training loop every method shares: steps over a batch source, and evaluation."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pystage import distributed
from pystage.optim import make_optimizer
from pystage.train.progress import Progress
from pystage.train.sources import BatchSource


class CheckpointedChain(nn.Module):
    """Runs layers in about sqrt(n) segments, each under ``torch.utils.checkpoint``.

    Only each segment's input is kept for backward; a segment's activations are
    recomputed when its backward runs (the usual sqrt(n) memory/compute trade).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        super().__init__()
        layers = [m for mod in modules for m in (mod if isinstance(mod, nn.Sequential) else [mod])]
        n_seg = max(1, round(math.sqrt(len(layers))))
        size = -(-len(layers) // n_seg)
        self.parts = nn.ModuleList(nn.Sequential(*layers[i:i + size]) for i in range(0, len(layers), size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = checkpoint(part, x, use_reentrant=False) if torch.is_grad_enabled() else part(x)
        return x


@dataclass
class Cursor:
    """Where a trial is in its data: completed epochs, steps, and batches done of the current epoch.

    Successive halving stops trials mid-epoch; ``batch`` lets the next call continue that epoch where it
    stopped instead of starting it again.
    """

    epoch: int = 0
    steps: int = 0
    batch: int = 0


@dataclass
class StepStats:
    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    measured_peak: Optional[int] = None  # bytes of live tensors during the measured step (see train_steps)

    @property
    def accuracy(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")


def _step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple:
    logits = net(x)  # (B, num_classes)
    weight = distributed.loss_weight(net, len(y))  # DDP: ranks' summed losses, averaged, make the global mean
    loss = F.cross_entropy(logits, y) if weight is None else F.cross_entropy(logits, y, reduction="sum") * weight
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits.detach(), (loss.detach() if weight is None else loss.detach() / (weight * max(len(y), 1)))


def measured_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> tuple:
    """A training step under live-tensor accounting: (logits, loss, peak bytes of parameters, optimizer state,
    batch, activations and gradients) - the quantity the planner predicts."""
    from pystage.memory import LiveBytes

    tracker = LiveBytes(x.device, 512 if x.device.type == "cuda" else 1)
    state = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    tracker.track([*net.parameters(), *net.buffers(), *state, x, y])
    with tracker:
        logits, loss = _step(net, optimizer, x, y)
    return logits, loss, tracker.peak


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, source: BatchSource, n_steps: Optional[int],
                cursor: Cursor, progress: Progress, desc: str = "", measure_at: int = -1) -> StepStats:
    """Train ``n_steps`` batches (``None``: the rest of the current epoch), crossing epochs as needed.

    ``measure_at``: the (global) step whose live tensor bytes are measured (step 1 is the steady state: the
    optimizer state exists); -1 measures none. Returns running stats.
    """
    net.train()
    stats = StepStats()
    remaining = n_steps
    while remaining is None or remaining > 0:
        batches = itertools.islice(source.batches(cursor.epoch), cursor.batch, None)  # continue a stopped epoch
        for x, y in progress.wrap(batches, desc=f"{desc} epoch {cursor.epoch + 1}"):
            if cursor.steps == measure_at:
                logits, loss, stats.measured_peak = measured_step(net, optimizer, x, y)
            else:
                logits, loss = _step(net, optimizer, x, y)
            stats.loss += float(loss) * len(y)
            stats.correct += int((logits.argmax(1) == y).sum())
            stats.seen += len(y)
            cursor.steps += 1
            cursor.batch += 1
            if remaining is not None:
                remaining -= 1
                if remaining == 0:
                    break
        else:
            cursor.epoch += 1
            cursor.batch = 0
            if remaining is None:
                break
    if distributed.is_ddp(net):  # each rank saw its part of every global batch
        stats.loss, correct, seen = distributed.all_sum(stats.loss, stats.correct, stats.seen)
        stats.correct, stats.seen = int(correct), int(seen)
    stats.loss /= max(stats.seen, 1)
    return stats


@torch.no_grad()
def evaluate(net: nn.Module, source: Optional[BatchSource]) -> Optional[float]:
    """Accuracy of ``net`` on every batch of ``source`` (epoch 0 order; order does not matter)."""
    if source is None:
        return None
    net = distributed.unwrap(net)
    net.eval()
    correct = seen = 0
    for x, y in source.batches(0):
        correct += int((net(x).argmax(1) == y).sum())
        seen += len(y)
    if getattr(source, "split_by_rank", False):  # each rank evaluated its part of every batch
        correct, seen = (int(v) for v in distributed.all_sum(correct, seen))
    return correct / seen if seen else None
