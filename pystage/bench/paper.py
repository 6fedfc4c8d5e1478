"""``pystage-bench paper``: Griswold's CNN1-CNN8 experiment (Tables 2 and 3), and what sharing prefixes saves.

Every model of the paper's Table 1 trains with a per-stage hyper-parameter search
(``SearchConfig(draws=...)``): CNN1 end to end (method ``total``, one stage), CNN2-CNN8
stage by stage (method ``partial``). Table 2 of the paper is 1 epoch and 10 draws,
Table 3 is 2 epochs and 5 draws. The sweep runs twice in one process:

* **shared**: one stage cache and one feature store for all eight models, built after the
  same ``torch.manual_seed``, so identical prefixes have identical keys and train once
  (stage 1 of CNN1/6/8, stages 1-2 of CNN5/7, stage 2 of CNN6/8), as in the paper;
* **independent**: a fresh stage cache and store per model: every stage trains.

By default the two are interleaved model by model (a load change on a shared machine
falls on both); ``shared_s``/``independent_s`` sum each sweep's fit times. The printed
table has the paper's layout (one column per CNN; learning rate and regularisation per
stage as ``a/b/c``). bench/paper/README.md says how to read it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from pystage import data as pdata
from pystage import models
from pystage.bench.report import environment, format_table, print_environment, write_json
from pystage.errors import UsageError
from pystage.staged import StagedNet
from pystage.store import FeatureStore
from pystage.train import FitReport, SearchConfig, fit

MODELS = tuple(f"cnn{i}" for i in range(1, 9))
TABLES = {"2": (1, 10), "3": (2, 5)}  # the paper's table -> (epochs, search draws)
ROWS = ("Learning Rate", "Regularization", "Time (in seconds)", "Training Accuracy", "Validation Accuracy")
N_SYNTHETIC = 500  # default synthetic training rows: the whole job in a few minutes on 2 cores
TARGET_RATIO = 0.75  # the target: shared_s <= 0.75 * independent_s


@dataclass(frozen=True)
class Settings:
    """One sweep's settings (everything that decides the stage keys, and so what is shared)."""

    epochs: int = 1
    draws: int = 10
    batch_size: int = 50
    lr: float = 1e-3  # the search's start point (the paper: its hand-tuned CNN1 point)
    weight_decay: float = 1e-4
    halving: bool = True
    width: int = 32
    seed: int = 0
    device: str = "cpu"
    search_mode: str = "population"  # how each stage's draws train: "population" (all at once) or "sequential"

    def search(self) -> SearchConfig:
        return SearchConfig(draws=self.draws, lr=self.lr, weight_decay=self.weight_decay, halving=self.halving,
                            seed=self.seed, mode=self.search_mode)


@dataclass
class Sweep:
    """One pass over the models: their fit reports, wall and CPU times (``wall_s``/``cpu_s``: the whole pass)."""

    mode: str  # "shared" | "independent"
    reports: dict[str, FitReport] = field(default_factory=dict)
    model_s: dict[str, float] = field(default_factory=dict)
    model_cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return sum(self.model_s.values())

    @property
    def cpu_s(self) -> float:
        return sum(self.model_cpu_s.values())


def method_of(model: torch.nn.Sequential) -> str:
    """One stage: total learning (CNN1); several: partial learning."""
    return "partial" if getattr(model, "split_points", ()) else "total"


def build(name: str, in_channels: int, num_classes: int, settings: Settings) -> torch.nn.Sequential:
    """Model ``name`` built right after ``torch.manual_seed(seed)``: equal prefixes get equal initial weights."""
    torch.manual_seed(settings.seed)
    return models.get(name, in_channels=in_channels, num_classes=num_classes, width=settings.width)


def fit_one(name: str, train: Dataset, val: Dataset, settings: Settings, where: str,
            search: Optional[SearchConfig] = None) -> tuple[FitReport, float, float]:
    """Build and fit model ``name`` with its stage cache and store under ``where``: (report, wall s, CPU s)."""
    t, c = time.perf_counter(), time.process_time()
    x0, _ = train[0]
    model = build(name, x0.shape[0], getattr(train, "num_classes", None) or 10, settings)
    result = fit(model, train, val, method=method_of(model), epochs=settings.epochs, batch_size=settings.batch_size,
                 search=search or settings.search(), store=FeatureStore(where), device=settings.device,
                 checkpoint_dir=os.path.join(where, "stages"), seed=settings.seed, progress=False)
    return result.report, time.perf_counter() - t, time.process_time() - c


