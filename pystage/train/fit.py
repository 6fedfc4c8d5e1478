"""``fit``: train a network with one of the methods, stage by stage, and report what it cost.

Every method trains through the one engine (``engine.Engine``); a method only says which stages train
together, where their batches come from and which options it supports (``config.Method``). Everything
``fit`` is given is checked (``validate``) before any stage trains.
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
from pystage.store import FeatureStore, StoreCorruptError, dataset_fingerprint, default_root
from pystage.train import validate as check
from pystage.train.cache import StageCache, stage_key
from pystage.train.config import Method, TrainConfig, check_options, get_method
from pystage.train.engine import CheckpointedChain, Cursor, Engine, StepStats, check_compile_mode, compiled
from pystage.train.errors import FitTypeError
from pystage.train.features import MAX_REPAIRS, FeatureChain, rebuilt
from pystage.train.feed import Feed, model_dtype
from pystage.train.guard import fit_under_budget
from pystage.train.peak import PeakMeter
from pystage.train.progress import Progress
from pystage.train.report import FitReport, FitResult, StageReport
from pystage.train.search import SearchConfig, Trial, draw_configs, run_search
from pystage.train.sources import BatchSource, DatasetSource, PrefixSource, StoreSource, data_device

log = logging.getLogger(__name__)


def fit(model: nn.Module, train: Any, val: Any = None, method: str = "partial", epochs: int = 1,
        batch_size: int = 50, memory_budget: Union[int, str, None] = None, search: Optional[SearchConfig] = None,
        store: Optional[FeatureStore] = None, device: Union[str, torch.device, None] = None,
        checkpoint_dir: Optional[str] = None, *, config: Optional[TrainConfig] = None, seed: int = 0,
        head: str = "linear", progress: Optional[bool] = None, share_prefixes: bool = True,
        store_dtype: torch.dtype = torch.float16, measure_memory: bool = True, growth: Any = None,
        compile_mode: Optional[str] = None) -> FitResult:
    """Train ``model`` (an ``nn.Sequential`` with ``split_points``, or a ``StagedNet``) on ``train``.

    ``train``/``val``: Datasets of ``(x, y)`` or ``(x, y)`` arrays (``pystage.data.as_dataset``). Trained
    stages are kept under ``checkpoint_dir`` (default: ``<store root>/stages``), keyed by content: a run
    started again with the same arguments resumes from the last finished stage (and epoch), and identical
    prefixes of other architectures are trained once (``share_prefixes=False`` retrains them). Returns the
    trained ``StagedNet`` (in eval mode) and a per-stage report. Each stage's second training step is
    measured by live-tensor accounting (``StageReport.measured_peak_mib``: the training memory a budget
    limits; ``measure_memory=False`` skips it). Arguments, data and model are checked before anything trains
    (``pystage.train.errors``); a non-finite loss or weight stops a stage with ``NonFiniteError``.

    On a GPU, training data held as tensors and stored features that fit the store's ``device_budget`` are kept
    in device memory; feature entries are built there and their disk copies written in the background (``fit``
    returns once they are on disk). ``compile_mode``: run each stage's forward and backward under
    ``torch.compile(mode=compile_mode)`` ("default", "reduce-overhead": CUDA graphs on a GPU, ...); None (the
    default) runs eagerly (docs/store.md, "Training at GPU speed").
    """
    m = get_method(method)
    config = config if config is not None else TrainConfig()
    check.check_arguments(epochs=epochs, batch_size=batch_size, seed=seed, head=head, progress=progress,
                          share_prefixes=share_prefixes, measure_memory=measure_memory, config=config,
                          search=search, store_dtype=store_dtype, memory_budget=memory_budget)
    check_options(m, dict(memory_budget=memory_budget, search=search, store=store, checkpoint_dir=checkpoint_dir,
                          share_prefixes=share_prefixes, store_dtype=store_dtype, measure_memory=measure_memory,
                          growth=growth, distributed=distributed.requested_size() > 1, compile_mode=compile_mode))
    check_compile_mode(compile_mode)
    if store is not None and not isinstance(store, FeatureStore):
        raise FitTypeError("store", type(store).__name__, "None or a pystage.FeatureStore")
    dev = check.resolve_device(device)
    train, val = check.as_data(train, "train"), check.as_data(val, "val", required=False)
    check.check_pair(train, val)
    if m.grows:  # incremental / capacity: options in ``growth`` (docs/growing.md)
        module, func = m.grows.split(":")
        return getattr(importlib.import_module(module), func)(
            model, train, val, growth, epochs=epochs, batch_size=batch_size, device=dev, config=config, seed=seed,
            store=store, head=head, progress=Progress(progress), store_dtype=store_dtype,
            checkpoint_dir=checkpoint_dir, share_prefixes=share_prefixes, measure_memory=measure_memory)
    return _fit_stages(m, model, train, val, memory_budget, store, dev, checkpoint_dir,
                       dict(epochs=epochs, batch_size=batch_size, search=search, config=config, seed=seed,
                            store_dtype=store_dtype, progress=Progress(progress), share=share_prefixes,
                            compile_mode=compile_mode),
                       head, measure_memory)


def _fit_stages(m: Method, model: nn.Module, train: Dataset, val: Optional[Dataset], budget: Any,
                store: Optional[FeatureStore], dev: torch.device, checkpoint_dir: Any, opts: dict, head: str,
                measure: bool) -> FitResult:
    if not isinstance(model, (nn.Sequential, StagedNet)):
        check.staged_model(model, train, head)  # raises the model error
    if budget is not None and isinstance(model, StagedNet):
        raise FitTypeError("model", type(model).__name__, "an nn.Sequential: fit(memory_budget=...) plans its "
                           "split points")
    out = check.check_model(model, train[0][0])  # one forward of one sample through the whole model
    if opts["search"] is not None and val is None:
        from pystage.data import train_val_split

        train, val = train_val_split(train, val_fraction=0.1, seed=opts["seed"])
    classes = check.classes_of(model, train, out)
    check.check_labels(train, "train", classes)
    check.check_labels(val, "val", classes)
    store = store if store is not None else (FeatureStore() if m.source == "store" else None)
    if store is not None and m.source == "store":
        check.check_writable(store.directory, "store")
    root = checkpoint_dir if checkpoint_dir is not None else os.path.join(
        store.config.root if store is not None else default_root(), "stages")
    check.check_writable(root, "checkpoint_dir")
    world, dev = distributed.init(dev)  # joins the process group (torchrun's environment) if any
    if budget is not None and dev.type == "cuda" and store is not None and store.config.device_budget == "auto":
        store = store.replace(device_budget=0)  # the planned budget has no room for features held on the GPU
    run = _Run(m, dev, store, StageCache(str(root)), **opts)
    run.data_on_device = budget is None  # nor for the data set
    if world.active:  # rank 0 writes checkpoints, every rank reads them
        run.world, run.cache = world, distributed.RankZeroCache(run.cache)  # type: ignore[assignment]
    if budget is not None:  # planner's split points; re-planned if a stage runs out of memory anyway
        return fit_under_budget(run, model, train, val, head, budget, _plan, check.staged_model)
    run.measure = measure
    return run.fit(check.staged_model(model, train, head).to(run.device), train, val)


def _plan(model: nn.Module, train: Dataset, batch_size: int, budget: Union[int, str], run: "_Run", head: str):
    """Split points under ``budget`` from the planner (estimated memory of each candidate stage's training step)."""
    from pystage.memory import linear_head, pooled_head
    from pystage.plan import plan

    x0, _ = train[0]
    p = plan(model, tuple(x0.shape), batch_size, budget, device=run.device, optimizer=run.config,
             num_classes=check.classes_of(model, train), dataset_rows=len(train), store_dtype=run.store_dtype,
             head=pooled_head if head == "pool-linear" else linear_head)
    log.info("%s", p)
    return p


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
    """State of one ``fit`` call: configuration, the store and its feature chain, the stage cache, the sources."""

    plan: Any = None
    data_on_device = True  # a GPU run holds a tensor data set on the device when it fits (not under a budget)
    current_unit = 0  # the unit (stage) training now; the memory guard re-plans from it
    world: distributed.World = distributed.World()

    def __init__(self, method: Method, device: torch.device, store: Optional[FeatureStore], cache: StageCache, *,
                 epochs: int, batch_size: int, search: Optional[SearchConfig], config: TrainConfig, seed: int,
                 store_dtype: torch.dtype, progress: Progress, share: bool, compile_mode: Optional[str] = None) -> None:
        self.method, self.device, self.store, self.cache = method, device, store, cache
        self.epochs, self.batch_size, self.search, self.config, self.seed = epochs, batch_size, search, config, seed
        self.store_dtype, self.progress, self.share, self.compile_mode = store_dtype, progress, share, compile_mode
        self.measure = False  # measure one steady-state step per stage (set when training under a budget)

    def fit(self, net: StagedNet, train: Dataset, val: Optional[Dataset]) -> FitResult:
        t0 = time.perf_counter()
        report = FitReport(self.method.name, self.epochs, self.batch_size, str(self.device),
                           PeakMeter(self.device).source, plan=self.plan)
        units = [[i] for i in range(len(net))] if self.method.per_stage else [list(range(len(net)))]
        part = (self.world.rank, self.world.size)
        on = data_device(self.device, self.store, train, val) if self.data_on_device else None
        src: BatchSource = DatasetSource(train, self.batch_size, self.seed, part=part, device=on)
        val_src = DatasetSource(val, self.batch_size, shuffle=False, part=part, device=on) if val is not None else None
        distributed.broadcast_(net)  # rank 0's initial weights on every rank (no-op in a world of one)
        self.chain = FeatureChain(self.store, self.store_dtype, self.batch_size, self.device, self.progress.enabled) \
            if self.store is not None and self.method.source == "store" else None
        inputs: tuple[Any, ...] = (train, val)  # what the next stage's store entry is built from
        # the validation set shapes training only through the search (it picks the winner)
        upstream = dataset_fingerprint(train) + (dataset_fingerprint(val) if val is not None and self.search else "")
        for k, unit in enumerate(units):
            self.current_unit = k
            kind = "data" if k == 0 else self.method.source
            srep, src, val_src, inputs = self._train_unit_repairing(net, unit, k, kind, upstream, src, val_src, inputs)
            upstream = srep.stage_key
            if k + 1 < len(units):
                src, val_src, inputs = self._next_sources(net.stages[unit[-1]].body, src, val_src, inputs, srep)
            report.stages.append(srep)
        if self.chain is not None:
            self.chain.wait()  # every disk copy written in the background is published before fit returns
        report.wall_s = time.perf_counter() - t0
        net.drop_heads().eval()
        for p in net.parameters():  # frozen only while later stages trained: the result is an ordinary model
            p.requires_grad_(True)
        return FitResult(net, report)

    def _train_unit_repairing(self, net: StagedNet, unit: list[int], k: int, kind: str, upstream: str,
                              src: BatchSource, val_src: Optional[BatchSource], inputs: tuple) -> tuple:
        """``_train_unit``; a corrupt store entry found while training is rebuilt and the unit trained again."""
        bodies = [net.stages[i].body for i in unit]
        initial = [{n: t.detach().to("cpu", copy=True) for n, t in b.state_dict().items()} for b in bodies]
        for attempt in range(MAX_REPAIRS + 1):
            try:
                return self._train_unit(net, unit, k, kind, upstream, src, val_src), src, val_src, inputs
            except StoreCorruptError as e:
                if self.chain is None or attempt == MAX_REPAIRS or not self.chain.repair(e):
                    raise
            for b, state in zip(bodies, initial):  # back to the unit's initial weights: its key depends on them
                b.load_state_dict(state)
            inputs = rebuilt(self.chain, inputs)
            src, val_src = self._store_sources(inputs)
        raise AssertionError("unreachable")

    # -- one unit (a stage, or the whole net for total/checkpoint) ------------------------------------------
    def _train_unit(self, net: StagedNet, unit: list[int], k: int, kind: str, upstream: str, src: BatchSource,
                    val_src: Optional[BatchSource]) -> StageReport:
        stages = [net.stages[i] for i in unit]
        body = stages[0].body if len(stages) == 1 else nn.Sequential(*[s.body for s in stages])
        head = stages[-1].head
        _reset_head(head, stage_key(upstream=upstream, body=body, purpose="head-init", seed=self.seed))
        chain = CheckpointedChain([s.body for s in stages]) if self.method.checkpoint else body
        trainable = compiled(nn.Sequential(chain, head), None if self.world.active else self.compile_mode)
        # What the cache holds: the same parameters under names that do not depend on the method's wrapping, so
        # "total" and "checkpoint" (one key: the same computation) can load each other's stages and progress.
        saved = nn.Sequential(body, head)
        key = stage_key(upstream=upstream, body=body, head=head, source=kind, features=_content(src, val_src, self),
                        store_dtype=str(self.store_dtype) if kind == "store" else None, config=asdict(self.config),
                        search=self.search.key() if self.search else None, epochs=self.epochs,
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
                srep = self._train(trainable, saved, key, k, layers, src, val_src)  # the one place a stage trains
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
        engine = Engine(trainable, self.config, self.device, stage=layers, progress=self.progress,
                        desc=f"stage {layers}")
        if self.search is not None:
            configs = draw_configs(self.search, self.config, salt=key)
            best, trials = run_search(engine, configs, src, val_src, self.epochs, self.search.halving,
                                      self.search.eta, measure=self.measure, mode=self.search.mode,
                                      under_budget=self.plan is not None, forward=self.search.forward)
        else:
            best, trials = self._train_resumable(engine, saved, key, src, val_src), []
        measured = best.stats.measured_peak
        return StageReport(stage=k + 1, layers=layers, seconds=0.0, peak_mem_mib=0.0, train_acc=best.stats.accuracy,
                           measured_peak_mib=None if measured is None else measured / 2**20,
                           val_acc=best.val_acc, lr=best.config.lr, weight_decay=best.config.weight_decay,
                           trials=max(1, len(trials)), stage_key=key, search=trials)

    def _train_resumable(self, engine: Engine, state: nn.Module, key: str, src: BatchSource,
                         val_src: Optional[BatchSource]) -> Trial:
        """One configuration, all epochs, saving after each epoch so a killed run continues from there.

        ``state``: the module whose state_dict is saved (the trainable parameters under method-independent names).
        """
        trial = Trial(self.config)
        saved = self.cache.load(key, "progress")
        if saved is not None:
            state.load_state_dict(saved["state"])
            engine.optimizer.load_state_dict(saved["optimizer"])
            trial.cursor = Cursor(**saved["cursor"])
            trial.stats = StepStats(**saved.get("stats", {}))
            log.info("%s: resuming after epoch %d", engine.desc, trial.cursor.epoch)
        started = time.perf_counter() - saved.get("seconds", 0.0) if saved else time.perf_counter()
        measured = saved.get("measured_peak") if saved else None
        while trial.cursor.epoch < self.epochs:
            trial.stats = engine.run(src, None, trial.cursor, measure_at=1 if self.measure else -1)
            measured = trial.stats.measured_peak or measured
            trial.stats.measured_peak = measured
            self.cache.save(key, {"state": state.state_dict(), "optimizer": engine.optimizer.state_dict(),
                                  "cursor": asdict(trial.cursor), "seconds": time.perf_counter() - started,
                                  "measured_peak": measured, "stats": asdict(trial.stats)},
                            "progress")
        trial.val_acc = engine.evaluate(val_src)
        return trial

    # -- what the next stage reads -----------------------------------------------------------------------
    def _next_sources(self, body: nn.Module, src: BatchSource, val_src: Optional[BatchSource], inputs: tuple,
                      srep: StageReport) -> tuple[BatchSource, Optional[BatchSource], tuple]:
        if self.method.source == "recompute":
            feed = Feed(self.device, model_dtype(body))
            return PrefixSource(src, [body], feed), (PrefixSource(val_src, [body], feed) if val_src else None), inputs
        assert self.chain is not None
        entries, srep.store_seconds = self.chain.build(body, inputs)
        srep.store_key = entries[0].key
        srep.store_bytes = sum(e.nbytes for e in entries if e is not None)
        return (*self._store_sources(entries), entries)

    def _store_sources(self, entries: tuple) -> tuple[BatchSource, Optional[BatchSource]]:
        part = (self.world.rank, self.world.size)
        train = StoreSource(entries[0], self.batch_size, self.seed, part=part, device=self.device)
        val = StoreSource(entries[1], self.batch_size, shuffle=False, part=part, device=self.device) \
            if entries[1] is not None else None
        return train, val


def _content(src: BatchSource, val_src: Optional[BatchSource], run: _Run) -> Optional[list[str]]:
    """The content digests of the stored features a unit reads (None when it reads no stored features)."""
    if not isinstance(src, StoreSource):
        return None
    val = val_src.data.content_digest if run.search is not None and isinstance(val_src, StoreSource) else None
    return [src.data.content_digest, val]
