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
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from pystage.staged import StagedNet
from pystage.store import FeatureStore, StoreCorruptError, dataset_fingerprint, default_root
from pystage.train import validate as check
from pystage.train.cache import StageCache, stage_key
from pystage.train.config import TrainConfig
from pystage.train.engine import Cursor, Engine
from pystage.train.errors import FitTypeError, GrowthConfigError
from pystage.train.features import MAX_REPAIRS, FeatureChain
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.sources import BatchSource, DatasetSource, StoreSource

log = logging.getLogger(__name__)
INITS = ("lookahead", "random")


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
                    store_dtype: torch.dtype = torch.float16, checkpoint_dir: Any = None, share_prefixes: bool = True,
                    measure_memory: bool = True, **_: Any) -> FitResult:
    """Train ``model`` (``nn.Sequential`` with ``split_points``, or ``StagedNet``) incrementally; see the module doc."""
    cfg = growth if growth is not None else IncrementalConfig()
    if not isinstance(cfg, IncrementalConfig):
        raise FitTypeError("growth", type(cfg).__name__, "an IncrementalConfig for method='incremental'",
                           f"growth must be an IncrementalConfig for method='incremental', got {type(cfg).__name__}")
    if val is None:
        from pystage.data import train_val_split

        train, val = train_val_split(train, val_fraction=cfg.val_fraction, seed=seed)
    out = check.check_model(model, train[0][0]) if isinstance(model, (nn.Sequential, StagedNet)) else None
    net = check.staged_model(model, train, head).to(device)
    classes = check.classes_of(model, train, out)
    check.check_labels(train, "train", classes)
    check.check_labels(val, "val", classes)
    if cfg.init == "lookahead" and len(net) > 1:
        store = store if store is not None else FeatureStore()
        check.check_writable(store.directory, "store")
    root = checkpoint_dir if checkpoint_dir is not None else os.path.join(
        store.config.root if store is not None else default_root(), "stages")
    cache = StageCache(check.check_writable(root, "checkpoint_dir"))
    run = _Incremental(cfg, epochs, batch_size, device, config, seed, progress or Progress(False))
    run.chain = FeatureChain(store, store_dtype, batch_size, device, run.progress.enabled) if store else None
    run.cache, run.share, run.measure = cache, share_prefixes, measure_memory
    result = run.fit(net, train, val)
    if run.chain is not None:
        run.chain.wait()  # look-ahead features written in the background are on disk before fit returns
    return result


