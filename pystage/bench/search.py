"""``pystage-bench search``: a stage's hyper-parameter search with every draw at once, against one draw at a time
and against a single draw.

One model (default ``cnn6``: two stages, method ``partial``) is fit with a per-stage search three ways, in one
process, repeat by repeat in turn (a change of load on a shared machine falls on all three):

* ``one``: the start point only (``draws=0``): what one trial costs;
* ``sequential``: ``draws`` draws trained one at a time (``SearchConfig(mode="sequential")``);
* ``population``: the same draws trained at once (``mode="population"``, ``--vmap``).

Every fit gets a fresh feature store and stage cache. Reported per way: the median over ``--repeats`` of fit's
wall time, of the stages' search time (``StageReport.seconds``: training and evaluating the trials, store
builds left out) and of the process's CPU time; the ratios population/sequential (the CPU target: <= 1) and
population/one (the GPU target: <= 2.5 for 10 draws). Both searches must choose the same hyper-parameters
(``same_choice``). bench/search/README.md says how to read it.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Optional

import torch

from pystage import data as pdata
from pystage import models
from pystage.bench.report import environment, format_table, print_environment, write_json
from pystage.bench.timing import sync
from pystage.errors import UsageError
from pystage.store import FeatureStore
from pystage.train import SearchConfig, fit

WAYS = ("one", "sequential", "population")
COLUMNS = ["way", "trials", "fit_s", "search_s", "cpu_s", "vs_one", "vs_sequential", "val_acc"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cnn6", help="a name from pystage.models.get (default cnn6: 2 stages)")
    p.add_argument("--n", type=int, default=500, help="synthetic training rows (default 500)")
    p.add_argument("--n-val", type=int, default=100, help="synthetic validation rows (default 100)")
    p.add_argument("--width", type=int, default=32, help="filters per conv (default 32)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--draws", type=int, default=10, help="draws besides the start point (default 10: 11 trials)")
    p.add_argument("--halving", action="store_true", help="successive halving (default: every draw trains fully)")
    p.add_argument("--vmap", default="auto", choices=["auto", "on", "off"],
                   help="the population's members: vmap (on), a loop (off), or vmap on CUDA only (auto, default)")
    p.add_argument("--repeats", type=int, default=3, help="timed fits per way (default 3; the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmp", default=None, help="parent of the temporary stores and caches (default: system)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def search_config(way: str, args: argparse.Namespace) -> SearchConfig:
    vmap = {"auto": None, "on": True, "off": False}[args.vmap]
    return SearchConfig(draws=0 if way == "one" else args.draws, halving=args.halving, seed=args.seed,
                        mode="population" if way == "population" else "sequential", vmap=vmap)


def fit_once(way: str, train: Any, val: Any, args: argparse.Namespace, root: str) -> dict[str, Any]:
    """One fit of ``args.model`` with ``way``'s search in a fresh store and cache under ``root``: its figures."""
    where = tempfile.mkdtemp(prefix=f"{way}-", dir=root)
    try:
        torch.manual_seed(args.seed)
        model = models.get(args.model, in_channels=train[0][0].shape[0], num_classes=10, width=args.width)
        method = "partial" if getattr(model, "split_points", ()) else "total"
        t, c = time.perf_counter(), time.process_time()
        rep = fit(model, train, val, method=method, epochs=args.epochs, batch_size=args.batch_size,
                  search=search_config(way, args), store=FeatureStore(where), device=args.device,
                  checkpoint_dir=os.path.join(where, "stages"), seed=args.seed, progress=False).report
        sync(args.device)
        return {"fit_s": time.perf_counter() - t, "cpu_s": time.process_time() - c,
                "search_s": sum(s.seconds for s in rep.stages), "val_acc": rep.val_acc,
                "choice": [(s.lr, s.weight_decay) for s in rep.stages],
                "trials": [len(s.search) for s in rep.stages], "modes": sorted({t["mode"] for s in rep.stages
                                                                                for t in s.search})}
    finally:
        shutil.rmtree(where, ignore_errors=True)


