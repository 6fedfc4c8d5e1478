"""What ``fit`` reports: per stage time, peak memory, accuracy, hyper-parameters, store key and bytes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from torch import nn


@dataclass
class StageReport:
    stage: int
    layers: str
    seconds: float
    peak_mem_mib: float
    train_acc: Optional[float]
    val_acc: Optional[float]
    lr: float
    weight_decay: float
    trials: int = 1
    cached: bool = False  # trained by an earlier run or another architecture with the same prefix
    stage_key: str = ""
    store_key: Optional[str] = None  # features of this stage, stored for the next one
    store_bytes: int = 0
    store_seconds: float = 0.0
    search: list[dict] = field(default_factory=list)
    measured_peak_mib: Optional[float] = None  # live tensor bytes of one steady-state step (fit(measure_memory=...))
    planned_mib: Optional[float] = None  # the planner's predicted step peak for this stage (under memory_budget)
    used_mib: Optional[float] = None  # CUDA: max_memory_allocated above what the process held at the stage's start
    reserved_mib: Optional[float] = None  # CUDA: peak memory_reserved above the start's (capped by the budget)


@dataclass
class FitReport:
    method: str
    epochs: int
    batch_size: int
    device: str
    peak_mem_source: str
    stages: list[StageReport] = field(default_factory=list)
    wall_s: float = 0.0
    plan: Any = None  # the pystage.plan.Plan that chose the split points under memory_budget, if any
    replans: int = 0  # times a stage ran out of memory and the rest was planned again

    @property
    def peak_mem_mib(self) -> float:
        return max((s.peak_mem_mib for s in self.stages), default=0.0)

    @property
    def val_acc(self) -> Optional[float]:
        return self.stages[-1].val_acc if self.stages else None

    @property
    def train_acc(self) -> Optional[float]:
        return self.stages[-1].train_acc if self.stages else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, plan=None))
        d["plan"] = None if self.plan is None else {"split_points": list(self.plan.split_points),
                                                      "stage_peaks": [s.peak for s in self.plan.stages],
                                                      "budget": self.plan.budget}
        d.update(peak_mem_mib=self.peak_mem_mib, val_acc=self.val_acc, train_acc=self.train_acc)
        return d

    def __str__(self) -> str:
        from pystage.bench.report import format_table

        meter = "cuda_peak_mib" if self.device.startswith("cuda") else "rss_peak_mib"  # what peak_mem_mib measured
        rows = [{**asdict(s), meter: s.peak_mem_mib, "val_acc": _pct(s.val_acc), "train_acc": _pct(s.train_acc),
                 "measured_peak_mib": "-" if s.measured_peak_mib is None else s.measured_peak_mib}  # not measured
                for s in self.stages]
        cols = ["stage", "layers", "seconds", "measured_peak_mib", "train_acc", "val_acc", "lr", "weight_decay",
                "trials", "cached", "store_bytes", meter]
        cols[4:4] = [c for c in ("planned_mib", "used_mib", "reserved_mib") if any(r[c] is not None for r in rows)]
        head = (f"method={self.method} epochs={self.epochs} batch_size={self.batch_size} device={self.device} "
                f"wall_s={self.wall_s:.2f} (measured_peak_mib: training memory of one steady-state step, what a "
                f"budget limits; {meter}: {self.peak_mem_source})")
        text = head + "\n" + format_table(rows, cols)
        return f"{self.plan}\n{text}" if self.plan is not None else text


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@dataclass
class FitResult:
    """``model``: the trained network (an ordinary nn.Module); ``report``: what training cost and reached."""

    model: nn.Module
    report: FitReport