def schedule(names: Sequence[str], modes: Sequence[str], interleave: bool) -> list[tuple[str, str]]:
    """(model, sweep) in run order. Interleaved: model by model, alternating which sweep goes first, so that a
    change in machine load between the sweeps falls on both; else one whole sweep after the other."""
    if not interleave:
        return [(n, m) for m in modes for n in names]
    return [(n, m) for i, n in enumerate(names) for m in (modes if i % 2 == 0 else modes[::-1])]


def run_sweeps(names: Sequence[str], train: Dataset, val: Dataset, settings: Settings, root: str,
               modes: Sequence[str] = ("shared", "independent"), interleave: bool = True) -> dict[str, Sweep]:
    """Fit every model once per sweep: "shared" uses one stage cache + store under ``root``, "independent" a
    fresh one per model (nothing is shared, every stage trains)."""
    bad = [m for m in modes if m not in ("shared", "independent")]
    if bad or not modes:
        raise ValueError(f"modes must be 'shared' and/or 'independent', got {list(modes)}")
    sweeps = {m: Sweep(m) for m in modes}
    for name, mode in schedule(names, modes, interleave):
        where = os.path.join(root, "shared" if mode == "shared" else f"independent-{name}")
        rep, wall, cpu = fit_one(name, train, val, settings, where)
        sweep = sweeps[mode]
        sweep.reports[name], sweep.model_s[name], sweep.model_cpu_s[name] = rep, wall, cpu
    for sweep in sweeps.values():  # models in ``names`` order whatever the schedule
        sweep.reports = {n: sweep.reports[n] for n in names}
        sweep.model_s = {n: sweep.model_s[n] for n in names}
        sweep.model_cpu_s = {n: sweep.model_cpu_s[n] for n in names}
    return sweeps


def warm_up(names: Sequence[str], train: Dataset, val: Dataset, settings: Settings, root: str) -> None:
    """Untimed: one tiny fit (imports, optimizer, store files), then a training step and a store-sized forward
    of every stage of every model, so that neither sweep pays the first call of a shape (kernel selection)."""
    def first(d: Dataset, n: int) -> Dataset:
        n = min(n, len(d))  # type: ignore[arg-type]
        return d.subset(torch.arange(n)) if hasattr(d, "subset") else torch.utils.data.Subset(d, range(n))

    where = os.path.join(root, "warm-up")
    fit_one("cnn2", first(train, 2 * settings.batch_size), first(val, settings.batch_size), settings, where,
            search=SearchConfig(draws=1, seed=settings.seed))
    shutil.rmtree(where, ignore_errors=True)
    shape, classes = tuple(train[0][0].shape), getattr(train, "num_classes", None) or 10
    for name in names:
        net = StagedNet.from_sequential(build(name, shape[0], classes, settings), input_shape=shape,
                                        num_classes=classes).to(settings.device)
        x = torch.randn(settings.batch_size, *shape, device=settings.device)  # (B, C, H, W)
        for stage in net.stages:
            stage.logits(x).sum().backward()
            with torch.no_grad():
                stage.body(torch.randn(max(settings.batch_size, 256), *x.shape[1:], device=settings.device))
            x = stage.body(x).detach()


