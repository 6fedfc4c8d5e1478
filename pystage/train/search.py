"""Per-stage hyper-parameter search: random exponential draws of (lr, L2) with successive halving.

As in Griswold's partial-learning experiments, the search starts from one
(lr, weight_decay) point and adds ``draws`` random points ``start * 10**z``,
``z ~ N(0, sigma)`` for each of the two. Successive halving trains every trial
for a fraction of the epochs, keeps the better half (by validation accuracy),
and continues the survivors until the last one has trained all epochs. Every
trial of a stage reads the same batch source (for ``partial``: the same stored
features of the stage before).

Two modes, the same trials, the same rungs and the same results (up to float rounding):

* ``"population"``: every trial of a rung trains at once, as one stacked model sharing each batch
  (``population.Population``): the batches are read once per rung instead of once per trial, and on a GPU
  the members' layers run as one batched kernel each. Pruned members are cut out of the stacked tensors.
  The device holds every live trial's weights, gradients and optimizer state (and, on a GPU, activations):
  ``population.population_peak`` says how much.
* ``"sequential"``: the trials share the stage's one module and train one at a time through its ``Engine``,
  so the device holds one trial's weights, gradients and optimizer state, exactly what a stage without a
  search holds. A paused trial's weights and optimizer state wait in host memory until its next rung; a
  pruned trial's are dropped.

``"auto"`` (the default) runs a population, except where it does not apply: under DistributedDataParallel,
for the ``checkpoint`` method (activations recomputed after ``functional_call`` returns), for trials with
different optimizers, for a single trial, and under ``fit(memory_budget=...)`` (the planner plans a stage
for one trial). There it runs sequentially; ``"population"`` there is an error.

In both modes a trial whose loss or weights become non-finite (a diverging draw) is ranked last and never
continues; if every trial fails, the stage stops with the first failure.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import torch

from pystage.optim import TrainConfig
from pystage.train.engine import Cursor, Engine, StepStats
from pystage.train.errors import FitArgumentError, NonFiniteError
from pystage.train.population import Population, unsupported
from pystage.train.sources import BatchSource, steps_per_epoch

log = logging.getLogger(__name__)
MODES = ("auto", "population", "sequential")


@dataclass(frozen=True)
class SearchConfig:
    """``draws`` random points besides the start point; ``halving`` prunes the worse half at every rung;
    ``mode``: how the trials train ("auto", "population": all at once, "sequential": one at a time);
    ``vmap``: how a population runs its members (None: ``torch.func.vmap`` on CUDA where it works, a loop over
    the members elsewhere; True: always vmap; False: always the loop)."""

    draws: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    sigma: float = 1.0  # standard deviation of the base-10 exponent of each draw
    halving: bool = True
    eta: int = 2
    seed: int = 0
    mode: str = "auto"
    vmap: Optional[bool] = None

    def __post_init__(self) -> None:
        _check("draws", self.draws, int, lambda v: v >= 0, "an int >= 0")
        _check("eta", self.eta, int, lambda v: v >= 2, "an int >= 2")
        _check("seed", self.seed, int, lambda v: True, "an int")
        _check("lr", self.lr, (int, float), lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
        _check("weight_decay", self.weight_decay, (int, float), lambda v: math.isfinite(v) and v >= 0,
               "a finite number >= 0")
        _check("sigma", self.sigma, (int, float), lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
        _check("halving", self.halving, bool, lambda v: True, "True or False")
        _check("mode", self.mode, str, lambda v: v in MODES, f"one of {', '.join(repr(m) for m in MODES)}")
        if self.vmap is not None:
            _check("vmap", self.vmap, bool, lambda v: True, "None, True or False")

    @property
    def forward(self) -> str:
        """``vmap`` as ``Population``'s ``forward``: "auto", "vmap" or "loop"."""
        return "auto" if self.vmap is None else ("vmap" if self.vmap else "loop")

    def key(self) -> dict[str, Any]:
        """What decides the search's result, for stage keys: every field but ``mode`` and ``vmap`` (every way
        trains the same trials to the same result, up to float rounding: they share keys, draws, cached stages)."""
        return {k: v for k, v in asdict(self).items() if k not in ("mode", "vmap")}


def _check(name: str, value: Any, types: Any, ok: Any, expected: str) -> None:
    if isinstance(value, bool) and types is not bool or not isinstance(value, types) or not ok(value):
        raise FitArgumentError(f"SearchConfig.{name}", value, expected)


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
    """One configuration's progress; ``state`` (host memory) holds its weights and optimizer between rungs."""

    config: TrainConfig
    cursor: Cursor = field(default_factory=Cursor)
    stats: StepStats = field(default_factory=StepStats)
    val_acc: Optional[float] = None
    state: Optional[dict[str, Any]] = None
    failed: Optional[NonFiniteError] = None

    def score(self) -> float:
        if self.failed is not None:
            return -math.inf
        s = self.val_acc if self.val_acc is not None else self.stats.accuracy
        return s if s == s else -1.0  # NaN (no batches seen) ranks below every real score

    def summary(self) -> dict[str, Any]:
        out = {"lr": self.config.lr, "weight_decay": self.config.weight_decay, "steps": self.cursor.steps,
               "val_acc": self.val_acc, "train_acc": self.stats.accuracy}
        if self.failed is not None:
            out["error"] = str(self.failed)
        return out


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


