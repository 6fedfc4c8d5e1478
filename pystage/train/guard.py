"""Training under a memory budget, with a guard: if a stage runs out of memory anyway, re-plan and go on.

The planner's prediction leaves out what it cannot see (allocator caching and
fragmentation, library workspaces; docs/planner.md). When a stage still hits
``torch.OutOfMemoryError``, the layers from that stage on are planned again for
80% of the failed stage's predicted peak, the model is put back to its initial
weights, and training runs again: the finished stages come back from the stage
cache (same content keys), so only the failed stage and those after it train.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from pystage.staged import feature_shapes
from pystage.train.report import FitResult

log = logging.getLogger(__name__)
SHRINK = 0.8  # the re-planned stages must fit in this fraction of the failed stage's predicted peak


def fit_under_budget(run: Any, model: nn.Sequential, train: Dataset, val: Any, head: str, budget: Union[int, str],
                     plan_fn: Any, staged_fn: Any, max_replans: int = 3) -> FitResult:
    """``run.fit`` on the planner's split points; on OOM, re-plan the rest and continue from the cache."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = plan_fn(model, train, run.batch_size, budget, run, head)
    for replans in range(max_replans + 1):
        model.split_points = tuple(plan.split_points)  # type: ignore[assignment]
        net = staged_fn(model, train, head).to(run.device)
        run.plan, run.measure = plan, True
        try:
            result = run.fit(net, train, val)
            result.report.replans = replans
            return result
        except torch.OutOfMemoryError as exc:
            if replans == max_replans:
                raise
            stage = run.current_unit
            log.warning("stage %d ran out of memory (%s); re-planning layers %d.. for %.0f%% of its predicted peak",
                        stage + 1, str(exc).splitlines()[0] if str(exc) else "OOM", plan.stages[stage].start,
                        100 * SHRINK)
            model.load_state_dict(initial)
            for p in model.parameters():
                p.requires_grad_(True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            plan = replan(plan, stage, model, train, run, head, plan_fn)
    raise AssertionError("unreachable")


def replan(plan: Any, stage: int, model: nn.Sequential, train: Dataset, run: Any, head: str, plan_fn: Any) -> Any:
    """The same plan up to ``stage``; layers from there planned again under a smaller budget."""
    start = plan.stages[stage].start
    rest = nn.Sequential(*list(model)[start:])
    x0, _ = train[0]
    in_shape = feature_shapes([model[:start]], tuple(x0.shape))[0] if start else tuple(x0.shape)
    sub_train = _Shaped(train, in_shape)
    sub = plan_fn(rest, sub_train, run.batch_size, int(plan.stages[stage].peak * SHRINK), run, head)
    shifted = tuple(dataclasses.replace(s, start=s.start + start, stop=s.stop + start) for s in sub.stages)
    return dataclasses.replace(plan, split_points=tuple(p for p in plan.split_points if p <= start)
                               + tuple(start + p for p in sub.split_points),
                               stages=plan.stages[:stage] + shifted)


class _Shaped:
    """A stand-in dataset whose samples have the shape of stage ``start``'s input (the planner reads one sample)."""

    def __init__(self, train: Dataset, shape: tuple[int, ...]) -> None:
        self.shape, self.num_classes = shape, getattr(train, "num_classes", None)
        self._n = len(train)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(self.shape), 0
