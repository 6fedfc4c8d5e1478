"""``fit``: train a network with one of the methods, stage by stage, and report what it cost.

The one loop (``loop.train_steps``) serves every method; a method only says
which stages train together and where their batches come from (``config.Method``).
"""
from __future__ import annotations

import copy
import importlib
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from pystage import distributed
from pystage.memory.cap import StageCap
from pystage.staged import StagedNet
from pystage.store import FeatureStore, dataset_fingerprint, default_root
from pystage.train.cache import StageCache, stage_key
from pystage.train.config import Method, TrainConfig, get_method
from pystage.train.guard import fit_under_budget
from pystage.train.loop import CheckpointedChain, Cursor, StepStats, evaluate, make_optimizer, train_steps
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.search import SearchConfig, Trial, draw_configs, run_search
from pystage.train.sources import BatchSource, DatasetSource, PrefixSource, StoreSource

log = logging.getLogger(__name__)


def fit(model: nn.Module, train: Dataset, val: Optional[Dataset] = None, method: str = "partial", epochs: int = 1,
        batch_size: int = 50, memory_budget: Union[int, str, None] = None, search: Optional[SearchConfig] = None,
        store: Optional[FeatureStore] = None, device: Union[str, torch.device, None] = None,
        checkpoint_dir: Optional[str] = None, *, config: Optional[TrainConfig] = None, seed: int = 0,
        head: str = "linear", progress: Optional[bool] = None, share_prefixes: bool = True,
        store_dtype: torch.dtype = torch.float16, measure_memory: bool = False, growth: Any = None) -> FitResult:
    """Train ``model`` (an ``nn.Sequential`` with ``split_points``, or a ``StagedNet``) on ``train``.

    Trained stages are kept under ``checkpoint_dir`` (default: ``<store root>/stages``), keyed by content:
    a run started again with the same arguments resumes from the last finished stage (and epoch), and
    identical prefixes of other architectures are trained once (``share_prefixes=False`` retrains them).
    Returns the trained ``StagedNet`` (in eval mode) and a per-stage report. With ``memory_budget`` (or
    ``measure_memory=True``) each stage's second training step is measured by live-tensor accounting
    (``StageReport.measured_peak_mib``: what the planner predicts, comparable with the budget).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    config = config or TrainConfig()
    grows = get_method(method).grows
    if grows:  # incremental / capacity: their own loop, options in ``growth`` (docs/growing.md)
        module, func = grows.split(":")
        return getattr(importlib.import_module(module), func)(
            model, train, val, growth, epochs=epochs, batch_size=batch_size, device=_device(device), config=config,
            seed=seed, store=store, head=head, progress=Progress(progress), store_dtype=store_dtype)
    world, dev = distributed.init(_device(device))  # joins the process group (torchrun's environment) if any
    run = _Run(get_method(method), epochs, batch_size, search, config, seed, store_dtype, dev,
               Progress(progress), share_prefixes)
    if search is not None and val is None:
        from pystage.data import train_val_split

        train, val = train_val_split(train, val_fraction=0.1, seed=seed)
    run.store = store if store is not None else (FeatureStore() if run.method.source == "store" else None)
    root = run.store.config.root if run.store is not None else default_root()
    run.cache = StageCache(checkpoint_dir or os.path.join(root, "stages"))
    if world.active:  # rank 0 writes checkpoints, every rank reads them
        run.world, run.cache = world, distributed.RankZeroCache(run.cache)  # type: ignore[assignment]
    if memory_budget is not None:  # planner's split points; re-planned if a stage runs out of memory anyway
        if isinstance(model, StagedNet) or not isinstance(model, nn.Sequential):
            raise TypeError("fit(memory_budget=...) plans the split points of an nn.Sequential, got "
                            f"{type(model).__name__}")
        return fit_under_budget(run, model, train, val, head, memory_budget, _plan, _staged)
    run.measure = measure_memory
    return run.fit(_staged(model, train, head).to(run.device), train, val)


def _plan(model: nn.Module, train: Dataset, batch_size: int, budget: Union[int, str], run: "_Run", head: str):
    """Split points under ``budget`` from the planner (estimated memory of each candidate stage's training step)."""
    from pystage.memory import linear_head, pooled_head
    from pystage.plan import plan

    x0, _ = train[0]
    classes = getattr(train, "num_classes", None) or getattr(model, "num_classes", None) or 10
    p = plan(model, tuple(x0.shape), batch_size, budget, device=run.device, optimizer=run.config,
             num_classes=classes, dataset_rows=len(train), store_dtype=run.store_dtype,
             head=pooled_head if head == "pool-linear" else linear_head)
    log.info("%s", p)
    return p


def _device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _staged(model: nn.Module, train: Dataset, head: str) -> StagedNet:
    if isinstance(model, StagedNet):
        return model
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential (with split_points) or a StagedNet, got {type(model).__name__}")
    x0, _ = train[0]
    classes = getattr(train, "num_classes", None) or getattr(model, "num_classes", None)
    return StagedNet.from_sequential(model, input_shape=tuple(x0.shape), num_classes=classes, head=head)


def _reset_head(head: nn.Module, salt: str) -> None:
    """Initialise a head from ``salt`` alone, so identical prefixes get identical heads in any model."""
    cpu = copy.deepcopy(head).to("cpu")  # initialise on the CPU generator only: no other RNG is touched
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(salt[:15], 16))
        for m in cpu.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    head.load_state_dict(cpu.state_dict())