def run_search(engine: Engine, configs: list[TrainConfig], source: BatchSource, val_source: Optional[BatchSource],
               epochs: int, halving: bool, eta: int, measure: bool = False, mode: str = "sequential",
               under_budget: bool = False, forward: str = "auto") -> tuple[Trial, list[dict]]:
    """Train the trials (successive halving if asked) in ``engine``'s stage, in ``mode`` (see ``resolve_mode``;
    ``forward``: the population's, see ``population``); returns the best trial, whose weights the module and
    whose optimizer state the engine hold on return, and a summary of every trial (with the mode that ran)."""
    mode = resolve_mode(mode, engine, configs, under_budget)
    trials = [Trial(c) for c in configs]
    total = epochs * steps_per_epoch(source)
    budgets = rung_budgets(len(trials), total, eta) if halving and len(trials) > 1 else [(total, 1)]
    if mode == "population":
        alive = _population(engine, trials, source, val_source, budgets, measure, forward)
    else:
        alive = _sequential(engine, trials, source, val_source, budgets, measure)
    best = alive[0]
    if best.failed is not None:
        raise next(t.failed for t in trials if t.failed is not None)
    # the step measured (the population's, or the first trial's in a sequential search) is the stage's figure
    best.stats.measured_peak = max((t.stats.measured_peak for t in trials if t.stats.measured_peak), default=None)
    return best, [{**t.summary(), "mode": mode} for t in trials]


def resolve_mode(mode: str, engine: Engine, configs: list[TrainConfig], under_budget: bool = False) -> str:
    """"population" or "sequential": ``mode`` itself, or what "auto" means for this stage (module docstring).
    ``under_budget``: the stage was planned for one trial by ``fit(memory_budget=...)``."""
    if mode not in MODES:
        raise FitArgumentError("SearchConfig.mode", mode, f"one of {', '.join(repr(m) for m in MODES)}")
    if mode == "sequential":
        return mode
    why = unsupported(engine, configs)
    if mode == "population":
        if why is not None:
            raise FitArgumentError("SearchConfig.mode", mode, "'auto' or 'sequential' for this stage", why)
        return mode
    why = why or ("there is one trial" if len(configs) < 2 else None) or \
        ("fit(memory_budget=...) planned the stage for one trial" if under_budget else None)
    if why is not None:
        log.info("stage %s: the search trains its trials one at a time: %s", engine.stage, why)
        return "sequential"
    return "population"


def _population(engine: Engine, trials: list[Trial], source: BatchSource, val: Optional[BatchSource],
                budgets: list[tuple[int, int]], measure: bool, forward: str) -> list[Trial]:
    """Every live trial of a rung at once; pruned and failed ones are cut out of the population. Returns the
    trials alive after the last rung, best first; the module holds the best's weights if it did not fail."""
    pop = Population(engine, [t.config for t in trials], forward)
    alive, members, cursor = list(trials), list(trials), Cursor()  # members[i]: the population's member i
    for reach, keep in budgets:
        if members:
            results = pop.run(source, reach - cursor.steps, cursor, measure_at=1 if measure else -1)
            for t, r, acc in zip(members, results, pop.evaluate(val)):
                t.cursor = replace(cursor)
                r.stats.measured_peak = r.stats.measured_peak or t.stats.measured_peak  # measured in rung 1
                if r.failed is None:
                    t.stats, t.val_acc = r.stats, acc
                else:  # as in the sequential search: last rung's stats kept, no score
                    t.failed, t.val_acc = r.failed, None
        alive.sort(key=lambda t: -t.score())
        alive = alive[:keep]
        place = {id(t): i for i, t in enumerate(members)}
        members = [t for t in alive if t.failed is None]
        pop.keep([place[id(t)] for t in members])
    if alive[0].failed is None:  # then it is members[0]
        pop.load_member(0, alive[0].config)
    return alive


def _sequential(engine: Engine, trials: list[Trial], source: BatchSource, val: Optional[BatchSource],
                budgets: list[tuple[int, int]], measure: bool) -> list[Trial]:
    """One trial at a time in the module; returns the trials alive after the last rung, best first, the module
    holding the best's weights if it did not fail."""
    start = _host_copy(engine.module.state_dict())
    alive, holder = list(trials), None  # holder: the trial whose weights the module holds now
    for reach, keep in budgets:
        for t in alive:
            if t.failed is None:
                _resume(engine, t, start, holder)
                holder = t
                _train(engine, t, reach, source, val, measure and t is trials[0])
                t.state = _save(engine) if len(alive) > 1 else None
        alive.sort(key=lambda t: -t.score())
        for t in alive[keep:]:
            t.state = None  # pruned: its memory is freed
        alive = alive[:keep]
    best = alive[0]
    if best.failed is None and holder is not best:
        _resume(engine, best, start, holder)
    best.state = None
    return alive


def _train(engine: Engine, t: Trial, reach: int, source: BatchSource, val: Optional[BatchSource],
           measure: bool) -> None:
    measured = t.stats.measured_peak
    try:
        t.stats = engine.run(source, reach - t.cursor.steps, t.cursor, measure_at=1 if measure else -1)
        t.val_acc = engine.evaluate(val)
    except NonFiniteError as e:
        t.failed, t.val_acc = e, None
    t.stats.measured_peak = t.stats.measured_peak or measured


def _resume(engine: Engine, t: Trial, start: dict[str, Any], holder: Optional[Trial]) -> None:
    """Put ``t``'s weights (or the start point) into the module and give the engine ``t``'s optimizer."""
    if holder is t:  # it trained last: the module and the engine's optimizer are its own
        return
    if t.state is None:
        engine.module.load_state_dict(start)
        engine.new_optimizer(t.config)
    else:
        engine.module.load_state_dict(t.state["model"])
        engine.new_optimizer(t.config, t.state["optimizer"])


def _save(engine: Engine) -> dict[str, Any]:
    return {"model": _host_copy(engine.module.state_dict()), "optimizer": _host_copy(engine.optimizer.state_dict())}


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (nested dicts and lists)."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj
