"""Dynamic capacity (Princeton thesis, ch. 5): use a fraction of each layer's width; grow it when the loss plateaus.

Every ``nn.Linear``/``nn.Conv2d`` of the model but the output layer becomes a masked layer
(``pystage.layers``) that starts with the first fraction of its units. The moving average of the
per-batch training loss is watched; when it has not improved by ``tolerance`` (relative) for
``patience`` batches, the next fraction is activated in every layer at once (``grow_chain``): the units
trained so far are frozen (the compiled masked backward does no work for them) and the new units learn
what the old ones get wrong. The output layer stays dense and trainable: it reads every unit.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from pystage.layers import MaskedConv2d, MaskedLinear, grow_chain
from pystage.staged import make_head
from pystage.train.config import TrainConfig
from pystage.train.incremental import GrowthConfigError, GrowthReport
from pystage.train.loop import make_optimizer
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitResult, StageReport
from pystage.train.sources import DatasetSource

log = logging.getLogger(__name__)
LOSSES = ("auto", "ce", "mse")
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
    """

    fractions: Union[int, tuple[float, ...]] = 5
    window: int = 10
    patience: int = 10
    tolerance: float = 0.01
    min_batches: int = 0
    loss: str = "auto"

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or self.min_batches < 0 or not 0.0 <= self.tolerance < 1.0:
            raise GrowthConfigError(f"need window >= 1, patience >= 1, min_batches >= 0, tolerance in [0, 1); got "
                                    f"window={self.window}, patience={self.patience}, "
                                    f"min_batches={self.min_batches}, tolerance={self.tolerance}")
        if self.loss not in LOSSES:
            raise GrowthConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
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
    """Moving average of the last ``window`` losses; plateau: ``patience`` updates without a new best."""

    def __init__(self, window: int, patience: int, tolerance: float) -> None:
        self.window, self.patience, self.tolerance = window, patience, tolerance
        self.reset()

    def reset(self) -> None:
        self.losses: deque[float] = deque(maxlen=self.window)
        self.best, self.since = float("inf"), 0

    @property
    def average(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    def update(self, loss: float) -> bool:
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return False
        if self.average < self.best * (1.0 - self.tolerance):
            self.best, self.since = self.average, 0
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
                 head: str = "linear", progress: Optional[Progress] = None, **_: Any) -> FitResult:
    """Train ``model`` (an ``nn.Sequential``) growing its capacity on loss plateaus; see the module doc."""
    cfg = growth if growth is not None else CapacityConfig()
    if not isinstance(cfg, CapacityConfig):
        raise TypeError(f"growth must be a CapacityConfig for method='capacity', got {type(cfg).__name__}")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"method='capacity' grows an nn.Sequential, got {type(model).__name__}")
    fractions = schedule(cfg.fractions)
    x0, y0 = train[0]
    regression = cfg.loss == "mse" or (cfg.loss == "auto" and torch.is_tensor(y0) and y0.is_floating_point())
    with torch.no_grad():
        out_shape = tuple(model(x0.unsqueeze(0)).shape[1:])
    if len(out_shape) != 1 and not regression:  # a body without a classifier: add the head fit() would add
        classes = getattr(train, "num_classes", None) or getattr(model, "num_classes", None) or 10
        model = nn.Sequential(*model, *make_head(out_shape, classes, head))
    net, chain = masked_chain(model, fractions)
    net = net.to(device)
    steps = [units_per_step(_width(m), fractions) for m in chain]  # (layers, steps)
    report = GrowthReport("capacity", epochs, batch_size, str(device), PeakMeter(device).source)
    t0 = time.perf_counter()
    with PeakMeter(device) as meter:
        train_loss, step = _train(net, chain, steps, cfg, regression, train, epochs, batch_size, device, config, seed,
                                  report.history)
    val_metric = _evaluate(net, val, batch_size, device, regression)
    report.stages.append(StageReport(stage=1, layers=f"1-{len(net)}", seconds=time.perf_counter() - t0,
                                     peak_mem_mib=meter.peak_mib, train_acc=None,
                                     val_acc=None if regression else val_metric, lr=config.lr,
                                     weight_decay=config.weight_decay))
    report.history.append({"event": "end", "fraction": fractions[step], "train_loss": train_loss,
                           ("val_mse" if regression else "val_acc"): val_metric})
    report.wall_s = time.perf_counter() - t0
    return FitResult(net.eval(), report)


def _train(net: nn.Sequential, chain: list[nn.Module], steps: list[list[int]], cfg: CapacityConfig, regression: bool,
           train: Dataset, epochs: int, batch_size: int, device: torch.device, config: TrainConfig, seed: int,
           history: list[dict]) -> tuple[float, int]:
    fractions = schedule(cfg.fractions)
    optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], config)
    detector, step, since_growth, batch = PlateauDetector(cfg.window, cfg.patience, cfg.tolerance), 0, 0, 0
    src = DatasetSource(train, batch_size, seed, device=device)
    loss_sum = seen = 0.0
    for epoch in range(epochs):
        net.train()
        loss_sum = seen = 0.0
        for x, y in src.batches(epoch):
            out = net(x)  # (B, K) or the regression target's shape
            loss = F.mse_loss(out.reshape(y.shape), y) if regression else F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batch, since_growth = batch + 1, since_growth + 1
            loss_sum, seen = loss_sum + loss.item() * len(y), seen + len(y)
            plateau = detector.update(loss.item())
            if plateau and since_growth >= cfg.min_batches and step + 1 < len(fractions):
                step, avg = step + 1, detector.average
                grow_chain(chain, [s[step] for s in steps])  # old units frozen: buffers, no gradient work
                optimizer = make_optimizer([p for p in net.parameters() if p.requires_grad], config)
                detector.reset()
                since_growth = 0
                history.append({"event": "grow", "epoch": epoch, "batch": batch, "fraction": fractions[step],
                                "loss_avg": avg})
                log.info("capacity: grew to fraction %.2f at batch %d (epoch %d)", fractions[step], batch, epoch)
        history.append({"event": "epoch", "epoch": epoch + 1, "batch": batch, "fraction": fractions[step],
                        "train_loss": loss_sum / max(seen, 1)})
    return loss_sum / max(seen, 1), step


@torch.no_grad()
def _evaluate(net: nn.Module, data: Optional[Dataset], batch_size: int, device: torch.device,
              regression: bool) -> Optional[float]:
    """Validation MSE (regression) or accuracy (classes); None without data."""
    if data is None:
        return None
    net.eval()
    total = seen = 0.0
    for x, y in DatasetSource(data, batch_size, shuffle=False, device=device).batches(0):
        out: Tensor = net(x)
        total += float(F.mse_loss(out.reshape(y.shape), y, reduction="sum")) if regression else \
            int((out.argmax(1) == y).sum())
        seen += y.numel() if regression else len(y)
    return total / seen if seen else None
