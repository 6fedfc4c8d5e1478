"""``pystage-bench budget`` (the default job): a net whose end-to-end training needs >= 4x a memory budget,
trained within that budget, beside what end-to-end training would need.

Defaults: flat-14-16 (14 x conv3-16 + BatchNorm + ReLU at 16x16, then a pool; docs/models.md) on the built-in
synthetic data at 3x16x16 (4000 training rows, 1000 validation rows), batch 50, 3 epochs, budget 5 MiB.
Each run is its own process (pystage/bench/train_worker.py); two run at a time, one torch thread each
(``--parallel``, ``--threads``): on 2 cores that keeps both busy without intra-op threads, whose OpenMP
spin-waits make these small convolutions crawl whenever another process wants a core.

* ``total`` first takes two training steps on two batches with ``fit(method="total", measure_memory=True)``:
  what end-to-end training needs. Over the budget, it is reported as not fitting and trained no further;
  within it (a larger ``--budget``), it trains like the others.
* ``partial``: ``fit(method="partial", memory_budget=budget)``: the planner splits the net into stages
  whose training steps fit the budget, and each stage trains on the stored features of the one before.
* ``checkpoint``: end to end with ``torch.utils.checkpoint``: what it needs and how long it takes.

``measured_peak_mib`` is the training memory a budget limits (on CPU the live tensor bytes of a
steady-state training step, the largest over stages; on a GPU ``max_memory_allocated``); a run fits when
it is <= the budget. ``rss_peak_mib`` is the process's peak RSS (torch and Python included).
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any, Optional

from pystage.bench.report import environment, format_table, print_environment, require_plotting, write_json
from pystage.bench.train import check_inputs, memory_note, parse_methods, positive_int, run_method
from pystage.errors import UsageError

METHODS = ("total", "partial", "checkpoint", "partial-recompute")
DEFAULT_METHODS = "total,partial,checkpoint"
COLUMNS = ["method", "fits", "measured_peak_mib", "vs_budget", "predicted_peak_mib", "wall_s", "val_acc",
           "rss_peak_mib", "stages"]
TARGET_RATIO = 4.0  # end-to-end training needs at least this many budgets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="flat-14-16", help="a name from pystage.models.get (default flat-14-16)")
    p.add_argument("--budget", default="5MiB", help="the memory budget of one training step (default 5MiB)")
    p.add_argument("--data", default="synthetic", choices=["synthetic", "cifar10", "mnist", "npz"])
    p.add_argument("--path", help="data folder/file for cifar10, mnist, npz (never downloaded)")
    p.add_argument("--size", type=positive_int, default=16, help="synthetic image size (default 16: 3x16x16)")
    p.add_argument("--n", type=positive_int, default=4000, help="synthetic training rows (default 4000)")
    p.add_argument("--val-n", type=positive_int, default=1000, help="synthetic validation rows (default 1000)")
    p.add_argument("--epochs", type=positive_int, default=3, help="epochs (per stage for partial; default 3)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from {', '.join(METHODS)} "
                   f"(default {DEFAULT_METHODS})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1; 0: torch's default)")
    p.add_argument("--parallel", type=positive_int, default=2, help="runs at a time, each its own process "
                   "(default 2; 1: one after the other)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the runs as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a bar chart of training memory (with the budget), wall "
                   "time and accuracy")


def _spec(args: argparse.Namespace, method: str, **extra: Any) -> dict[str, Any]:
    return {"model": args.model, "data": args.data, "path": args.path, "n": args.n, "val_n": args.val_n,
            "shape": [3, args.size, args.size], "epochs": args.epochs, "batch_size": args.batch_size,
            "device": args.device, "seed": args.seed, "threads": args.threads, "method": method, **extra}


def _total(args: argparse.Namespace, budget_mib: float, running: set) -> dict[str, Any]:
    """Two end-to-end steps measure what total needs; it trains in full only when that fits the budget."""
    probe = run_method(_spec(args, "total", epochs=1, max_rows=2 * args.batch_size, val_n=args.batch_size), running)
    if probe["measured_peak_mib"] <= budget_mib:
        return run_method(_spec(args, "total"), running)
    return {**probe, "status": "does not fit", "wall_s": None, "val_acc": None, "train_acc": None,
            "probe_wall_s": probe["wall_s"], "epochs": 0, "stages": [], "split_points": []}


def _run(args: argparse.Namespace, method: str, budget_mib: float, running: set) -> dict[str, Any]:
    if method == "total":
        return _total(args, budget_mib, running)
    budget = int(budget_mib * 2**20) if method.startswith("partial") else None  # partial plans under it
    return run_method(_spec(args, method, memory_budget=budget), running)


def run_all(args: argparse.Namespace, methods: list[str], budget_mib: float) -> list[dict[str, Any]]:
    """Every method's run, ``args.parallel`` at a time; returned in ``methods`` order.

    The first run that fails stops the others (their worker processes are killed) and its error is raised.
    """
    rank = {"partial": 0, "total": 1}  # partial is the longest (it plans, then trains); total's two steps are short
    order = sorted(methods, key=lambda m: rank.get(m, 2))
    running: set = set()
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = {m: pool.submit(_run, args, m, budget_mib, running) for m in order}
        done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures.values() if f in done and f.exception() is not None), None)
        if failed is not None:
            for f in futures.values():
                f.cancel()
            for proc in list(running):  # our own worker processes
                proc.kill()
            raise failed.exception()  # type: ignore[misc]
        return [futures[m].result() for m in methods]


def _row(run: dict[str, Any], budget_mib: float, plan: Optional[dict[str, Any]]) -> dict[str, Any]:
    """One table row (and JSON run): the fit verdict and the budget ratio beside the run's figures."""
    measured = run["measured_peak_mib"]
    predicted = None
    if plan is not None:
        predicted = (plan["total_predicted_mib"] if run["method"] == "total"
                     else max(s["predicted_mib"] for s in plan["stages"]) if run["method"].startswith("partial")
                     else None)
    return {**run, "budget_mib": budget_mib, "fits": measured <= budget_mib, "vs_budget": measured / budget_mib,
            "predicted_peak_mib": predicted, "n_stages": max(1, len(run.get("stages") or []))}


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    """Printable cells: "yes"/"no", MiB, "3.2x", percentages; "-" where a figure does not apply."""
    return {**row, "fits": "yes" if row["fits"] else "no", "vs_budget": f"{row['vs_budget']:.2f}x",
            "predicted_peak_mib": "-" if row["predicted_peak_mib"] is None else row["predicted_peak_mib"],
            "wall_s": row["wall_s"] if row.get("wall_s") else row.get("status", "-"),
            "val_acc": "-" if row.get("val_acc") is None else f"{100 * row['val_acc']:.1f}%",
            "stages": row["n_stages"]}


