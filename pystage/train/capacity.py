"""Dynamic capacity (Princeton thesis, ch. 5): use a fraction of each layer's width; grow it when the loss plateaus.

Every ``nn.Linear``/``nn.Conv2d`` of the model but the output layer becomes a masked layer
(``pystage.layers``) that starts with the first fraction of its units. The moving average of the
per-batch training loss is watched; when it has not improved by ``tolerance`` (relative) for
``patience`` batches (``rule="best"``; ``rule="thesis"``: when it is not below its value ``patience``
batches earlier; ``rule="every"``: a fixed schedule, every ``min_batches`` batches), the next fraction
is activated in every layer at once (``grow_chain``): the units trained so far are frozen (the compiled
masked backward does no work for them) and the new units learn what the old ones get wrong. The output
layer stays dense and trainable: it reads every unit.
Every ``sample_every``-th batch's training loss is kept in the report's history (the thesis's "samples").
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from pystage.layers import MaskedConv2d, MaskedLinear, grow_chain
from pystage.staged import make_head
from pystage.train import validate as check
from pystage.train.config import TrainConfig
from pystage.train.engine import Cursor, Engine, StepStats
from pystage.train.errors import FitTypeError, GrowthConfigError
from pystage.train.incremental import GrowthReport
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitResult, StageReport
from pystage.train.sources import DatasetSource

log = logging.getLogger(__name__)
LOSSES = ("auto", "ce", "mse")
RULES = ("best", "thesis", "every")
_Masked = (MaskedLinear, MaskedConv2d)


@dataclass(frozen=True)
class CapacityConfig:
    """Options of ``fit(method="capacity", growth=CapacityConfig(...))``.

    fractions: n (grow in n equal parts: 5 = fifths) or the cumulative fractions, e.g. (0.2, 0.4, 1.0).
    window: batches in the moving average of the training loss.
    patience: batches without an improvement of the average that make a plateau.
    tolerance: relative improvement of the average below which it counts as flat.
    min_batches: batches at least between two growths (and before the first).
    loss: "ce" (classes), "mse" (regression) or "auto" (mse for float targets).
    rule: "best": a plateau is ``patience`` batches without a new best average; "thesis": the average is
        not below its own value ``patience`` batches earlier (the thesis's "fails to improve within the
        last 10 batches", read literally); "every": no plateau watch, grow every ``min_batches`` batches
        (the schedule of the thesis's CIFAR-100 run). See ``PlateauDetector``.
    sample_every: keep every n-th batch's training loss in the report's history as a "sample" event
        (the thesis samples every 100 steps); 0: none.
    """

    fractions: Union[int, tuple[float, ...]] = 5
    window: int = 10
    patience: int = 10
    tolerance: float = 0.01
    min_batches: int = 0
    loss: str = "auto"
    rule: str = "best"
    sample_every: int = 100

    def __post_init__(self) -> None:
        for name in ("window", "patience", "min_batches", "sample_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise GrowthConfigError(f"{name} must be an int, got {v!r}", name, v)
        if self.window < 1 or self.patience < 1 or self.min_batches < 0 or not 0.0 <= self.tolerance < 1.0 \
                or self.sample_every < 0:
            raise GrowthConfigError(f"need window >= 1, patience >= 1, min_batches >= 0, tolerance in [0, 1), "
                                    f"sample_every >= 0; got window={self.window}, patience={self.patience}, "
                                    f"min_batches={self.min_batches}, tolerance={self.tolerance}, "
                                    f"sample_every={self.sample_every}")
        if self.loss not in LOSSES:
            raise GrowthConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}", "loss", self.loss)
        if self.rule not in RULES:
            raise GrowthConfigError(f"rule must be one of {RULES}, got {self.rule!r}", "rule", self.rule)
        if self.rule == "every" and self.min_batches < 1:
            raise GrowthConfigError(f"rule='every' grows every min_batches batches: min_batches must be >= 1, got "
                                    f"{self.min_batches}", "min_batches", self.min_batches)
        schedule(self.fractions)


def schedule(fractions: Union[int, Sequence[float]]) -> tuple[float, ...]:
    """Cumulative fractions ending at 1.0: ``5`` -> (0.2, 0.4, 0.6, 0.8, 1.0)."""
    if isinstance(fractions, int):
        if fractions < 1:
            raise GrowthConfigError(f"fractions must be >= 1 parts, got {fractions}")
        return tuple((i + 1) / fractions for i in range(fractions))
    f = tuple(float(v) for v in fractions)
    if not f or any(b <= a for a, b in zip(f, f[1:])) or f[0] <= 0 or abs(f[-1] - 1.0) > 1e-9:
        raise GrowthConfigError(f"fractions must increase strictly in (0, 1] and end at 1.0, got {f}")
    return f


def units_per_step(width: int, fractions: Sequence[float]) -> list[int]:
    """Units each growth step activates in a layer of ``width`` units (each step >= 1 unit)."""
    ends = [round(width * f) for f in fractions]
    counts = [b - a for a, b in zip([0, *ends], ends)]
    if min(counts) < 1:
        raise GrowthConfigError(f"a layer of {width} units cannot grow in steps {list(fractions)}: "
                                f"units per step would be {counts}")
    return counts


class PlateauDetector:
    """Moving average of the last ``window`` losses, updated once per loss once ``window`` are in.

    ``rule="best"``: a plateau is ``patience`` updates in a row without a new best (below the best so far
    by ``tolerance``, relative). ``rule="thesis"``: a plateau is an average not below ``1 - tolerance``
    times the average ``patience`` updates earlier (so the earliest is after ``window + patience`` losses).
    ``rule="every"``: every update is a plateau (the caller's ``min_batches`` alone spaces the growths).
    """

    def __init__(self, window: int, patience: int, tolerance: float, rule: str = "best") -> None:
        if rule not in RULES:
            raise GrowthConfigError(f"rule must be one of {RULES}, got {rule!r}", "rule", rule)
        self.window, self.patience, self.tolerance, self.rule = window, patience, tolerance, rule
        self.reset()

    def reset(self) -> None:
        self.losses: deque[float] = deque(maxlen=self.window)
        self.averages: deque[float] = deque(maxlen=self.patience + 1)  # the last patience + 1 averages
        self.best, self.since = float("inf"), 0

    @property
    def average(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def update(self, loss: float) -> bool:
        self.losses.append(loss)
        if self.rule == "every":
            return True
        if len(self.losses) < self.window:
            return False
        avg = self.average
        if self.rule == "thesis":
            self.averages.append(avg)
            return len(self.averages) > self.patience and avg >= self.averages[0] * (1.0 - self.tolerance)
        if avg < self.best * (1.0 - self.tolerance):
            self.best, self.since = avg, 0
        else:
            self.since += 1
        return self.since >= self.patience


def masked_chain(model: nn.Sequential, fractions: Sequence[float]) -> tuple[nn.Sequential, list[nn.Module]]:
    """``model`` with every Linear/Conv2d but the last made masked at ``fractions[0]`` of its width; and that chain.

    A model that already holds masked layers is returned as is. The chain must be Conv2d...Conv2d or
    Linear...Linear (a Linear fed by a masked Conv2d would need per-pixel input bookkeeping).
    """
    if any(isinstance(m, _Masked) for m in model.modules()):
        return model, [m for m in model.modules() if isinstance(m, _Masked)]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise GrowthConfigError("capacity growth needs a model without BatchNorm: its running statistics would "
                                "change the output of frozen units")
    dense = [i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if len(dense) < 2:
        raise GrowthConfigError(f"capacity growth needs at least 2 Linear/Conv2d layers (a chain and the output "
                                f"layer), got {len(dense)}")
    layers, chain, prev = list(model), [], 0
    for i in dense[:-1]:
        m = layers[i]
        if isinstance(m, nn.Linear) and chain and isinstance(chain[-1], MaskedConv2d):
            raise GrowthConfigError(f"layer {i}: a Linear after a masked Conv2d is not supported; "
                                    "end the chain with the convs and let the output layer read them")
        width = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        units = units_per_step(width, fractions)[0]
        kw = dict(units=units, inputs=prev or None, trainable_inputs=prev)
        if isinstance(m, nn.Linear):
            layers[i] = MaskedLinear(m.in_features, m.out_features, m.bias is not None, **kw)
        else:
            if m.groups != 1 or isinstance(m.padding, str) and m.padding != "valid":
                raise GrowthConfigError(f"layer {i}: only groups=1 convs with numeric padding grow, got "
                                        f"groups={m.groups}, padding={m.padding!r}")
            layers[i] = MaskedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                     m.bias is not None, **kw)
        chain.append(layers[i])
        prev = units
    out = nn.Sequential(*layers)
    for attr in ("name", "num_classes", "in_channels"):
        if hasattr(model, attr):
            setattr(out, attr, getattr(model, attr))
    return out, chain


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, MaskedLinear) else layer.out_channels


def fit_capacity(model: nn.Module, train: Dataset, val: Optional[Dataset], growth: Optional[CapacityConfig], *,
                 epochs: int, batch_size: int, device: torch.device, config: TrainConfig, seed: int = 0,
                 head: str = "linear", progress: Optional[Progress] = None, measure_memory: bool = True,
                 **_: Any) -> FitResult:
    """Train ``model`` (an ``nn.Sequential``) growing its capacity on loss plateaus; see the module doc."""
    cfg = growth if growth is not None else CapacityConfig()
    if not isinstance(cfg, CapacityConfig):
        raise FitTypeError("growth", type(cfg).__name__, "a CapacityConfig for method='capacity'",
                           f"growth must be a CapacityConfig for method='capacity', got {type(cfg).__name__}")
    if not isinstance(model, nn.Sequential):
        raise FitTypeError("model", type(model).__name__, "an nn.Sequential (method='capacity' grows one)")
    fractions = schedule(cfg.fractions)
    x0, y0 = train[0]
    regression = cfg.loss == "mse" or (cfg.loss == "auto" and torch.is_tensor(y0) and y0.is_floating_point())
    out_shape = tuple(check.check_model(model, x0).shape[1:])  # one forward of one sample through the whole model
    if len(out_shape) != 1 and not regression:  # a body without a classifier: add the head fit() would add
        classes = getattr(train, "num_classes", None) or getattr(model, "num_classes", None) or 10
        model = nn.Sequential(*model, *make_head(out_shape, classes, head))
        out_shape = (classes,)
    if not regression:
        check.check_labels(train, "train", out_shape[0])
        check.check_labels(val, "val", out_shape[0])
    net, chain = masked_chain(model, fractions)
    net = net.to(device)
    steps = [units_per_step(_width(m), fractions) for m in chain]  # (layers, steps)
    report = GrowthReport("capacity", epochs, batch_size, str(device), PeakMeter(device).source)
    engine = Engine(net, config, device, stage=f"1-{len(net)}", loss="mse" if regression else "ce",
                    progress=progress, desc="capacity")
    t0 = time.perf_counter()
    with PeakMeter(device) as meter:
        stats, step = _train(engine, chain, steps, cfg, DatasetSource(train, batch_size, seed), epochs,
                             report.history, measure_memory)
    val_metric = engine.evaluate(DatasetSource(val, batch_size, shuffle=False) if val is not None else None)
    measured = stats.measured_peak
    report.stages.append(StageReport(stage=1, layers=f"1-{len(net)}", seconds=time.perf_counter() - t0,
                                     peak_mem_mib=meter.peak_mib, train_acc=None if regression else stats.accuracy,
                                     val_acc=None if regression else val_metric, lr=config.lr,
                                     weight_decay=config.weight_decay,
                                     measured_peak_mib=None if measured is None else measured / 2**20))
    report.history.append({"event": "end", "fraction": fractions[step], "train_loss": stats.loss,
                           ("val_mse" if regression else "val_acc"): val_metric})
    report.wall_s = time.perf_counter() - t0
    return FitResult(net.eval(), report)


def _train(engine: Engine, chain: list[nn.Module], steps: list[list[int]], cfg: CapacityConfig,
           src: DatasetSource, epochs: int, history: list[dict], measure: bool) -> tuple[StepStats, int]:
    """Every epoch through the engine; after each step the plateau watch may grow the chain (a new optimizer)."""
    fractions = schedule(cfg.fractions)
    detector = PlateauDetector(cfg.window, cfg.patience, cfg.tolerance, cfg.rule)
    state = {"step": 0, "since": 0}

    def watch(loss: Tensor, cursor: Cursor) -> None:  # the method's criterion reads each batch's loss on the host
        state["since"] += 1
        value = float(loss)  # the one host read per step; the samples reuse it
        if cfg.sample_every and cursor.steps % cfg.sample_every == 0:
            history.append({"event": "sample", "epoch": cursor.epoch, "batch": cursor.steps,
                            "fraction": fractions[state["step"]], "train_loss": value})
        plateau = detector.update(value)
        if plateau and state["since"] >= cfg.min_batches and state["step"] + 1 < len(fractions):
            state["step"] += 1
            grow_chain(chain, [s[state["step"]] for s in steps])  # old units frozen: buffers, no gradient work
            engine.new_optimizer()
            avg = detector.average
            detector.reset()
            state["since"] = 0
            history.append({"event": "grow", "epoch": cursor.epoch, "batch": cursor.steps,
                            "fraction": fractions[state["step"]], "loss_avg": avg})
            log.info("capacity: grew to fraction %.2f at batch %d (epoch %d)", fractions[state["step"]],
                     cursor.steps, cursor.epoch)

    cursor, stats = Cursor(), StepStats()
    while cursor.epoch < epochs:
        stats = engine.run(src, None, cursor, measure_at=1 if measure else -1, on_step=watch)
        history.append({"event": "epoch", "epoch": cursor.epoch, "batch": cursor.steps,
                        "fraction": fractions[state["step"]], "train_loss": stats.loss})
    return stats, state["step"]
