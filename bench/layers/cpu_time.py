"""The layers benchmark's CPU cases timed in thread CPU time, one thread: figures that hold on a busy machine.

`pystage-bench layers` measures wall time with every thread torch uses; on a machine shared with other
jobs those figures move by 2-10x from run to run. This script runs the same cases (pystage.bench.layers)
in one thread and times each call by `time.thread_time()` (CPU time of the calling thread: time spent
waiting for a core does not count), keeping the minimum of repeats. Ratios (speedup, forward overhead)
are what to read; absolute times are one core's.

    python bench/layers/cpu_time.py [--cases 0,1,2] [--fractions 1.0,0.5,0.25,0.1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from pystage import autotune
from pystage.bench.layers import CASES, FRACTIONS, _dense, _input, _masked, _units, ideal_speedup
from pystage.bench.report import environment, format_table, print_environment


def cpu_ms(fn, setup=None, warmup: int = 2, repeats: int = 7) -> float:
    """Minimum thread CPU time of fn() in ms (setup() untimed before each call)."""
    best = float("inf")
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        t0 = time.thread_time()
        fn()
        if i >= warmup:
            best = min(best, time.thread_time() - t0)
    return best * 1e3


def backward_ms(module, x, repeats: int) -> float:
    y = module(x)
    g = torch.randn_like(y)
    leaves = [x, *module.parameters()]

    def clear():
        for p in leaves:
            p.grad = None

    return cpu_ms(lambda: y.backward(g, retain_graph=True), clear, repeats=repeats)


def run(cases, fractions, repeats: int) -> list[dict]:
    rows, dense_ms = [], {}
    for case in cases:
        for t in fractions:
            torch.manual_seed(0)
            t_out, t_in = _units(case.n_out, t), _units(case.n_in, t)
            x = _input(case, "cpu", torch.float32)
            dense = _dense(case, "cpu", torch.float32)
            masked = _masked(dense, t_out, t_in)
            if case not in dense_ms:
                dense_ms[case] = backward_ms(dense, x, repeats)
            autotune.clear_cache()
            m_ms = backward_ms(masked, x, repeats)
            picked = autotune.decisions()
            fd = cpu_ms(lambda: dense(x), repeats=2 * repeats)
            fm = cpu_ms(lambda: masked(x), repeats=2 * repeats)
            speedup = dense_ms[case] / m_ms
            rows.append({"case": case.name, "trainable_fraction": t, "path": picked[-1].path if picked else "full-width",
                         "dense_backward_ms": dense_ms[case], "masked_backward_ms": m_ms, "speedup": speedup,
                         "ideal_speedup": ideal_speedup(case, t_out, t_in),
                         "speedup_vs_ideal": speedup / ideal_speedup(case, t_out, t_in),
                         "forward_overhead": fm / fd - 1})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="0,1,2", help="indices into pystage.bench.layers.CASES")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    torch.set_num_threads(1)
    env = environment("cpu")
    env["clock"] = "thread_time, min of repeats, 1 thread"
    print_environment(env)
    rows = run([CASES[int(i)] for i in args.cases.split(",")], [float(f) for f in args.fractions.split(",")],
               args.repeats)
    print(format_table(rows, list(rows[0])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "layers-cpu-time", "environment": env, "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
