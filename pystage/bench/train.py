"""``pystage-bench train``: the methods side by side on one model and data set.

Each method runs in a fresh process (same data, same seed, its own temporary
feature store), so wall time and memory are its own. ``measured_peak_mib`` is the
training memory a budget limits (pystage/bench/train_worker.py): on CPU the live
tensor bytes of a steady-state training step, on a GPU ``max_memory_allocated``.
``rss_peak_mib`` is the process's peak RSS (torch and Python included, ~300 MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

from pystage.bench.errors import from_json
from pystage.bench.report import environment, format_table, print_environment, require_plotting, write_json
from pystage.errors import UsageError

METHODS = ("total", "partial", "partial-recompute", "checkpoint", "plain")  # plain: pystage/bench/plain.py
COLUMNS = ["method", "model", "epochs", "wall_s", "vs_total", "measured_peak_mib", "rss_peak_mib", "train_acc",
           "val_acc", "store_s"]
BUDGET_COLUMNS = ["method", "fits", "predicted_peak_mib", "measured_peak_mib", "budget_mib", "wall_s", "epoch_s",
                  "val_acc"]


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cnn8", help="a name from pystage.models.get (default cnn8: 3 stages)")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10", "mnist", "npz"])
    p.add_argument("--path", help="data folder/file for cifar10, mnist, npz (never downloaded)")
    p.add_argument("--n", type=positive_int, default=4000, help="synthetic training rows (default 4000)")
    p.add_argument("--val-n", type=positive_int, default=1000, help="synthetic validation rows")
    p.add_argument("--epochs", type=positive_int, default=2)
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", help="memory budget (e.g. 64MiB): partial methods plan their split points under it, "
                   "total is marked 'does not fit' when its predicted peak exceeds it")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"],
                   help="pystage's methods train each stage under torch.compile(mode=...) (fit's compile_mode; "
                   "reduce-overhead: CUDA graphs on a GPU); default: eager")
    p.add_argument("--json", metavar="PATH", help="write the runs as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of wall time, training memory and accuracy")
    p.add_argument("--nproc", type=positive_int, default=1, help="also run each method data-parallel on N processes "
                   "(torchrun; one thread per process unless --threads) and report the scaling")


def run_method(spec: dict[str, Any], running: Optional[set] = None) -> dict[str, Any]:
    """Run one method in a child process and return its figures.

    ``running``: a set that holds the child's ``Popen`` while it runs (so that a caller running several
    at once can stop the others when one fails).
    """
    with tempfile.TemporaryDirectory(prefix="pystage-train-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.Popen([sys.executable, "-m", "pystage.bench.train_worker", spec_path, out_path],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if running is not None:
            running.add(proc)
        try:
            _, stderr = proc.communicate()
        finally:
            if running is not None:
                running.discard(proc)
        error = from_json(_read(out_path), f"method {spec['method']!r}")
        if error is not None:  # a user error in the worker (bad data, impossible budget): one line, as here
            raise error
        if proc.returncode != 0:
            raise RuntimeError(f"pystage-bench train: method {spec['method']!r} failed (exit {proc.returncode}):\n"
                               f"{stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def _read(path: str) -> dict[str, Any]:
    """A worker's JSON output; empty if it wrote none."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total = next((r["wall_s"] for r in runs if r["method"] == "total" and r.get("wall_s")), None)
    rows = []
    for r in runs:
        row = dict(r)
        row["vs_total"] = r["wall_s"] / total if total and r.get("wall_s") else "-"
        if not r.get("wall_s"):
            row.update(wall_s=r.get("status", "-"), measured_peak_mib="-", rss_peak_mib="-", store_s="-")
        elif r.get("measured_peak_mib") is None:  # plain on the CPU: no live-tensor accounting in a user's loop
            row["measured_peak_mib"] = "-"
        for k in ("train_acc", "val_acc"):
            row[k] = f"{100 * r[k]:.1f}%" if isinstance(r.get(k), float) else "-"
        rows.append(row)
    return rows


