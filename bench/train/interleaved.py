"""``pystage-bench train``'s target ratios on a shared machine: the methods interleaved over rounds, medians.

Each round runs every method once, in its own process (``pystage.bench.train.run_method``, as the CLI does),
in an order rotated from round to round, and records its wall time and the process's CPU time (user + system,
every thread: partial's writer thread included). A ratio is taken within a round (methods run minutes
apart, under whatever load the machine had then), and the report gives each round's ratios, their
medians, and the load average around every run. CPU-time ratios move much less with other jobs' load than
wall-time ratios; on a quiet machine the two agree.

    python bench/train/interleaved.py --rounds 3 --threads 1 [--n 5000 --epochs 4 --json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_round(methods: list[str], base: dict, run_method) -> list[dict]:
    out = []
    for method in methods:
        load, cpu0, t0 = os.getloadavg()[0], _cpu(), time.perf_counter()
        fig = run_method({**base, "method": method})
        out.append({"method": method, "wall_s": fig["wall_s"], "process_s": time.perf_counter() - t0,
                    "cpu_s": _cpu() - cpu0, "store_s": fig["store_s"], "val_acc": fig["val_acc"],
                    "load_before": load, "load_after": os.getloadavg()[0]})
    return out


def ratios(runs: list[dict], rows: int, epochs: int) -> dict:
    by = {r["method"]: r for r in runs}
    got = {}
    for key in ("wall_s", "cpu_s"):
        if "plain" in by and "total" in by:
            got[f"total_vs_plain_throughput_{key[:-2]}"] = by["plain"][key] / by["total"][key]  # same rows: 1/time
        if "partial" in by and "total" in by:
            got[f"partial_vs_total_{key[:-2]}"] = by["partial"][key] / by["total"][key]
    return got


def main(argv: list[str]) -> int:
    from pystage.bench.report import environment, print_environment
    from pystage.bench.train import run_method

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cnn8")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--val-n", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--methods", default="plain,total,partial")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    env = environment(args.device)
    env["command"] = "python bench/train/interleaved.py " + " ".join(argv)
    print_environment(env)
    methods = [m for m in args.methods.split(",") if m]
    base = {"model": args.model, "data": "synthetic", "path": None, "n": args.n, "val_n": args.val_n,
            "epochs": args.epochs, "batch_size": args.batch_size, "device": args.device, "seed": 0,
            "threads": args.threads}
    rounds = []
    for i in range(args.rounds):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        runs = run_round(order, base, run_method)
        rounds.append({"order": order, "runs": runs, "ratios": ratios(runs, args.n, args.epochs)})
        print(f"round {i + 1} ({', '.join(order)}): " + "  ".join(
            f"{r['method']} {r['wall_s']:.1f}s wall {r['cpu_s']:.1f}s cpu (load {r['load_before']:.1f})" for r in runs))
        print("  " + "  ".join(f"{k} {v:.3f}" for k, v in rounds[-1]["ratios"].items()), flush=True)
    medians = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
    print("medians: " + "  ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rounds": rounds, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
