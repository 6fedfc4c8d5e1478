"""One method of ``pystage-bench train``, run in its own process so its peak memory is its own.

``python -m pystage.bench.train_worker SPEC.json OUT.json``: SPEC holds the
method, model, data and training options; OUT receives the run's figures.
Under torchrun (``--nproc``) every rank runs this; fit joins the process group,
SPEC's ``root`` is the store all ranks share, and rank 0 writes OUT with every
rank's peak memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any

import torch


def load_data(spec: dict[str, Any]):
    """(train, val) datasets for the spec; synthetic data is deterministic, so every worker sees the same."""
    from pystage import data

    if spec["data"] == "synthetic":
        return (data.synthetic(n=spec["n"], seed=spec["seed"], split="train"),
                data.synthetic(n=spec["val_n"], seed=spec["seed"], split="val"))
    return data.get(spec["data"], spec["path"], split="train"), data.get(spec["data"], spec["path"], split="test")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import pystage

    if spec["method"] == "plain":  # the user's own loop, for the throughput baseline
        from pystage.bench import plain

        return plain.run(spec, load_data)

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train, val = load_data(spec)
    torch.manual_seed(spec["seed"])
    model = pystage.models.get(spec["model"], in_channels=train.x.shape[1], num_classes=train.num_classes,
                               split_points=spec.get("split_points"))  # the parent's plan, under --budget
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shared = spec.get("root")  # distributed: one store for every rank, made by the parent
    with contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory(prefix="pystage-bench-") as tmp:
        t0 = time.perf_counter()
        result = pystage.fit(model, train, val, method=spec["method"], epochs=spec["epochs"],
                             batch_size=spec["batch_size"], store=pystage.FeatureStore(tmp), device=spec["device"],
                             checkpoint_dir=f"{tmp}/stages", progress=False, share_prefixes=False,
                             seed=spec["seed"],
                             measure_memory=bool(spec.get("budget")))
        wall = time.perf_counter() - t0
    report = result.report
    out = _figures(spec, wall, report, result, rss_before)
    return out if not spec.get("nproc", 1) > 1 else _gathered(out, report)


def _gathered(out: dict[str, Any], report: Any) -> dict[str, Any]:
    """Figures of a distributed run: slowest rank's times, every rank's peak memory."""
    from pystage import distributed

    ranks = distributed.all_gather({"wall_s": out["wall_s"], "store_s": out["store_s"], "peak": report.peak_mem_mib,
                                    "train_s": sum(s.seconds for s in report.stages)})
    return {**out, "nproc": len(ranks), "wall_s": max(r["wall_s"] for r in ranks),
            "store_s": max(r["store_s"] for r in ranks), "train_s": max(r["train_s"] for r in ranks),
            "rank_peak_mem_mib": [r["peak"] for r in ranks]}


def _figures(spec: dict[str, Any], wall: float, report: Any, result: Any, rss_before: float) -> dict[str, Any]:
    return {
        "method": spec["method"], "model": spec["model"], "epochs": spec["epochs"], "wall_s": wall,
        "peak_mem_mib": report.peak_mem_mib, "peak_mem_source": report.peak_mem_source,
        "process_rss_before_fit_mib": rss_before,
        "train_acc": report.train_acc, "val_acc": report.val_acc,
        "store_s": sum(s.store_seconds for s in report.stages),
        "store_bytes": sum(s.store_bytes for s in report.stages),
        "stages": [{"stage": s.layers, "seconds": s.seconds, "val_acc": s.val_acc, "peak_mem_mib": s.peak_mem_mib,
                    "measured_peak_mib": s.measured_peak_mib} for s in report.stages],
        "measured_peak_mib": max((s.measured_peak_mib or 0.0 for s in report.stages), default=None),
        "train_s": sum(s.seconds for s in report.stages),
        "split_points": list(getattr(result.model, "split_points", []) or []),
    }


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    out = run(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    if spec.get("nproc", 1) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
