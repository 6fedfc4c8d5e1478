"""Per-stage hyper-parameter search: random exponential draws of (lr, L2) with successive halving.

As in Griswold's partial-learning experiments, the search starts from one
(lr, weight_decay) point and adds ``draws`` random points ``start * 10**z``,
``z ~ N(0, sigma)`` for each of the two. Successive halving trains every trial
for a fraction of the epochs, keeps the better half (by validation accuracy),
and continues the survivors until the last one has trained all epochs. Every
trial of a stage reads the same batch source (for ``partial``: the same stored
features of the stage before).
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from torch import nn

from pystage.train.config import TrainConfig
from pystage.train.loop import Cursor, StepStats, evaluate, make_optimizer, train_steps
from pystage.train.progress import Progress
from pystage.train.sources import BatchSource


@dataclass(frozen=True)
class SearchConfig:
    """``draws`` random points besides the start point; ``halving`` prunes the worse half at every rung."""

    draws: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sigma: float = 1.0  # standard deviation of the base-10 exponent of each draw
    halving: bool = True
    eta: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.draws < 0 or self.eta < 2 or self.sigma < 0:
            raise ValueError(f"need draws >= 0, eta >= 2, sigma >= 0; got draws={self.draws}, eta={self.eta}, "
                             f"sigma={self.sigma}")


def draw_configs(search: SearchConfig, base: TrainConfig, salt: str = "") -> list[TrainConfig]:
    """The start point, then ``search.draws`` log-normal draws around it (same search + salt -> same draws)."""
    rng = random.Random(f"{search.seed}:{salt}")
    start = replace(base, lr=search.lr, weight_decay=search.weight_decay)
    draws = [replace(start, lr=search.lr * 10 ** rng.gauss(0, search.sigma),
                     weight_decay=search.weight_decay * 10 ** rng.gauss(0, search.sigma))
             for _ in range(search.draws)]
    return [start, *draws]


@dataclass
class Trial:
    config: TrainConfig
    net: nn.Module
    cursor: Cursor = field(default_factory=Cursor)
    stats: StepStats = field(default_factory=StepStats)
    val_acc: Optional[float] = None

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer([p for p in self.net.parameters() if p.requires_grad], self.config)

    def score(self) -> float:
        return self.val_acc if self.val_acc is not None else self.stats.accuracy


def rung_budgets(n_trials: int, total_steps: int, eta: int) -> list[tuple[int, int]]:
    """(steps to reach, survivors after) per rung; the last rung trains the survivors to ``total_steps``."""
    rungs = 1
    while eta ** rungs < n_trials:  # ceil(log_eta(n_trials)) in integers: math.log(125, 5) is 3.0000000000000004
        rungs += 1
    out = []
    for r in range(rungs):
        steps = max(1, round(total_steps / eta ** (rungs - 1 - r)))
        survivors = max(1, math.ceil(n_trials / eta ** (r + 1)))
        out.append((steps, survivors))
    return out


def run_search(make_net: Callable[[], nn.Module], configs: list[TrainConfig], source: BatchSource,
               val_source: Optional[BatchSource], epochs: int, steps_per_epoch: int, halving: bool, eta: int,
               progress: Progress, desc: str = "", measure: bool = False) -> tuple[Trial, list[dict]]:
    """Train the trials (successive halving if asked); returns the best trial and a summary of every trial."""
    trials = [Trial(c, make_net()) for c in configs]
    total = epochs * steps_per_epoch
    budgets = rung_budgets(len(trials), total, eta) if halving and len(trials) > 1 else [(total, 1)]
    alive, summary = list(trials), {}
    for reach, keep in budgets:
        for i, t in enumerate(alive):
            first = t.cursor.steps == 0 and t is trials[0]
            measured = t.stats.measured_peak
            t.stats = train_steps(t.net, t.optimizer, source, reach - t.cursor.steps, t.cursor, progress,
                                  desc=f"{desc} trial {trials.index(t) + 1}/{len(trials)}",
                                  measure_at=1 if first and measure else -1)
            t.stats.measured_peak = t.stats.measured_peak or measured
            t.val_acc = evaluate(t.net, val_source)
            summary[id(t)] = {"lr": t.config.lr, "weight_decay": t.config.weight_decay, "steps": t.cursor.steps,
                              "val_acc": t.val_acc, "train_acc": t.stats.accuracy}
        alive.sort(key=lambda t: -_finite(t.score()))
        alive = alive[:keep]
    return alive[0], [summary[id(t)] for t in trials]


def _finite(x: float) -> float:
    return x if x == x else -1.0  # NaN (no batches seen) ranks last


def clone(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net)
