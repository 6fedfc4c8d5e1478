"""``pystage-bench train --nproc N``: each method data-parallel on N processes (torchrun, gloo/NCCL) beside one process.

Both runs of a method happen in this invocation with the same threads per process (one, unless ``--threads``:
on a small CPU box more threads per process would make the processes fight for cores and void the comparison).
``store_build_s`` is the slowest rank's time to build every shard of the feature store (barriers and manifest
included); ``store_build_s_1proc`` the same build on one process. Training throughput is rows trained per second
of stage training (store builds excluded), the N-process run against the one-process run.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from typing import Any

from pystage.bench.errors import from_json
from pystage.bench.report import format_table, write_json
from pystage.bench.train import COLUMNS, _read, _rows, memory_note, run_method

SCALING = ["method", "nproc", "store_build_s_1proc", "store_build_s", "store_ratio", "train_s_1proc", "train_s",
           "rows_per_s_1proc", "rows_per_s", "train_speedup", "rank_measured_peak_mib", "rank_rss_peak_mib"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(spec: dict[str, Any], nproc: int) -> dict[str, Any]:
    """Run one method under ``torchrun --nproc-per-node nproc`` (rendezvous on 127.0.0.1); rank 0's figures."""
    with tempfile.TemporaryDirectory(prefix="pystage-train-dist-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump({**spec, "nproc": nproc, "root": os.path.join(tmp, "store")}, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_port()), "-m", "pystage.bench.train_worker",
               spec_path, out_path]
        env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads") or 1)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        error = from_json(_read(out_path), f"method {spec['method']!r} on {nproc} processes")
        if error is not None:
            raise error
        if proc.returncode != 0:
            raise RuntimeError(f"pystage-bench train --nproc {nproc}: method {spec['method']!r} failed "
                               f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out_path) as f:
            return json.load(f)


def _scaling(one: dict[str, Any], many: dict[str, Any], rows: int) -> dict[str, Any]:
    trained = rows * many["epochs"] * len(many["stages"])
    r1, rn = trained / one["train_s"], trained / many["train_s"]
    ratio = many["store_s"] / one["store_s"] if one["store_s"] else None
    return {"method": many["method"], "nproc": many["nproc"], "store_build_s_1proc": one["store_s"],
            "store_build_s": many["store_s"], "store_ratio": ratio if ratio is not None else "-",
            "train_s_1proc": one["train_s"], "train_s": many["train_s"], "rows_per_s_1proc": r1, "rows_per_s": rn,
            "train_speedup": rn / r1,
            "rank_measured_peak_mib": " ".join(f"{p:.1f}" for p in many["rank_measured_peak_mib"]),
            "rank_rss_peak_mib": " ".join(f"{p:.0f}" for p in many["rank_rss_peak_mib"])}


def run_distributed(args: argparse.Namespace, methods: list[str], base: dict[str, Any], env: dict[str, Any]) -> int:
    n = args.nproc
    base = {**base, "threads": args.threads or 1}
    env = {**env, "nproc": n, "threads_per_process": base["threads"]}
    runs, singles, scaling = [], [], []
    for method in methods:
        print(f"  running {method} on 1 process, then on {n} ...", flush=True)
        singles.append(run_method({**base, "method": method}))
        runs.append(run_ranks({**base, "method": method}, n))
        scaling.append(_scaling(singles[-1], runs[-1], args.n))
        runs[-1].update(store_build_s=runs[-1]["store_s"], store_build_s_1proc=singles[-1]["store_s"])
    print(format_table(_rows(runs), COLUMNS))
    print(memory_note(runs) + "; per rank in the next table")
    print(format_table(scaling, SCALING))
    store = [s for s in scaling if s["store_build_s"]]
    payload = {"benchmark": "train", "environment": env, "nproc": n, "runs": runs, "runs_1proc": singles,
               "scaling": scaling, "store_build_s": sum(s["store_build_s"] for s in store),
               "store_build_s_1proc": sum(s["store_build_s_1proc"] for s in store)}
    if store:
        many, one = payload["store_build_s"], payload["store_build_s_1proc"]
        print(f"store build: {many:.2f} s on {n} processes vs {one:.2f} s on 1 ({many / one:.2f}x)")
    write_json(args.json, payload)
    return 0