class _Incremental:
    chain: Optional[FeatureChain]
    cache: StageCache
    share = True
    measure = False

    def __init__(self, cfg: IncrementalConfig, epochs: int, batch_size: int, device: torch.device, config: TrainConfig,
                 seed: int, progress: Progress) -> None:
        self.cfg, self.cap, self.epochs = cfg, cfg.max_epochs_per_step or epochs, epochs
        self.batch_size, self.device, self.config, self.seed, self.progress = batch_size, device, config, seed, progress

    def fit(self, net: StagedNet, train: Dataset, val: Dataset) -> FitResult:
        t0 = time.perf_counter()
        report = GrowthReport("incremental", self.cap, self.batch_size, str(self.device), PeakMeter(self.device).source)
        src = DatasetSource(train, self.batch_size, self.seed)
        val_src = DatasetSource(val, self.batch_size, shuffle=False)
        upstream = dataset_fingerprint(train) + dataset_fingerprint(val)  # val drives the criterion
        for k in range(len(net)):
            with PeakMeter(self.device) as meter:
                t = time.perf_counter()
                srep, history = self._step_cached(net, k, upstream, train, val, src, val_src)
                srep.seconds = srep.seconds if srep.cached else time.perf_counter() - t
            srep.peak_mem_mib = meter.peak_mib
            upstream = srep.stage_key
            report.stages.append(srep)
            report.history.extend(history)
            log.info("incremental step %d: val_acc=%.4f after %.1fs", k + 1, srep.val_acc or float("nan"), srep.seconds)
        report.wall_s = time.perf_counter() - t0
        net.drop_heads().eval()
        for p in net.parameters():
            p.requires_grad_(True)
        return FitResult(net, report)

    def _step_cached(self, net: StagedNet, k: int, upstream: str, train: Dataset, val: Dataset, src: BatchSource,
                     val_src: BatchSource) -> tuple[StageReport, list[dict]]:
        """Step ``k`` from the stage cache (keyed by everything it starts from), else trained and saved."""
        state = nn.Sequential(nn.Sequential(*net.bodies[: k + 1]), net.stages[k].head)
        key = stage_key(upstream=upstream, method="incremental", step=k + 1, start=state, growth=asdict(self.cfg),
                        config=asdict(self.config), cap=self.cap, batch_size=self.batch_size, seed=self.seed)
        done = self.cache.load(key) if self.share else None
        if done is not None:
            state.load_state_dict(done["state"])
            return StageReport(**{**done["report"], "cached": True}), done["history"]
        initial = {n: t.detach().to("cpu", copy=True) for n, t in state.state_dict().items()}
        for attempt in range(MAX_REPAIRS + 1):
            try:
                srep, history = self._step(net, k, train, val, src, val_src)
                break
            except StoreCorruptError as e:  # a look-ahead entry: rebuilt, and the step trained again
                if self.chain is None or attempt == MAX_REPAIRS or not self.chain.repair(e):
                    raise
                state.load_state_dict(initial)
        srep.stage_key = key
        self.cache.save(key, {"state": state.state_dict(), "report": asdict(srep), "history": history})
        return srep, history

    def _step(self, net: StagedNet, k: int, train: Dataset, val: Dataset, src: BatchSource, val_src: BatchSource
              ) -> tuple[StageReport, list[dict]]:
        t, history = time.perf_counter(), []
        srep = StageReport(stage=k + 1, layers="1" if k == 0 else f"1-{k + 1}", seconds=0.0, peak_mem_mib=0.0,
                           train_acc=None, val_acc=None, lr=self.config.lr, weight_decay=self.config.weight_decay)
        if k > 0 and self.cfg.init == "lookahead" and self.cfg.lookahead_epochs > 0:
            self._lookahead(net, k, train, val, srep, history)
        self._joint(net, k, src, val_src, srep, history)
        srep.seconds = time.perf_counter() - t
        return srep, history

    def _joint(self, net: StagedNet, k: int, src: BatchSource, val_src: BatchSource, srep: StageReport,
               history: list[dict]) -> None:
        """Train S1..S(k+1) + the classifier together until the angle criterion fires or the cap is reached."""
        trainable = nn.Sequential(nn.Sequential(*net.bodies[: k + 1]), net.stages[k].head)
        for p in trainable.parameters():
            p.requires_grad_(True)
        engine = Engine(trainable, self.config, self.device, stage=f"1-{k + 1} (incremental step {k + 1})",
                        progress=self.progress, desc=f"grow {k + 1} joint")
        criterion, cursor = AngleCriterion(self.cfg.ws, self.cfg.gamma, self.cfg.acc_scale), Cursor()
        stop = False
        while cursor.epoch < self.cap and not stop:
            stats = engine.run(src, None, cursor, measure_at=1 if self.measure else -1)
            if stats.measured_peak is not None:
                srep.measured_peak_mib = stats.measured_peak / 2**20
            acc = engine.evaluate(val_src)
            stop = criterion.update(acc)
            history.append({"step": k + 1, "phase": "joint", "epoch": cursor.epoch, "train_loss": stats.loss,
                            "train_acc": stats.accuracy, "val_acc": acc,
                            "angle": criterion.angles[-1] if len(criterion.points) % self.cfg.ws == 0 else None,
                            "stop": stop})
            srep.train_acc, srep.val_acc = stats.accuracy, acc

    def _lookahead(self, net: StagedNet, k: int, train: Dataset, val: Dataset, srep: StageReport,
                   history: list[dict]) -> None:
        """Train S(k+1) + classifier alone on the stored outputs of the frozen S1..Sk (the look-ahead init)."""
        assert self.chain is not None
        prefix = nn.Sequential(*net.bodies[:k])
        entries, srep.store_seconds = self.chain.build(prefix, (train, val), extra="incremental-lookahead")
        srep.store_key, srep.store_bytes = entries[0].key, sum(e.nbytes for e in entries)
        for p in prefix.parameters():
            p.requires_grad_(False)
        trainable = nn.Sequential(net.bodies[k], net.stages[k].head)
        engine = Engine(trainable, self.config, self.device, stage=f"{k + 1} (look-ahead)", progress=self.progress,
                        desc=f"grow {k + 1} look-ahead")
        src = StoreSource(entries[0], self.batch_size, self.seed, device=self.device)
        val_src = StoreSource(entries[1], self.batch_size, shuffle=False, device=self.device)
        cursor = Cursor()
        while cursor.epoch < self.cfg.lookahead_epochs:
            stats = engine.run(src, None, cursor)
            history.append({"step": k + 1, "phase": "lookahead", "epoch": cursor.epoch, "train_loss": stats.loss,
                            "train_acc": stats.accuracy, "val_acc": engine.evaluate(val_src), "angle": None,
                            "stop": False})