def stage_macs(name: str, input_shape: Sequence[int], num_classes: int, width: int) -> list[int]:
    """Multiply-accumulates per sample of each stage's forward (convs + its linear head): the compute share of
    each stage, to read the measured saving against."""
    with torch.random.fork_rng(devices=[]):  # leaves the global RNG as it was
        model = models.get(name, in_channels=input_shape[0], num_classes=num_classes, width=width)
    count = [0]

    def hook(m: torch.nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        count[0] += out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    out, x = [], torch.zeros(1, *input_shape)  # (1, C, H, W)
    with torch.no_grad():
        for body in models.stages(model):
            count[0] = 0
            x = body(x)
            out.append(count[0] + x[0].numel() * num_classes)
    for h in handles:
        h.remove()
    return out


def macs_ratio(sweep: Sweep, input_shape: Sequence[int], num_classes: int, width: int) -> float:
    """Forward MACs of the stages ``sweep`` trained / of all stages: the ratio sharing could reach by compute."""
    done = total = 0
    for name, rep in sweep.reports.items():
        for macs, s in zip(stage_macs(name, input_shape, num_classes, width), rep.stages):
            total += macs
            done += 0 if s.cached else macs
    return done / total if total else float("nan")


# -- the paper's table ----------------------------------------------------------------------------------------
def _hp(x: float) -> str:
    """The paper prints 6 decimals; values below 1e-4 get 3 significant digits so none reads as 0."""
    return f"{x:.6f}" if x >= 1e-4 else f"{x:.2e}"


def _acc(x: Optional[float]) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def column(report: FitReport, seconds: float) -> dict[str, str]:
    """One CNN's column: per-stage lr and regularisation (``a/b/c``), time, training and validation accuracy."""
    return {
        "Learning Rate": "/".join(_hp(s.lr) for s in report.stages),
        "Regularization": "/".join(_hp(s.weight_decay) for s in report.stages),
        "Time (in seconds)": f"{seconds:.2f}",
        "Training Accuracy": _acc(report.train_acc),
        "Validation Accuracy": _acc(report.val_acc),
    }


def _header(name: str) -> str:
    return name.upper().replace("CNN", "CNN ") if name.startswith("cnn") else name


def paper_table(sweep: Sweep, times: dict[str, float]) -> str:
    """The paper's layout: a ``Result`` column, then one column per CNN; one row per ``ROWS`` entry."""
    cols = {name: column(rep, times[name]) for name, rep in sweep.reports.items()}
    rows = [{"Result": row, **{_header(n): c[row] for n, c in cols.items()}} for row in ROWS]
    return format_table(rows, ["Result", *(_header(n) for n in cols)])


def sharing_table(sweeps: dict[str, Sweep]) -> str:
    """Per model: which stages the shared sweep took from the cache, and each sweep's time for it."""
    first = next(iter(sweeps.values()))
    rows = []
    if "shared" in sweeps:
        rows.append({"Result": "Stages cached (shared)",
                     **{_header(n): "/".join("yes" if s.cached else "no" for s in r.stages)
                        for n, r in sweeps["shared"].reports.items()}})
    for mode, sweep in sweeps.items():
        rows.append({"Result": f"Time, {mode} sweep (s)",
                     **{_header(n): f"{t:.2f}" for n, t in sweep.model_s.items()}})
    return format_table(rows, ["Result", *(_header(n) for n in first.reports)])


def model_records(sweeps: dict[str, Sweep]) -> list[dict[str, Any]]:
    """The JSON ``models`` list: per model and stage (of the shared sweep), lr, weight decay, time, accuracies,
    cached; ``time_s`` of a cached stage is what it took to train in the model that trained it first."""
    main = sweeps.get("shared") or sweeps["independent"]
    out = []
    for name, rep in main.reports.items():
        rec: dict[str, Any] = {
            "name": name, "method": rep.method, "train_acc": rep.train_acc, "val_acc": rep.val_acc,
            "stages": [{"stage": s.stage, "layers": s.layers, "lr": s.lr, "weight_decay": s.weight_decay,
                        "time_s": s.seconds, "store_s": s.store_seconds, "train_acc": s.train_acc,
                        "val_acc": s.val_acc, "cached": s.cached, "trials": s.trials, "stage_key": s.stage_key}
                       for s in rep.stages],
        }
        for mode, sweep in sweeps.items():
            rec[f"{mode}_s"], rec[f"{mode}_cpu_s"] = sweep.model_s[name], sweep.model_cpu_s[name]
        if "independent" in sweeps and "shared" in sweeps:
            other = sweeps["independent"].reports[name]
            rec["independent_stage_time_s"] = [s.seconds for s in other.stages]
            rec["same_result_both_sweeps"] = same_result(rep, other)
        out.append(rec)
    return out


def same_result(a: FitReport, b: FitReport) -> bool:
    """Sharing must change only the time: same stage keys, hyper-parameters and accuracies."""
    def key(r: FitReport) -> str:  # repr: NaN accuracies compare equal
        return repr([(s.stage_key, s.lr, s.weight_decay, s.val_acc, s.train_acc) for s in r.stages])

    return key(a) == key(b)


# -- data --------------------------------------------------------------------------------------------------------
def load_data(name: str, path: Optional[str], n: Optional[int], n_val: Optional[int], seed: int):
    """``(train, val)``: synthetic train/val splits, or CIFAR-10's training batches with the last ``n_val`` held out."""
    if name == "synthetic":
        n = N_SYNTHETIC if n is None else n
        n_val = max(50, n // 5) if n_val is None else n_val
        return pdata.synthetic(n=n, seed=seed, split="train"), pdata.synthetic(n=n_val, seed=seed, split="val")
    if path is None:
        raise UsageError("--data cifar10 needs --path DIR (the cifar-10-batches-py folder)")
    full = pdata.cifar10(path, "train")
    n_val = 1000 if n_val is None else n_val  # CS231n's split: 49000 train, 1000 validation
    rest = len(full) - n_val
    if not 0 < n_val < len(full):
        raise UsageError(f"--n-val must be in [1, {len(full) - 1}], got {n_val}")
    n = rest if n is None else min(n, rest)
    return full.subset(torch.arange(n)), full.subset(torch.arange(rest, len(full)))


# -- the job -----------------------------------------------------------------------------------------------------
def experiment(train: Dataset, val: Dataset, settings: Settings, names: Sequence[str] = MODELS,
               sweeps: Sequence[str] = ("shared", "independent"), root: Optional[str] = None,
               warm: bool = True, interleave: bool = True) -> dict[str, Sweep]:
    """The core: a warm-up fit, then the sweeps, in a temporary directory (under ``root``) removed afterwards."""
    tmp = tempfile.mkdtemp(prefix="pystage-paper-", dir=root)
    try:
        if warm:
            warm_up(names, train, val, settings, tmp)
        return run_sweeps(names, train, val, settings, tmp, sweeps, interleave)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summary(sweeps: dict[str, Sweep], input_shape: Sequence[int], num_classes: int, width: int) -> dict[str, Any]:
    """Sweep times (wall and CPU), their ratios, the cached stages, and the MACs ratio to read them against."""
    out: dict[str, Any] = {f"{m}_s": s.wall_s for m, s in sweeps.items()}
    out.update({f"{m}_cpu_s": s.cpu_s for m, s in sweeps.items()})
    if "shared" in sweeps and "independent" in sweeps:
        shared, indep = sweeps["shared"], sweeps["independent"]
        out.update(ratio=shared.wall_s / indep.wall_s, cpu_ratio=shared.cpu_s / indep.cpu_s,
                   target_ratio=TARGET_RATIO)
        out["meets_target"] = out["ratio"] <= TARGET_RATIO
        out["same_results"] = all(same_result(shared.reports[n], indep.reports[n]) for n in shared.reports)
    if "shared" in sweeps:
        out["cached_stages"] = [f"{n}:{s.stage}" for n, r in sweeps["shared"].reports.items()
                                for s in r.stages if s.cached]
        out["macs_ratio"] = macs_ratio(sweeps["shared"], input_shape, num_classes, width)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10"],
                   help="built-in synthetic data (default) or CIFAR-10 from --path (never downloaded)")
    p.add_argument("--path", default=None, help="CIFAR-10 folder (cifar-10-batches-py) for --data cifar10")
    p.add_argument("--n", type=int, default=None,
                   help=f"training rows (default: {N_SYNTHETIC} synthetic; all but --n-val for cifar10)")
    p.add_argument("--n-val", type=int, default=None,
                   help="validation rows (default: n/5 synthetic; the last 1000 training images for cifar10)")
    p.add_argument("--table", default="2", choices=["2", "3", "both"],
                   help="the paper's Table 2 (1 epoch, 10 draws; default), Table 3 (2 epochs, 5 draws) or both")
    p.add_argument("--epochs", type=int, default=None, help="override the table's epochs per stage")
    p.add_argument("--draws", type=int, default=None, help="override the table's search draws per stage")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated model names (default cnn1..cnn8)")
    p.add_argument("--width", type=int, default=32, help="filters per conv (the paper: 32)")
    p.add_argument("--batch-size", type=int, default=50, help="batch size (the paper: 50)")
    p.add_argument("--lr", type=float, default=SearchConfig.lr, help="the search's start learning rate (Adam)")
    p.add_argument("--weight-decay", type=float, default=SearchConfig.weight_decay,
                   help="the search's start L2 regularisation")
    p.add_argument("--halving", default="on", choices=["on", "off", "both"],
                   help="successive halving (on, default), every draw trained for all epochs as the paper did "
                   "(off), or both, one after the other")
    p.add_argument("--no-halving", action="store_true", help="the same as --halving off")
    p.add_argument("--search", default="population", choices=["population", "sequential", "both"],
                   help="each stage's draws train at once (population, default), one at a time (sequential), or "
                   "both, one after the other")
    p.add_argument("--sweeps", default="both", choices=["both", "shared", "independent"],
                   help="run the shared sweep, the independent one, or both (default; needed for the ratio)")
    p.add_argument("--schedule", default="interleaved", choices=["interleaved", "sequential"],
                   help="interleaved (default): model by model, both sweeps; sequential: one sweep, then the other")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine, multi-threaded kernels slow down erratically "
                   "when other processes take a core; 0: torch's default, faster on an idle machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to train on (default cpu)")
    p.add_argument("--tmp", default=None, help="parent of the temporary stage caches and stores (default: system)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def runs_of(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(table, search mode, halving) for every run the arguments ask for, in run order."""
    tables = ["2", "3"] if args.table == "both" else [args.table]
    searches = ["population", "sequential"] if args.search == "both" else [args.search]
    halving = "off" if args.no_halving else args.halving
    halvings = [True, False] if halving == "both" else [halving == "on"]
    return [(t, s, h) for t in tables for s in searches for h in halvings]


def search_times(results: list[dict[str, Any]], modes: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: its table, search mode, halving, and each sweep's time (the JSON's ``search_times``)."""
    return [{"table": r["table"], "search": r["search"], "halving": "on" if r["halving"] else "off",
             **{f"{m}_s": r[f"{m}_s"] for m in modes}} for r in results]


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    modes = ("shared", "independent") if args.sweeps == "both" else (args.sweeps,)
    train, val = load_data(args.data, args.path, args.n, args.n_val, args.seed)
    shape, classes = tuple(train[0][0].shape), getattr(train, "num_classes", None) or 10
    env = environment(args.device)
    print_environment(env)
    print(f"data: {args.data}, {len(train)} training rows, {len(val)} validation rows; "
          f"models: {', '.join(names)}; schedule: {args.schedule}")
    results = []
    for table, search, halving in runs_of(args):
        epochs, draws = TABLES[table]
        settings = Settings(epochs=args.epochs or epochs, draws=draws if args.draws is None else args.draws,
                            batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                            halving=halving, width=args.width, seed=args.seed, device=args.device,
                            search_mode=search)
        sweeps = experiment(train, val, settings, names, modes, root=args.tmp,
                            interleave=args.schedule == "interleaved")
        main = sweeps.get("shared") or sweeps["independent"]
        how = "successive halving" if settings.halving else "every draw trained fully"
        print(f"\nTable {table}: results for the CNNs with {settings.epochs} epoch(s) and {settings.draws} "
              f"hyper-parameter draws per stage ({how}, {search} search, batch {settings.batch_size})")
        print(paper_table(main, (sweeps.get("independent") or main).model_s))
        print()
        print(sharing_table(sweeps))
        s = summary(sweeps, shape, classes, settings.width)
        print(f"\nsweep time, table {table}: " + " | ".join(f"{m}: {s[f'{m}_s']:.2f} s" for m in modes))
        if "ratio" in s:
            verdict = "meets" if s["meets_target"] else "misses"
            print(f"ratio shared/independent: {s['ratio']:.3f} wall ({verdict} the target <= {TARGET_RATIO}), "
                  f"{s['cpu_ratio']:.3f} CPU time; {s['macs_ratio']:.3f} of the stage MACs are not shared; "
                  f"same results in both sweeps: {s['same_results']}")
        results.append({"table": table, "epochs": settings.epochs, "draws": settings.draws,
                        "halving": settings.halving, "search": search, "width": settings.width,
                        "batch_size": settings.batch_size, "schedule": args.schedule, **s,
                        "models": model_records(sweeps)})
    times = search_times(results, modes)
    if len(results) > 1:
        print("\nSweep times by table, search and halving (s)")
        print(format_table(times, ["table", "search", "halving", *[f"{m}_s" for m in modes]]))
    payload: dict[str, Any] = {"benchmark": "paper", "environment": env, "data": args.data, "n_train": len(train),
                               "n_val": len(val), "seed": args.seed, **results[0]}
    if len(results) > 1:
        payload["tables"] = results  # one entry per (table, search, halving) run
        payload["search_times"] = times
    write_json(args.json, payload)
    return 0