def parse_methods(text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated method names of ``--methods``, each one of ``known``."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in known]
    if bad or not methods:
        raise UsageError(f"--methods got {','.join(bad) or repr(text)}, expected names from {', '.join(known)}")
    return methods


def check_inputs(args: argparse.Namespace, shape: Optional[list[int]] = None) -> Any:
    """Refuse what cannot run before any worker starts (one-line errors); the training set, for its shape."""
    import torch

    import pystage
    from pystage.bench.train_worker import load_data

    if args.data != "synthetic" and not args.path:
        raise UsageError(f"--data {args.data} needs --path (its folder or file; data is never downloaded)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch.cuda.is_available() is False")
    train, _ = load_data({"data": args.data, "path": args.path, "n": min(args.n, 64), "val_n": 8, "seed": args.seed,
                          "shape": shape})
    pystage.models.get(args.model, in_channels=train.x.shape[1], num_classes=train.num_classes)  # a known name?
    return train


def _budget_plan(args: argparse.Namespace, train: Any) -> dict[str, Any]:
    """The planner's view of the model under the budget (same data shape and batch as the runs)."""
    import torch

    import pystage
    from pystage.units import parse_bytes

    torch.manual_seed(args.seed)
    model = pystage.models.get(args.model, in_channels=train.x.shape[1], num_classes=train.num_classes)
    budget = parse_bytes(args.budget, "--budget")
    plan = pystage.plan(model, tuple(train.x.shape[1:]), args.batch_size, budget, device=args.device,
                        num_classes=train.num_classes, dataset_rows=args.n)  # PlanError: an impossible budget
    text, stages = str(plan), [s.peak / 2**20 for s in plan.stages]
    total, splits = plan.total_predicted_bytes, list(plan.split_points)
    return {"budget_mib": budget / 2**20, "total_predicted_mib": total / 2**20, "split_points": splits,
            "stages": [{"predicted_mib": p} for p in stages], "text": text}


def _does_not_fit(args: argparse.Namespace, budget: dict[str, Any]) -> dict[str, Any]:
    return {"method": "total", "model": args.model, "epochs": args.epochs, "wall_s": None, "fits": False,
            "status": "does not fit", "predicted_peak_mib": budget["total_predicted_mib"],
            "budget_mib": budget["budget_mib"], "measured_peak_mib": None, "rss_peak_mib": None, "val_acc": None,
            "train_acc": None, "epoch_s": None}


def _annotate(run: dict[str, Any], budget: dict[str, Any]) -> None:
    """Budget columns: predicted (planner) and measured (the training memory a budget limits) peaks."""
    predicted = {"total": budget["total_predicted_mib"]}.get(run["method"])
    if run["method"].startswith("partial"):
        predicted = max(s["predicted_mib"] for s in budget["stages"])
    measured = run.get("measured_peak_mib")
    run.update(budget_mib=budget["budget_mib"], predicted_peak_mib=predicted,
               fits=measured is not None and measured <= budget["budget_mib"],
               epoch_s=run["train_s"] / run["epochs"])


def _epoch_ratio(runs: list[dict[str, Any]]) -> Optional[float]:
    by = {r["method"]: r for r in runs}
    if "partial" in by and "checkpoint" in by and by["checkpoint"].get("epoch_s"):
        return by["partial"]["epoch_s"] / by["checkpoint"]["epoch_s"]
    return None


def plot(runs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in runs if r.get("wall_s")]
    names = [r["method"] for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    source = next((r["measured_peak_source"] for r in runs if r.get("measured_peak_source")), "")
    memory = "training memory (MiB): " + ("max_memory_allocated" if "cuda" in source else "live tensors of a step")
    for ax, key, label in zip(axes, ("wall_s", "measured_peak_mib", "val_acc"),
                              ("wall time (s)", memory, "val accuracy")):
        ax.bar(names, [r.get(key) or 0 for r in runs], color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"pystage-bench train: {runs[0]['model']}, {runs[0]['epochs']} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def memory_note(runs: list[dict[str, Any]]) -> str:
    """The line under a table that says what its memory columns measured."""
    source = next((r["measured_peak_source"] for r in runs if r.get("measured_peak_source")), "-")
    return (f"memory: measured_peak_mib = the training memory a budget limits: {source}; rss_peak_mib = the "
            f"process's peak RSS (torch, Python and buffers included)")


def run(args: argparse.Namespace) -> int:
    methods = parse_methods(args.methods, METHODS)
    require_plotting(args.plot)
    train = check_inputs(args)
    env = environment(args.device)
    print_environment(env)
    base = {"model": args.model, "data": args.data, "path": args.path, "n": args.n, "val_n": args.val_n,
            "epochs": args.epochs, "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
            "threads": args.threads, "compile_mode": args.compile_mode}
    if args.nproc > 1:  # each method on 1 and on N processes (pystage/bench/train_dist.py); plain is one process
        from pystage.bench.train_dist import run_distributed

        return run_distributed(args, [m for m in methods if m != "plain"], base, env)
    budget = _budget_plan(args, train) if args.budget else None
    runs = []
    for method in methods:
        if budget is not None and method == "total" and budget["total_predicted_mib"] > budget["budget_mib"]:
            runs.append(_does_not_fit(args, budget))
            continue
        print(f"  running {method} ...", flush=True)
        spec = {**base, "method": method}
        if budget is not None:
            spec.update(budget=budget["budget_mib"])
            if method.startswith("partial"):  # the plan printed below (fit(memory_budget=...) would plan the same)
                spec.update(split_points=budget["split_points"])
        runs.append(run_method(spec))
        if budget is not None:
            _annotate(runs[-1], budget)
    print(format_table(_rows(runs), COLUMNS))
    print(memory_note(runs))
    from pystage.bench.plain import targets

    ratios = targets(runs, args.n)
    for name, value in ratios.items():
        if value is not None:
            print(f"{name}: {value:.3f}")
    payload: dict[str, Any] = {"benchmark": "train", "environment": env, "runs": runs, **ratios}
    if budget is not None:
        print(budget["text"])
        print(format_table(runs, BUDGET_COLUMNS))
        ratio = _epoch_ratio(runs)
        if ratio is not None:
            print(f"partial (stored features) epoch time / checkpoint epoch time: {ratio:.3f}")
        payload["plan"] = {k: v for k, v in budget.items() if k != "text"}
        payload["partial_vs_checkpoint_epoch"] = ratio
    write_json(args.json, payload)
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0