class _Run:
    """State of one ``fit`` call: configuration, the store, the stage cache and the batch sources."""

    store: Optional[FeatureStore]
    cache: StageCache
    plan: Any = None
    current_unit = 0  # the unit (stage) training now; the memory guard re-plans from it
    world: distributed.World = distributed.World()

    def __init__(self, method: Method, epochs: int, batch_size: int, search: Optional[SearchConfig],
                 config: TrainConfig, seed: int, store_dtype: torch.dtype, device: torch.device, progress: Progress,
                 share: bool) -> None:
        self.method, self.epochs, self.batch_size, self.search = method, epochs, batch_size, search
        self.config, self.seed, self.store_dtype, self.device = config, seed, store_dtype, device
        self.progress, self.share = progress, share
        self.measure = False  # measure one steady-state step per stage (set when training under a budget)

    def fit(self, net: StagedNet, train: Dataset, val: Optional[Dataset]) -> FitResult:
        t0 = time.perf_counter()
        report = FitReport(self.method.name, self.epochs, self.batch_size, str(self.device),
                           PeakMeter(self.device).source, plan=self.plan)
        units = [[i] for i in range(len(net))] if self.method.per_stage else [list(range(len(net)))]
        src = DatasetSource(train, self.batch_size, self.seed, device=self.device)
        val_src = DatasetSource(val, self.batch_size, shuffle=False, device=self.device) if val is not None else None
        if self.world.active:  # this rank's part of every single-process batch; rank 0's initial weights
            src, val_src = distributed.dataset_sources(train, val, self.batch_size, self.seed, self.device)
            distributed.broadcast_(net)
        inputs: tuple[Any, Any] = (train, val)  # what the next stage's store entry is built from
        # the validation set shapes training only through the search (it picks the winner)
        upstream = dataset_fingerprint(train) + (dataset_fingerprint(val) if val is not None and self.search else "")
        for k, unit in enumerate(units):
            self.current_unit = k
            kind = "data" if k == 0 else self.method.source
            srep = self._train_unit(net, unit, k, kind, upstream, src, val_src)
            upstream = srep.stage_key
            if k + 1 < len(units):
                src, val_src, inputs = self._next_sources(net.stages[unit[-1]].body, src, val_src, inputs, srep)
            report.stages.append(srep)
        report.wall_s = time.perf_counter() - t0
        net.drop_heads().eval()
        for p in net.parameters():  # frozen only while later stages trained: the result is an ordinary model
            p.requires_grad_(True)
        return FitResult(net, report)

    # -- one unit (a stage, or the whole net for total/checkpoint) ------------------------------------------
    def _train_unit(self, net: StagedNet, unit: list[int], k: int, kind: str, upstream: str, src: BatchSource,
                    val_src: Optional[BatchSource]) -> StageReport:
        stages = [net.stages[i] for i in unit]
        body = stages[0].body if len(stages) == 1 else nn.Sequential(*[s.body for s in stages])
        head = stages[-1].head
        _reset_head(head, stage_key(upstream=upstream, body=body, purpose="head-init", seed=self.seed))
        chain = CheckpointedChain([s.body for s in stages]) if self.method.checkpoint else body
        trainable = nn.Sequential(chain, head)
        # What the cache holds: the same parameters under names that do not depend on the method's wrapping, so
        # "total" and "checkpoint" (one key: the same computation) can load each other's stages and progress.
        saved = nn.Sequential(body, head)
        key = stage_key(upstream=upstream, body=body, head=head, source=kind,
                        store_dtype=str(self.store_dtype) if kind == "store" else None, config=asdict(self.config),
                        search=asdict(self.search) if self.search else None, epochs=self.epochs,
                        batch_size=self.batch_size, seed=self.seed)
        layers = f"{unit[0] + 1}" if len(unit) == 1 else f"{unit[0] + 1}-{unit[-1] + 1}"
        cap = StageCap.for_stage(self.device, self.plan if self.method.per_stage else None, k)  # budget enforced on CUDA
        with PeakMeter(self.device) as meter, cap:
            t = time.perf_counter()
            done = self.cache.load(key) if self.share else None
            if done is not None:
                saved.load_state_dict(done["state"])
                srep = StageReport(**{**done["report"], "cached": True})
            else:
                srep = self._train(trainable, saved, key, k, layers, src, val_src)
                srep.seconds = time.perf_counter() - t  # before saving: a cached stage reports its training time
                self.cache.save(key, {"state": saved.state_dict(), "report": asdict(srep)})
                self.cache.discard(key, "progress")
            seconds = time.perf_counter() - t
        srep.peak_mem_mib = meter.peak_mib
        srep.planned_mib, srep.used_mib, srep.reserved_mib = cap.planned_mib, cap.used_mib, cap.reserved_mib
        for p in body.parameters():
            p.requires_grad_(False)
        body.eval()
        log.info("stage %s: val_acc=%s (%.1fs, cached=%s)", layers, srep.val_acc, seconds, srep.cached)
        return srep

    def _train(self, trainable: nn.Module, saved: nn.Module, key: str, k: int, layers: str, src: BatchSource,
               val_src: Optional[BatchSource]) -> StageReport:
        steps_per_epoch = -(-src.rows // self.batch_size)
        desc = f"stage {layers}"
        if self.search is not None:
            configs = draw_configs(self.search, self.config, salt=key)
            start = {k_: v.detach().clone() for k_, v in trainable.state_dict().items()}

            def make() -> nn.Module:
                trainable.load_state_dict(start)
                return distributed.wrap(copy.deepcopy(trainable), self.device)

            best, trials = run_search(make, configs, src, val_src, self.epochs, steps_per_epoch, self.search.halving,
                                      self.search.eta, self.progress, desc, measure=self.measure)
            trainable.load_state_dict(distributed.unwrap(best.net).state_dict())
        else:
            best, trials = self._train_resumable(trainable, saved, key, src, val_src, desc), []
        measured = best.stats.measured_peak
        return StageReport(stage=k + 1, layers=layers, seconds=0.0, peak_mem_mib=0.0, train_acc=best.stats.accuracy,
                           measured_peak_mib=None if measured is None else measured / 2**20,
                           val_acc=best.val_acc, lr=best.config.lr, weight_decay=best.config.weight_decay,
                           trials=max(1, len(trials)), stage_key=key, search=trials)

    def _train_resumable(self, trainable: nn.Module, state: nn.Module, key: str, src: BatchSource,
                         val_src: Optional[BatchSource], desc: str) -> Trial:
        """One configuration, all epochs, saving after each epoch so a killed run continues from there.

        ``state``: the module whose state_dict is saved (``trainable``'s parameters under method-independent names).
        """
        trial = Trial(self.config, trainable, Cursor())
        saved = self.cache.load(key, "progress")
        if saved is not None:
            state.load_state_dict(saved["state"])
            trial.optimizer.load_state_dict(saved["optimizer"])
            trial.cursor = Cursor(**saved["cursor"])
            trial.stats = StepStats(**saved.get("stats", {}))
            log.info("%s: resuming after epoch %d", desc, trial.cursor.epoch)
        started = time.perf_counter() - saved.get("seconds", 0.0) if saved else time.perf_counter()
        measured = saved.get("measured_peak") if saved else None
        ddp = distributed.wrap(trainable, self.device)  # trainable itself in a world of one
        while trial.cursor.epoch < self.epochs:
            trial.stats = train_steps(ddp, trial.optimizer, src, None, trial.cursor, self.progress, desc,
                                      measure_at=1 if self.measure else -1)
            measured = trial.stats.measured_peak or measured
            trial.stats.measured_peak = measured
            self.cache.save(key, {"state": state.state_dict(), "optimizer": trial.optimizer.state_dict(),
                                  "cursor": asdict(trial.cursor), "seconds": time.perf_counter() - started,
                                  "measured_peak": measured, "stats": asdict(trial.stats)},
                            "progress")
        trial.val_acc = evaluate(trainable, val_src)
        return trial

    # -- what the next stage reads -----------------------------------------------------------------------
    def _next_sources(self, body: nn.Module, src: BatchSource, val_src: Optional[BatchSource], inputs: tuple,
                      srep: StageReport) -> tuple[BatchSource, Optional[BatchSource], tuple]:
        if self.method.source == "recompute":
            return PrefixSource(src, [body]), (PrefixSource(val_src, [body]) if val_src else None), inputs
        assert self.store is not None
        if self.world.active:  # each rank builds its shard; the sources cut single-process batches by rank
            return distributed.next_sources(self.store, body, inputs, srep, self.batch_size, self.seed,
                                            self.store_dtype, self.device, self.progress.enabled)
        t = time.perf_counter()
        entries = []
        for split, data in zip(("train", "val"), inputs):
            if data is None:
                entries.append(None)
                continue
            upstream = data.key if hasattr(data, "key") else dataset_fingerprint(data)
            key = self.store.key(upstream=upstream, module=body, dtype=self.store_dtype, split=split)
            entries.append(self.store.build(key, body, data, batch_size=max(self.batch_size, 256),
                                            device=self.device, storage_dtype=self.store_dtype,
                                            progress=self.progress.enabled))
        srep.store_seconds = time.perf_counter() - t
        srep.store_key = entries[0].key
        srep.store_bytes = sum(e.nbytes for e in entries if e is not None)
        new_val = StoreSource(entries[1], self.batch_size, shuffle=False, device=self.device) if entries[1] else None
        return StoreSource(entries[0], self.batch_size, self.seed, device=self.device), new_val, tuple(entries)