def verdict(rows: list[dict[str, Any]], budget_mib: float) -> dict[str, Any]:
    """The pitch in numbers: how many budgets total needs, and whether partial trained within one."""
    by = {r["method"]: r for r in rows}
    out: dict[str, Any] = {"budget_mib": budget_mib, "target_ratio": TARGET_RATIO}
    if "total" in by:
        out["total_over_budget"] = by["total"]["measured_peak_mib"] / budget_mib
    if "partial" in by:
        out.update(partial_fits=by["partial"]["fits"], partial_val_acc=by["partial"]["val_acc"])
    return out


def _summary(v: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    by = {r["method"]: r for r in rows}
    parts = []
    if "total_over_budget" in v:
        parts.append(f"end-to-end training needs {by['total']['measured_peak_mib']:.1f} MiB = "
                     f"{v['total_over_budget']:.2f}x the {v['budget_mib']:g} MiB budget")
    if "partial" in by:
        p = by["partial"]
        acc = "-" if p["val_acc"] is None else f"{100 * p['val_acc']:.1f}%"
        parts.append(f"partial trained in {p['n_stages']} stages {'within' if p['fits'] else 'OVER'} it "
                     f"({p['measured_peak_mib']:.2f} MiB), val acc {acc}")
    return "; ".join(parts)


def plot(rows: list[dict[str, Any]], budget_mib: float, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [r["measured_peak_mib"] for r in rows], color=["#c44e52" if not r["fits"] else "#4c72b0"
                                                                       for r in rows])
    axes[0].axhline(budget_mib, color="black", linestyle="--", linewidth=1, label=f"budget {budget_mib:g} MiB")
    axes[0].legend(fontsize=8)
    axes[0].set_title("training memory (MiB): " + ("max_memory_allocated" if "cuda" in rows[0]["measured_peak_source"]
                                                   else "live tensors of a step"), fontsize=9)
    axes[1].bar(names, [r.get("wall_s") or 0 for r in rows], color="#4c72b0")
    axes[1].set_title("wall time (s; total: not trained)", fontsize=9)
    axes[2].bar(names, [r.get("val_acc") or 0 for r in rows], color="#4c72b0")
    axes[2].set_title("val accuracy", fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from pystage.units import parse_bytes

    t0 = time.perf_counter()
    methods = parse_methods(args.methods, METHODS)
    require_plotting(args.plot)
    budget_mib = parse_bytes(args.budget, "--budget") / 2**20
    if budget_mib <= 0:
        raise UsageError(f"--budget must be > 0, got {args.budget!r}")
    train = check_inputs(args, shape=[3, args.size, args.size])
    env = {**environment(args.device), "threads": args.threads or "default", "runs_at_a_time": args.parallel}
    print_environment(env)
    shape = "x".join(str(d) for d in train.x.shape[1:])
    print(f"{args.model} on {args.data} data ({shape}, {args.n if args.data == 'synthetic' else len(train)} training "
          f"rows), batch {args.batch_size}, {args.epochs} epoch(s), memory budget {budget_mib:g} MiB")
    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    print(f"  running {', '.join(methods)} ({args.parallel} at a time, {threads} each; total: two steps "
          f"measure what it needs) ...", flush=True)
    runs = run_all(args, methods, budget_mib)
    plan = next((r["plan"] for r in runs if r.get("plan")), None)
    rows = [_row(r, budget_mib, plan) for r in runs]
    print(format_table([_cells(r) for r in rows], COLUMNS))
    print(memory_note(rows))
    v = verdict(rows, budget_mib)
    print(_summary(v, rows))
    if plan is not None:
        print(plan["text"])
    job_s = time.perf_counter() - t0
    cpu = ", ".join(f"{r['method']} {r['cpu_s']:.1f} s" for r in runs if r.get("cpu_s") is not None)
    print(f"job: {job_s:.1f} s wall; CPU time of each run's process: {cpu}")
    payload = {"benchmark": "budget", "environment": env, "model": args.model, "data": args.data, "shape": shape,
               "n": args.n, "val_n": args.val_n, "epochs": args.epochs, "batch_size": args.batch_size,
               "threads_per_run": args.threads, "parallel": args.parallel, "runs": rows,
               "plan": None if plan is None else {k: val for k, val in plan.items() if k != "text"}, "job_s": job_s,
               **v}
    write_json(args.json, payload)
    if args.plot:
        plot(rows, budget_mib, args.plot, f"pystage-bench budget: {args.model}, budget {budget_mib:g} MiB")
        print(f"plot: {args.plot}")
    return 0