def measure(train: Any, val: Any, args: argparse.Namespace, root: str) -> dict[str, list[dict[str, Any]]]:
    """An untimed warm-up fit per way on a few rows, then ``args.repeats`` rounds of one fit per way."""
    small = argparse.Namespace(**{**vars(args), "epochs": 1})
    few_train, few_val = train.subset(torch.arange(2 * args.batch_size)), val.subset(torch.arange(args.batch_size))
    for way in WAYS:
        fit_once(way, few_train, few_val, small, root)
    runs: dict[str, list[dict[str, Any]]] = {w: [] for w in WAYS}
    for r in range(args.repeats):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            runs[way].append(fit_once(way, train, val, args, root))
    return runs


def summarize(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Table rows (medians per way) and the ratios."""
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("fit_s", "search_s", "cpu_s")}
           for w, rs in runs.items()}
    rows = [{"way": w, "trials": "/".join(str(t) for t in rs[0]["trials"]), **med[w],
             "vs_one": med[w]["search_s"] / med["one"]["search_s"],
             "vs_sequential": med[w]["search_s"] / med["sequential"]["search_s"], "val_acc": rs[0]["val_acc"]}
            for w, rs in runs.items()]
    pop, seq, one = med["population"], med["sequential"], med["one"]
    out = {"population_vs_sequential": pop["search_s"] / seq["search_s"],
           "population_vs_sequential_cpu": pop["cpu_s"] / seq["cpu_s"],
           "population_vs_one": pop["search_s"] / one["search_s"],
           "sequential_vs_one": seq["search_s"] / one["search_s"],
           "population_fit_vs_sequential_fit": pop["fit_s"] / seq["fit_s"],
           "same_choice": all(p["choice"] == s["choice"] for p, s in zip(runs["population"], runs["sequential"])),
           "population_ran": runs["population"][0]["modes"] == ["population"]}
    return rows, out


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch.cuda.is_available() is False")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    train = pdata.synthetic(n=args.n, seed=args.seed, split="train")
    val = pdata.synthetic(n=args.n_val, seed=args.seed, split="val")
    env = environment(args.device)
    env["command"] = getattr(args, "command", None) or env["command"]
    print_environment(env)
    print(f"model {args.model} (width {args.width}), {args.n} training / {args.n_val} validation rows, "
          f"{args.epochs} epoch(s), batch {args.batch_size}, {args.draws} draws + the start point, "
          f"{'successive halving' if args.halving else 'every draw trained fully'}, vmap {args.vmap}, "
          f"median of {args.repeats}")
    root = tempfile.mkdtemp(prefix="pystage-search-", dir=args.tmp)
    try:
        runs = measure(train, val, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, ratios = summarize(runs)
    print(format_table(rows, COLUMNS))
    print(f"\nsearch time, population / sequential: {ratios['population_vs_sequential']:.3f} wall, "
          f"{ratios['population_vs_sequential_cpu']:.3f} CPU (CPU target <= 1); population / one draw: "
          f"{ratios['population_vs_one']:.3f} (GPU target <= 2.5 for 10 draws); sequential / one draw: "
          f"{ratios['sequential_vs_one']:.3f}; same hyper-parameters chosen: {ratios['same_choice']}")
    write_json(args.json, {"benchmark": "search", "environment": env, "model": args.model, "n_train": args.n,
                           "n_val": args.n_val, "width": args.width, "epochs": args.epochs, "draws": args.draws,
                           "halving": args.halving, "vmap": args.vmap, "batch_size": args.batch_size,
                           "repeats": args.repeats, "rows": rows, **ratios, "runs": runs})
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pystage.bench.search`` (the same job as ``pystage-bench search``)."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m pystage.bench.search", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args.command = " ".join(shlex.quote(a) for a in ["python", "-m", "pystage.bench.search", *argv])
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
