"""Incremental training (Istrate et al.): grow the net sub-network by sub-network; angle criterion; look-ahead init.

The sub-networks S1..Sn are the stages of the model (its ``split_points``). Step 1 trains S1 + its
classifier; when the angle criterion fires (or ``max_epochs_per_step`` is reached) S(k+1) is inserted
before the classifier: with ``init="lookahead"`` it is first trained alone (+ classifier) for
``lookahead_epochs`` on the frozen outputs of S1..Sk, read from the feature store; then the whole prefix
S1..S(k+1) trains jointly under the criterion again. The classifier is the head of the newest stage
(a fresh linear head: the feature shape changes with each insertion).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from pystage.staged import StagedNet
from pystage.store import FeatureStore, dataset_fingerprint
from pystage.train.cache import stage_key
from pystage.train.config import TrainConfig
from pystage.train.loop import Cursor, evaluate, make_optimizer, train_steps
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.sources import BatchSource, DatasetSource, StoreSource

log = logging.getLogger(__name__)
INITS = ("lookahead", "random")


class GrowthConfigError(ValueError):
    """A growth option out of range; the message names the option, its value and the valid range."""


@dataclass(frozen=True)
class IncrementalConfig:
    """Options of ``fit(method="incremental", growth=IncrementalConfig(...))``.

    ws: window size in epochs of the angle criterion (>= 2: a line needs two points).
    gamma: stop a step when alpha_i <= gamma * alpha_(i-1).
    acc_scale: accuracy units of the fitted line (100: percent per epoch); the angle depends on it.
    max_epochs_per_step: cap on the joint epochs of each step (None: ``fit``'s ``epochs``).
    val_fraction: held out of ``train`` for the criterion when ``fit`` gets no ``val``.
    """

    ws: int = 3
    gamma: float = 0.5
    lookahead_epochs: int = 2
    init: str = "lookahead"
    max_epochs_per_step: Optional[int] = None
    acc_scale: float = 100.0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.ws < 2 or not 0.0 <= self.gamma <= 1.0 or self.lookahead_epochs < 0:
            raise GrowthConfigError(f"need ws >= 2, gamma in [0, 1], lookahead_epochs >= 0; got ws={self.ws}, "
                                    f"gamma={self.gamma}, lookahead_epochs={self.lookahead_epochs}")
        if self.init not in INITS:
            raise GrowthConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.max_epochs_per_step is not None and self.max_epochs_per_step < 1:
            raise GrowthConfigError(f"max_epochs_per_step must be >= 1 or None, got {self.max_epochs_per_step}")


@dataclass
class GrowthReport(FitReport):
    """A ``FitReport`` plus the growth history: one dict per epoch (or growth event) of the run."""

    history: list[dict[str, Any]] = field(default_factory=list)


def window_angle(points: Sequence[float], scale: float = 100.0) -> float:
    """Angle in degrees between the x axis and the least-squares line through ``(i, scale * points[i])``."""
    n = len(points)
    if n < 2:
        raise GrowthConfigError(f"a window needs at least 2 points to fit a line, got {n}")
    xm, ym = (n - 1) / 2, scale * sum(points) / n
    slope = sum((i - xm) * (scale * p - ym) for i, p in enumerate(points)) / sum((i - xm) ** 2 for i in range(n))
    return math.degrees(math.atan(slope))


class AngleCriterion:
    """Every ``ws`` points, the angle of the last ``ws``; ``update`` is True once alpha_i <= gamma * alpha_(i-1).

    A falling previous window (alpha_(i-1) <= 0) counts as 0: the step then stops as soon as accuracy stops rising.
    """

    def __init__(self, ws: int, gamma: float, scale: float = 100.0) -> None:
        self.ws, self.gamma, self.scale = ws, gamma, scale
        self.points: list[float] = []
        self.angles: list[float] = []

    def update(self, acc: float) -> bool:
        self.points.append(acc)
        if len(self.points) % self.ws:
            return False
        self.angles.append(window_angle(self.points[-self.ws:], self.scale))
        if len(self.angles) < 2:
            return False
        return self.angles[-1] <= self.gamma * max(self.angles[-2], 0.0)


def fit_incremental(model: nn.Module, train: Dataset, val: Optional[Dataset], growth: Optional[IncrementalConfig], *,
                    epochs: int, batch_size: int, device: torch.device, config: TrainConfig, seed: int = 0,
                    store: Optional[FeatureStore] = None, head: str = "linear", progress: Optional[Progress] = None,
                    store_dtype: torch.dtype = torch.float16, **_: Any) -> FitResult:
    """Train ``model`` (``nn.Sequential`` with ``split_points``, or ``StagedNet``) incrementally; see the module doc."""
    cfg = growth if growth is not None else IncrementalConfig()
    if not isinstance(cfg, IncrementalConfig):
        raise TypeError(f"growth must be an IncrementalConfig for method='incremental', got {type(cfg).__name__}")
    if val is None:
        from pystage.data import train_val_split

        train, val = train_val_split(train, val_fraction=cfg.val_fraction, seed=seed)
    net = _staged(model, train, head).to(device)
    if cfg.init == "lookahead" and len(net) > 1 and store is None:
        store = FeatureStore()
    run = _Incremental(cfg, epochs, batch_size, device, config, seed, store, progress or Progress(False), store_dtype)
    return run.fit(net, train, val)


def _staged(model: nn.Module, train: Dataset, head: str) -> StagedNet:
    if isinstance(model, StagedNet):
        return model
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential (with split_points) or a StagedNet, "
                        f"got {type(model).__name__}")
    x0, _ = train[0]
    classes = getattr(train, "num_classes", None) or getattr(model, "num_classes", None)
    return StagedNet.from_sequential(model, input_shape=tuple(x0.shape), num_classes=classes, head=head)


class _Incremental:
    def __init__(self, cfg: IncrementalConfig, epochs: int, batch_size: int, device: torch.device, config: TrainConfig,
                 seed: int, store: Optional[FeatureStore], progress: Progress, store_dtype: torch.dtype) -> None:
        self.cfg, self.cap = cfg, cfg.max_epochs_per_step or epochs
        self.batch_size, self.device, self.config, self.seed = batch_size, device, config, seed
        self.store, self.progress, self.store_dtype = store, progress, store_dtype

    def fit(self, net: StagedNet, train: Dataset, val: Dataset) -> FitResult:
        t0 = time.perf_counter()
        report = GrowthReport("incremental", self.cap, self.batch_size, str(self.device), PeakMeter(self.device).source)
        src = DatasetSource(train, self.batch_size, self.seed, device=self.device)
        val_src = DatasetSource(val, self.batch_size, shuffle=False, device=self.device)
        for k in range(len(net)):
            with PeakMeter(self.device) as meter:
                t = time.perf_counter()
                srep = StageReport(stage=k + 1, layers="1" if k == 0 else f"1-{k + 1}", seconds=0.0, peak_mem_mib=0.0,
                                   train_acc=None, val_acc=None, lr=self.config.lr,
                                   weight_decay=self.config.weight_decay)
                if k > 0 and self.cfg.init == "lookahead" and self.cfg.lookahead_epochs > 0:
                    self._lookahead(net, k, train, val, srep, report.history)
                self._joint(net, k, src, val_src, srep, report.history)
                srep.seconds = time.perf_counter() - t
            srep.peak_mem_mib = meter.peak_mib
            report.stages.append(srep)
            log.info("incremental step %d: val_acc=%.4f after %.1fs", k + 1, srep.val_acc or float("nan"), srep.seconds)
        report.wall_s = time.perf_counter() - t0
        net.drop_heads().eval()
        return FitResult(net, report)

    def _joint(self, net: StagedNet, k: int, src: BatchSource, val_src: BatchSource, srep: StageReport,
               history: list[dict]) -> None:
        """Train S1..S(k+1) + the classifier together until the angle criterion fires or the cap is reached."""
        prefix = nn.Sequential(*net.bodies[: k + 1])
        trainable = nn.Sequential(prefix, net.stages[k].head)
        for p in trainable.parameters():
            p.requires_grad_(True)
        optimizer = make_optimizer(trainable.parameters(), self.config)
        criterion, cursor = AngleCriterion(self.cfg.ws, self.cfg.gamma, self.cfg.acc_scale), Cursor()
        stop = False
        while cursor.epoch < self.cap and not stop:
            stats = train_steps(trainable, optimizer, src, None, cursor, self.progress, f"grow {k + 1} joint")
            acc = evaluate(trainable, val_src)
            stop = criterion.update(acc)
            history.append({"step": k + 1, "phase": "joint", "epoch": cursor.epoch, "train_loss": stats.loss,
                            "train_acc": stats.accuracy, "val_acc": acc,
                            "angle": criterion.angles[-1] if len(criterion.points) % self.cfg.ws == 0 else None,
                            "stop": stop})
            srep.train_acc, srep.val_acc = stats.accuracy, acc
        srep.stage_key = stage_key(body=prefix, head=net.stages[k].head, purpose="incremental", step=k + 1)

    def _lookahead(self, net: StagedNet, k: int, train: Dataset, val: Dataset, srep: StageReport,
                   history: list[dict]) -> None:
        """Train S(k+1) + classifier alone on the stored outputs of the frozen S1..Sk (the look-ahead init)."""
        assert self.store is not None
        prefix = nn.Sequential(*net.bodies[:k])
        t = time.perf_counter()
        entries = []
        for split, data in (("train", train), ("val", val)):
            key = self.store.key(upstream=dataset_fingerprint(data), module=prefix, dtype=self.store_dtype,
                                 split=split, extra="incremental-lookahead")
            entries.append(self.store.build(key, prefix, data, batch_size=max(self.batch_size, 256),
                                            device=self.device, storage_dtype=self.store_dtype,
                                            progress=self.progress.enabled))
        srep.store_seconds = time.perf_counter() - t
        srep.store_key, srep.store_bytes = entries[0].key, sum(e.nbytes for e in entries)
        for p in prefix.parameters():
            p.requires_grad_(False)
        trainable = nn.Sequential(net.bodies[k], net.stages[k].head)
        optimizer = make_optimizer(trainable.parameters(), self.config)
        src = StoreSource(entries[0], self.batch_size, self.seed, device=self.device)
        val_src = StoreSource(entries[1], self.batch_size, shuffle=False, device=self.device)
        cursor = Cursor()
        while cursor.epoch < self.cfg.lookahead_epochs:
            stats = train_steps(trainable, optimizer, src, None, cursor, self.progress, f"grow {k + 1} look-ahead")
            history.append({"step": k + 1, "phase": "lookahead", "epoch": cursor.epoch, "train_loss": stats.loss,
                            "train_acc": stats.accuracy, "val_acc": evaluate(trainable, val_src), "angle": None,
                            "stop": False})
