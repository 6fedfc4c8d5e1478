"""One method of ``pystage-bench train`` / ``budget``, run in its own process so its figures are its own.

``python -m pystage.bench.train_worker SPEC.json OUT.json``: SPEC holds the
method, model, data and training options; OUT receives the run's figures, or,
when the run fails with a user error (bad data, impossible budget, ...), that
error (``pystage.bench.errors``) and exit status 2.
Under torchrun (``--nproc``) every rank runs this; fit joins the process group,
SPEC's ``root`` is the store all ranks share, and rank 0 writes OUT with every
rank's peak memory.

Memory figures of a run:
* ``measured_peak_mib``: the training memory a budget limits, the largest over
  stages. On CPU the live tensor bytes of one steady-state training step
  (``fit(measure_memory=True)``: parameters, optimizer state, batch, activations,
  gradients: what the planner predicts); on CUDA the stage's own ``torch.cuda.max_memory_allocated``, above
  what was allocated when it started (``StageReport.used_mib``: what fit's cap holds to the budget).
* ``rss_peak_mib``: the process's peak resident set size (CPU: sampled while fit
  runs; CUDA: the process's lifetime peak): torch, Python and buffers included.
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

TRAINING_MEMORY = {"cpu": "live tensor bytes of a steady-state training step (CPU)",
                   "cuda": "torch.cuda.max_memory_allocated above each stage's start (the stage's own)"}


def load_data(spec: dict[str, Any]):
    """(train, val) datasets for the spec; synthetic data is deterministic, so every worker sees the same."""
    from pystage import data

    if spec["data"] == "synthetic":
        shape = tuple(spec.get("shape") or (3, 32, 32))
        return (data.synthetic(n=spec["n"], seed=spec["seed"], split="train", shape=shape),
                data.synthetic(n=spec["val_n"], seed=spec["seed"], split="val", shape=shape))
    return data.get(spec["data"], spec["path"], split="train"), data.get(spec["data"], spec["path"], split="test")


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import pystage

    if spec["method"] == "plain":  # the user's own loop, for the throughput baseline
        from pystage.bench import plain

        return plain.run(spec, load_data)

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train, val = load_data(spec)
    if spec.get("max_rows"):  # a memory measurement only: a few steps are enough
        train = train.subset(torch.arange(min(spec["max_rows"], len(train))))
    torch.manual_seed(spec["seed"])
    model = pystage.models.get(spec["model"], in_channels=train.x.shape[1], num_classes=train.num_classes,
                               split_points=spec.get("split_points"))  # the parent's plan, under train --budget
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shared = spec.get("root")  # distributed: one store for every rank, made by the parent
    with contextlib.nullcontext(shared) if shared else tempfile.TemporaryDirectory(prefix="pystage-bench-") as tmp:
        t0 = time.perf_counter()
        result = pystage.fit(model, train, val, method=spec["method"], epochs=spec["epochs"],
                             batch_size=spec["batch_size"], store=pystage.FeatureStore(tmp), device=spec["device"],
                             checkpoint_dir=f"{tmp}/stages", progress=False, share_prefixes=False,
                             seed=spec["seed"], memory_budget=spec.get("memory_budget"), measure_memory=True,
                             compile_mode=spec.get("compile_mode"))
        wall = time.perf_counter() - t0
    report = result.report
    out = _figures(spec, wall, report, result, rss_before, len(train))
    return out if not spec.get("nproc", 1) > 1 else _gathered(out, report)


def _gathered(out: dict[str, Any], report: Any) -> dict[str, Any]:
    """Figures of a distributed run: slowest rank's times, every rank's training memory and RSS."""
    from pystage import distributed

    ranks = distributed.all_gather({"wall_s": out["wall_s"], "store_s": out["store_s"], "rss": out["rss_peak_mib"],
                                    "peak": out["measured_peak_mib"],
                                    "train_s": sum(s.seconds for s in report.stages)})
    return {**out, "nproc": len(ranks), "wall_s": max(r["wall_s"] for r in ranks),
            "store_s": max(r["store_s"] for r in ranks), "train_s": max(r["train_s"] for r in ranks),
            "rank_measured_peak_mib": [r["peak"] for r in ranks], "rank_rss_peak_mib": [r["rss"] for r in ranks]}


def stage_memory(stage: Any, device: str) -> float:
    """The training memory (MiB) a budget limits, of one ``StageReport``."""
    if torch.device(device).type == "cuda":
        # what fit's StageCap holds to the budget: max_memory_allocated above what was allocated when the stage
        # started (not the earlier stages' weights, the cuBLAS workspaces stage 1 made, the data held on the device)
        return stage.used_mib if stage.used_mib is not None else stage.peak_mem_mib
    return stage.measured_peak_mib or 0.0  # live tensors of the measured step (the meter sampled RSS)


def training_memory(report: Any, device: str) -> tuple[float, float]:
    """(training memory a budget limits, process peak RSS), MiB, the largest over the stages of ``report``."""
    measured = max((stage_memory(s, device) for s in report.stages), default=0.0)
    if torch.device(device).type == "cuda":
        return measured, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return measured, report.peak_mem_mib


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _figures(spec: dict[str, Any], wall: float, report: Any, result: Any, rss_before: float,
             rows: int) -> dict[str, Any]:
    measured, rss = training_memory(report, spec["device"])
    out = {
        "method": spec["method"], "model": spec["model"], "epochs": spec["epochs"], "wall_s": wall,
        "measured_peak_mib": measured, "measured_peak_source": TRAINING_MEMORY[torch.device(spec["device"]).type],
        "rss_peak_mib": rss, "process_rss_before_fit_mib": rss_before,
        "train_acc": report.train_acc, "val_acc": report.val_acc,
        "store_s": sum(s.store_seconds for s in report.stages),
        "store_bytes": sum(s.store_bytes for s in report.stages),
        "stages": [{"stage": s.layers, "seconds": s.seconds, "val_acc": s.val_acc,
                    "measured_peak_mib": stage_memory(s, spec["device"]), "live_peak_mib": s.measured_peak_mib}
                   for s in report.stages],
        "train_s": sum(s.seconds for s in report.stages),
        "train_rows": rows,
        "cpu_s": _cpu_seconds(),  # this process so far (imports included): its wall time on an otherwise idle core
        "split_points": list(getattr(result.model, "split_points", []) or []),
        "replans": report.replans,
    }
    if report.plan is not None:  # fit(memory_budget=...) planned the split points
        p = report.plan
        out["plan"] = {"budget_mib": p.budget / 2**20, "total_predicted_mib": p.total_predicted_bytes / 2**20,
                       "split_points": list(p.split_points), "stages": [{"predicted_mib": s.peak / 2**20}
                                                                        for s in p.stages], "text": str(p)}
    return out


def main(argv: list[str]) -> int:
    from pystage.bench.errors import to_json, user_errors

    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        out, status = run(spec), 0
    except user_errors() as exc:  # the parent prints it as one line
        out, status = to_json(exc), 2
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    if spec.get("nproc", 1) > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
