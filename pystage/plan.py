"""Split points under a memory budget: the fewest stages whose training steps each fit, then the most balanced.

``plan(model, input_shape, batch_size, memory_budget)`` profiles every candidate stage
(``pystage.memory``) and searches split sets by dynamic programming. Lexicographic
objective over feasible plans: (number of stages, largest stage peak, feature-store
bytes). A plan is feasible when every stage's predicted step peak (stage + head +
optimizer state + input batch) is <= the budget, and its store bytes <= ``disk_budget``.

Split rule: a split may go only between top-level layers of the Sequential, and never
right after a convolution, linear or normalisation layer (their activation follows
them, so their output is not a finished feature). Override with ``split_after``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from pystage.errors import PystageError
from pystage.memory.profile import MemoryProfile, profile
from pystage.memory.step import HeadFactory, linear_head
from pystage.splits import Cost, choose_splits, min_feasible_budget
from pystage.units import Bytes, format_bytes, parse_bytes

logger = logging.getLogger(__name__)

NO_SPLIT_AFTER: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def default_split_after(layer: nn.Module) -> bool:
    """True when a stage may end after ``layer``: anything but a conv, linear or normalisation layer."""
    return not isinstance(layer, NO_SPLIT_AFTER)


class PlanError(PystageError, ValueError):
    """No split of the model fits. ``min_feasible``: the smallest memory budget any split fits; ``layer``: the
    index of the layer that sets it (``stage``: the [start, stop) it sits in); or, for the disk budget,
    ``min_disk``: the fewest store bytes any memory-feasible plan needs."""

    def __init__(self, message: str, *, budget: int, min_feasible: int, layer: Optional[int] = None,
                 stage: Optional[tuple[int, int]] = None, disk_budget: Optional[int] = None,
                 min_disk: Optional[int] = None) -> None:
        super().__init__(message)
        self.budget, self.min_feasible, self.layer, self.stage = budget, min_feasible, layer, stage
        self.disk_budget, self.min_disk = disk_budget, min_disk


@dataclass(frozen=True)
class PlanStage:
    """One stage of a plan: layers [start, stop) and its predicted step peak (bytes)."""

    start: int
    stop: int
    layers: tuple[str, ...]
    peak: int
    out_shape: tuple[int, ...]  # one sample's output
    store_bytes: Optional[int]  # bytes stored after it (None for the last stage, or without dataset_rows)


@dataclass(frozen=True)
class Plan:
    """Split points and what they are predicted to cost. ``split_points`` feed ``model.split_points``."""

    split_points: tuple[int, ...]
    stages: tuple[PlanStage, ...]
    budget: int
    batch_size: int
    total_predicted_bytes: int  # end-to-end training of the whole model with one head
    store_row_bytes: tuple[int, ...]  # per split point: bytes of one stored row (features only)
    store_bytes: Optional[int]  # sum over split points of rows x row bytes (None without dataset_rows)
    disk_budget: Optional[int] = None
    source: str = "estimate"
    device: str = "cpu"
    profile: Optional[MemoryProfile] = field(default=None, repr=False, compare=False)

    @property
    def max_peak(self) -> int:
        return max(s.peak for s in self.stages)

    def __str__(self) -> str:
        head = (f"plan: {len(self.stages)} stage(s), split_points={list(self.split_points)}, batch {self.batch_size}, "
                f"budget {format_bytes(self.budget)} ({self.source}, {self.device}); end-to-end would need "
                f"{format_bytes(self.total_predicted_bytes)}")
        rows = [("stage", "layers", "peak", "% budget", "out shape", "store")]
        for i, s in enumerate(self.stages):
            names = ", ".join(n.split("(")[0] for n in s.layers)
            rows.append((str(i + 1), f"[{s.start}, {s.stop}) {names}"[:60], format_bytes(s.peak),
                         f"{100 * s.peak / self.budget:.0f}%", "x".join(map(str, s.out_shape)),
                         "-" if s.store_bytes is None else format_bytes(s.store_bytes)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) if c == 1 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([head, *lines])


def boundaries(model: nn.Sequential, split_after: Callable[[nn.Module], bool] = default_split_after) -> list[int]:
    """0, every index k where a stage may start (``split_after(model[k - 1])``), len(model)."""
    return [0, *(k for k in range(1, len(model)) if split_after(model[k - 1])), len(model)]


def plan_profile(prof: MemoryProfile, memory_budget: Bytes, *, dataset_rows: Optional[int] = None,
                 disk_budget: Optional[Bytes] = None, store_dtype: Optional[torch.dtype] = None,
                 split_after: Callable[[nn.Module], bool] = default_split_after) -> Plan:
    """:func:`plan` on an existing profile."""
    budget = parse_bytes(memory_budget, "memory_budget")
    disk_cap = None if disk_budget is None else parse_bytes(disk_budget, "disk_budget")
    if disk_cap is not None and dataset_rows is None:
        raise ValueError("disk_budget needs dataset_rows (the number of rows the feature store will hold)")
    disk = _disk(prof, dataset_rows, store_dtype)
    nodes = boundaries(prof.model, split_after)
    found = choose_splits(nodes, prof.stage_peak, budget, disk, disk_cap, prof.lower_bound)
    if found is None:
        raise _error(prof, nodes, budget, disk, disk_cap)
    result = plan_with_splits(prof, found[0], budget, dataset_rows=dataset_rows, store_dtype=store_dtype)
    result = dataclasses.replace(result, disk_budget=disk_cap)
    logger.info("%s", result)
    return result


def plan_with_splits(prof: MemoryProfile, split_points: Sequence[int], memory_budget: Bytes, *,
                     dataset_rows: Optional[int] = None, store_dtype: Optional[torch.dtype] = None) -> Plan:
    """The plan with the given ``split_points`` and its predicted peaks, whether or not it fits the budget."""
    budget = parse_bytes(memory_budget, "memory_budget")
    splits = tuple(int(p) for p in split_points)
    if list(splits) != sorted(set(splits)) or any(not 0 < p < len(prof.model) for p in splits):
        raise ValueError(f"split_points must be increasing layer indices in [1, {len(prof.model) - 1}], got "
                         f"{list(split_points)}")
    disk = _disk(prof, dataset_rows, store_dtype)
    row = [prof.shapes[k].numel() * (store_dtype or prof.dtype).itemsize for k in range(len(prof.shapes))]
    bounds = (0, *splits, len(prof.model))
    stages = tuple(PlanStage(a, b, tuple(prof.layers[k].name for k in range(a, b)), prof.stage_peak(a, b),
                             tuple(prof.shapes[b]), disk(b) if disk and b < len(prof.model) else None)
                   for a, b in zip(bounds, bounds[1:]))
    store = sum(disk(k) for k in splits) if disk else None
    return Plan(splits, stages, budget, prof.batch_size, prof.total().peak, tuple(row[k] for k in splits), store,
                None, prof.source, str(prof.device), prof)


def _disk(prof: MemoryProfile, dataset_rows: Optional[int],
          store_dtype: Optional[torch.dtype]) -> Optional[Callable[[int], int]]:
    """Feature-store bytes of a split at layer k (``dataset_rows`` rows), or None without ``dataset_rows``."""
    if dataset_rows is None:
        return None
    itemsize = (store_dtype or prof.dtype).itemsize
    return lambda k: prof.shapes[k].numel() * itemsize * dataset_rows


def _error(prof: MemoryProfile, nodes: list[int], budget: int, disk: Optional[Callable[[int], int]],
           disk_cap: Optional[int]) -> PlanError:
    need, (a, b) = min_feasible_budget(nodes, prof.stage_peak, prof.lower_bound)
    if need <= budget and disk is not None and disk_cap is not None:
        found = choose_splits(nodes, prof.stage_peak, budget, disk, None, prof.lower_bound)
        assert found is not None
        min_disk = min(_min_disk(nodes, prof.stage_peak, budget, disk), found[2])
        return PlanError(f"no split fits the disk budget {format_bytes(disk_cap)}: the plans within the memory budget "
                         f"{format_bytes(budget)} need at least {format_bytes(min_disk)} of feature store",
                         budget=budget, min_feasible=need, disk_budget=disk_cap, min_disk=min_disk)
    layer = max(range(a, b), key=lambda k: (prof.layers[k].saved_bytes + prof.layers[k].output_bytes
                                            + prof.layers[k].param_bytes + prof.layers[k].optimizer_bytes))
    return PlanError(f"no split of the model fits the memory budget {format_bytes(budget)} at batch size "
                     f"{prof.batch_size}: the smallest feasible budget is {format_bytes(need)} ({need} bytes), set by "
                     f"the stage of layers [{a}, {b}), whose largest layer is {layer}: {prof.layers[layer].name}; "
                     f"raise the budget or lower the batch size", budget=budget, min_feasible=need, layer=layer,
                     stage=(a, b))


def _min_disk(nodes: Sequence[int], cost: Cost, budget: int, disk: Callable[[int], int]) -> int:
    """Fewest store bytes of any plan whose stages all fit ``budget`` (shortest path)."""
    best = {nodes[0]: 0}
    for b in nodes[1:]:
        options = [best[a] + (disk(a) if a else 0) for a in nodes if a < b and a in best and cost(a, b) <= budget]
        if options:
            best[b] = min(options)
    return best[nodes[-1]]


def plan(model: nn.Sequential, input_shape: Sequence[int], batch_size: Union[int, str], memory_budget: Bytes,
         device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32, optimizer: str = "adam",
         num_classes: int = 10, dataset_rows: Optional[int] = None, disk_budget: Optional[Bytes] = None,
         source: str = "estimate", *, head: HeadFactory = linear_head, store_dtype: Optional[torch.dtype] = None,
         split_after: Callable[[nn.Module], bool] = default_split_after, max_batch: int = 4096) -> Plan:
    """Split points for training ``model`` in stages within ``memory_budget`` (bytes or "512MiB").

    ``batch_size="max"`` first finds the largest batch size any plan fits (:func:`max_batch_size`).
    Raises :class:`PlanError` when no split fits.
    """
    kw = dict(device=device, dtype=dtype, optimizer=optimizer, num_classes=num_classes, head=head, source=source)
    if batch_size == "max":
        batch_size = max_batch_size(model, input_shape, memory_budget, split_after=split_after, limit=max_batch,
                                    **kw)  # type: ignore[arg-type]
    if not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be an int or 'max', got {batch_size!r}")
    prof = profile(model, input_shape, batch_size, **kw)  # type: ignore[arg-type]
    return plan_profile(prof, memory_budget, dataset_rows=dataset_rows, disk_budget=disk_budget,
                        store_dtype=store_dtype, split_after=split_after)


def max_batch_size(model: nn.Sequential, input_shape: Sequence[int], memory_budget: Bytes, *,
                   split_after: Callable[[nn.Module], bool] = default_split_after, limit: int = 4096,
                   **kw: object) -> int:
    """The largest batch size (<= ``limit``) for which some split of ``model`` fits ``memory_budget``.

    Stage peaks are affine in the batch size (parameters and optimizer state are fixed, activations scale),
    so two profiles (B = 1 and 8) predict the answer; exact profiles then confirm it or search around it.
    ``kw``: ``device``, ``dtype``, ``optimizer``, ``num_classes``, ``head``, ``source``, as for :func:`plan`.
    """
    budget = parse_bytes(memory_budget, "memory_budget")
    nodes = boundaries(model, split_after)
    profiles: dict[int, MemoryProfile] = {}

    def prof(b: int) -> MemoryProfile:
        if b not in profiles:
            profiles[b] = profile(model, input_shape, b, **kw)  # type: ignore[arg-type]
        return profiles[b]

    def fits(b: int) -> bool:
        return min_feasible_budget(nodes, prof(b).stage_peak, prof(b).lower_bound)[0] <= budget

    if not fits(1):
        raise _error(prof(1), nodes, budget, None, None)
    lo_b, hi_b = 1, min(8, limit)
    slope = {}  # (a, b) -> (bytes at B=1, bytes per extra sample)
    for a in nodes:
        for b in (n for n in nodes if n > a):
            p1, p8 = prof(lo_b).stage_peak(a, b), prof(hi_b).stage_peak(a, b)
            slope[a, b] = (p1, (p8 - p1) / max(1, hi_b - lo_b))

    def predicted_fits(n: int) -> bool:
        return min_feasible_budget(nodes, lambda a, b: slope[a, b][0] + slope[a, b][1] * (n - 1))[0] <= budget

    guess = _last_true(predicted_fits, 1, limit)
    lo, hi = 1, limit + 1  # fits(lo), not fits(hi) (hi = limit + 1 stands for "not checked")
    if fits(guess):
        lo = guess
        if guess < limit and not fits(guess + 1):
            return guess
    else:
        hi = guess
    while hi - lo > 1:  # the affine prediction missed: exact bisection
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _last_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The largest n in [lo, hi] with pred(n), for a pred that is true up to some point (pred(lo) assumed)."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if pred(mid) else (lo, mid - 1)
    return lo
