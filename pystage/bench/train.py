"""``pystage-bench train``: the methods side by side on one model and data set (the default job).

Each method runs in a fresh process (same data, same seed, its own temporary
feature store), so wall time and peak memory are its own. Peak memory is CUDA's
max_memory_allocated on a GPU; on CPU it is the process's peak RSS sampled while
fit runs (it includes the Python process and torch itself, ~300 MiB).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

from pystage.bench.report import environment, format_table, print_environment, write_json

METHODS = ("total", "partial", "partial-recompute", "checkpoint", "plain")  # plain: pystage/bench/plain.py
COLUMNS = ["method", "model", "epochs", "wall_s", "vs_total", "peak_mem_mib", "train_acc", "val_acc", "store_s"]
BUDGET_COLUMNS = ["method", "fits", "predicted_peak_mib", "measured_peak_mib", "budget_mib", "wall_s", "epoch_s",
                  "val_acc"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cnn8", help="a name from pystage.models.get (default cnn8: 3 stages)")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10", "mnist", "npz"])
    p.add_argument("--path", help="data folder/file for cifar10, mnist, npz (never downloaded)")
    p.add_argument("--n", type=int, default=4000, help="synthetic training rows (default 4000)")
    p.add_argument("--val-n", type=int, default=1000, help="synthetic validation rows")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from " + ", ".join(METHODS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", help="memory budget (e.g. 64MiB): partial methods plan their split points under it, "
                   "total is marked 'does not fit' when its predicted peak exceeds it")
    p.add_argument("--json", metavar="PATH", help="write the runs as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of wall time, peak memory and accuracy")
    p.add_argument("--nproc", type=int, default=1, help="also run each method data-parallel on N processes "
                   "(torchrun; one thread per process unless --threads) and report the scaling")


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method in a child process and return its figures."""
    with tempfile.TemporaryDirectory(prefix="pystage-train-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run([sys.executable, "-m", "pystage.bench.train_worker", spec_path, out_path],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pystage-bench train: method {spec['method']!r} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    total = next((r["wall_s"] for r in runs if r["method"] == "total" and r.get("wall_s")), None)
    rows = []
    for r in runs:
        row = dict(r)
        row["vs_total"] = r["wall_s"] / total if total and r.get("wall_s") else "-"
        if not r.get("wall_s"):
            row.update(wall_s=r.get("status", "-"), peak_mem_mib="-", store_s="-")
        for k in ("train_acc", "val_acc"):
            row[k] = f"{100 * r[k]:.1f}%" if isinstance(r.get(k), float) else "-"
        rows.append(row)
    return rows


def _budget_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's view of the model under the budget (same data shape and batch as the runs)."""
    import torch

    import pystage
    from pystage.bench.train_worker import load_data
    from pystage.units import parse_bytes

    train, _ = load_data({"data": args.data, "path": args.path, "n": min(args.n, 64), "val_n": 8, "seed": args.seed})
    torch.manual_seed(args.seed)
    model = pystage.models.get(args.model, in_channels=train.x.shape[1], num_classes=train.num_classes)
    budget = parse_bytes(args.budget)
    try:
        plan = pystage.plan(model, tuple(train.x.shape[1:]), args.batch_size, budget, device=args.device,
                            num_classes=train.num_classes, dataset_rows=args.n)
        text, stages = str(plan), [s.peak / 2**20 for s in plan.stages]
        total, splits = plan.total_predicted_bytes, list(plan.split_points)
    except pystage.PlanError as exc:
        raise SystemExit(f"pystage-bench train: {exc}") from exc
    return {"budget_mib": budget / 2**20, "total_predicted_mib": total / 2**20, "split_points": splits,
            "stages": [{"predicted_mib": p} for p in stages], "text": text}


def _does_not_fit(args: argparse.Namespace, budget: dict[str, Any]) -> dict[str, Any]:
    return {"method": "total", "model": args.model, "epochs": args.epochs, "wall_s": None, "fits": False,
            "status": "does not fit", "predicted_peak_mib": budget["total_predicted_mib"],
            "budget_mib": budget["budget_mib"], "measured_peak_mib": None, "val_acc": None, "train_acc": None,
            "epoch_s": None}


def _annotate(run: dict[str, Any], budget: dict[str, Any]) -> None:
    """Budget columns: predicted (planner) and measured (live tensor bytes of a steady-state step) peaks."""
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
    for ax, key, label in zip(axes, ("wall_s", "peak_mem_mib", "val_acc"),
                              ("wall time (s)", f"peak memory (MiB, {runs[0]['peak_mem_source']})", "val accuracy")):
        ax.bar(names, [r.get(key) or 0 for r in runs], color="#4c72b0")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"pystage-bench train: {runs[0]['model']}, {runs[0]['epochs']} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"pystage-bench train: --methods got {bad}, expected names from {', '.join(METHODS)}")
    if args.data != "synthetic" and not args.path:
        raise SystemExit(f"pystage-bench train: --data {args.data} needs --path (data is never downloaded)")
    env = environment(args.device)
    print_environment(env)
    base = {"model": args.model, "data": args.data, "path": args.path, "n": args.n, "val_n": args.val_n,
            "epochs": args.epochs, "batch_size": args.batch_size, "device": args.device, "seed": args.seed,
            "threads": args.threads}
    if args.nproc > 1:  # each method on 1 and on N processes (pystage/bench/train_dist.py); plain is one process
        from pystage.bench.train_dist import run_distributed

        return run_distributed(args, [m for m in methods if m != "plain"], base, env)
    budget = _budget_plan(args) if args.budget else None
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
    done = [r for r in runs if r.get("wall_s")]
    print(format_table(_rows(runs), COLUMNS))
    from pystage.bench.plain import targets

    ratios = targets(runs, args.n)
    for name, value in ratios.items():
        if value is not None:
            print(f"{name}: {value:.3f}")
    print(f"peak memory: {done[0]['peak_mem_source'] if done else '-'}")
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
