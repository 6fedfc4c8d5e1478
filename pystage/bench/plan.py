"""``pystage-bench plan``: split a model under a memory budget, and (``--verify``) check the predicted peaks.

With ``--verify`` every planned stage (and the whole model, end to end) trains one real step on random
inputs of the right shape - stage copy + head + optimizer - and its measured peak is set beside the
prediction: on CPU the live-tensor accounting on real tensors (peak RSS growth as a cross-check column),
on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from pystage import models
from pystage.bench.report import environment, format_table, print_environment, write_json
from pystage.errors import UsageError
from pystage.memory import StageMemory, linear_head, pooled_head, profile
from pystage.plan import Plan, plan, plan_with_splits
from pystage.units import mib, parse_bytes

HEADS = {"linear": linear_head, "pooled": pooled_head}
COLUMNS = ["stage", "layers", "predicted_mib", "measured_mib", "error_pct", "rss_mib"]
CUDA_COLUMNS = ["stage", "layers", "predicted_mib", "tensors_mib", "once_mib", "reserved_mib", "measured_mib",
                "error_pct", "measured_reserved_mib"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="plain-16-64", help="a pystage.models name (default plain-16-64)")
    p.add_argument("--budget", default="512MiB", help="memory budget per stage, e.g. 512MiB, 4GiB")
    p.add_argument("--batch-size", default="64", help="batch size, or 'max' for the largest that fits")
    p.add_argument("--input-shape", default="3,32,32", help="one sample's shape C,H,W (default 3,32,32)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "sgd", "sgd-nomomentum"])
    p.add_argument("--head", default="linear", choices=sorted(HEADS), help="stage head: flatten+linear or pooled")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the target device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dataset-rows", type=int, default=None, help="rows the feature store will hold")
    p.add_argument("--disk-budget", default=None, help="feature-store budget, e.g. 20GiB (needs --dataset-rows)")
    p.add_argument("--split-points", default=None, metavar="I,J,..",
                   help="evaluate these split points (layer indices) instead of planning, e.g. 6,10,14")
    p.add_argument("--verify", action="store_true", help="train one step of each stage and measure its peak")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")


def _measured(args: argparse.Namespace, pl: Plan, dtype: torch.dtype) -> dict[tuple[int, int], StageMemory]:
    """One real step of each planned stage and of the whole model."""
    assert pl.profile is not None
    prof = profile(pl.profile.model, pl.profile.input_shape, pl.batch_size, device=args.device, dtype=dtype,
                   optimizer=args.optimizer, num_classes=args.num_classes, head=HEADS[args.head], source="measure")
    spans = [(s.start, s.stop) for s in pl.stages] + [(0, len(prof.model))]
    return {span: prof.stage(*span) for span in dict.fromkeys(spans)}


def _row(name: str, layers: str, predicted: StageMemory, measured: StageMemory | None) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": name, "layers": layers, "predicted_mib": mib(predicted.peak)}
    if predicted.tensor_peak is not None:  # a CUDA estimate: its parts
        row.update(tensors_mib=mib(predicted.tensor_peak), once_mib=mib(predicted.once),
                   reserved_mib=mib(predicted.reserved or 0))
    if measured is not None:
        row["measured_mib"] = mib(measured.peak)
        row["error_pct"] = 100 * (predicted.peak - measured.peak) / measured.peak
        if measured.rss_peak is not None:
            row["rss_mib"] = mib(measured.rss_peak)
        if measured.reserved is not None:
            row["measured_reserved_mib"] = mib(measured.reserved)
    return row


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and args.verify and not torch.cuda.is_available():
        raise UsageError("--verify on --device cuda needs a GPU; drop --verify to estimate only")
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.input_shape.split(","))
    model = models.get(args.model, in_channels=shape[0], num_classes=args.num_classes)
    batch: int | str = args.batch_size if args.batch_size == "max" else int(args.batch_size)
    env = environment(args.device)
    env["dtype"] = args.dtype
    print_environment(env)
    kw = dict(device=args.device, dtype=dtype, optimizer=args.optimizer, num_classes=args.num_classes,
              head=HEADS[args.head])
    if args.split_points is not None:
        points = [int(p) for p in args.split_points.split(",") if p.strip()]
        pl = plan_with_splits(profile(model, shape, int(batch), **kw), points, args.budget,  # type: ignore[arg-type]
                              dataset_rows=args.dataset_rows)
    else:
        pl = plan(model, shape, batch, args.budget, dataset_rows=args.dataset_rows, disk_budget=args.disk_budget,
                  **kw)  # type: ignore[arg-type]
    print(pl)
    measured = _measured(args, pl, dtype) if args.verify else {}
    assert pl.profile is not None
    prof = pl.profile
    rows = [_row(str(i + 1), f"[{s.start}, {s.stop})", prof.stage(s.start, s.stop), measured.get((s.start, s.stop)))
            for i, s in enumerate(pl.stages)]
    rows.append(_row("end-to-end", f"[0, {len(model)})", prof.total(), measured.get((0, len(model)))))
    if args.device == "cuda":
        target = prof.cuda
        assert target is not None
        ws = "measured on this GPU" if target.workspaces.device is not None else "modelled (no GPU here)"
        env["cuda_target"] = {"capability": list(target.capability), "name": target.name,
                              "cublas_workspace": target.cublas_workspace, "cudnn_workspaces": ws}
        print(f"\nCUDA estimate ({target.name}, sm_{target.capability[0]}{target.capability[1]}; cuDNN workspaces "
              f"{ws}); stages starting at layer 0 pay the one-off cuBLAS workspaces (once_mib):")
        shown = [c for c in CUDA_COLUMNS if args.verify or ("measured" not in c and c != "error_pct")]
        print(format_table(rows, shown))
    elif args.verify:
        print(f"\npredicted (meta estimate) vs measured (live-tensor accounting on real tensors), "
              f"batch {pl.batch_size}:")
        print(format_table(rows, COLUMNS))
    total = rows.pop()
    write_json(args.json, {
        "benchmark": "plan", "environment": env, "model": args.model, "input_shape": list(shape),
        "batch_size": pl.batch_size, "optimizer": args.optimizer, "head": args.head,
        "budget_mib": mib(parse_bytes(args.budget)), "split_points": list(pl.split_points), "stages": rows,
        "total_predicted_mib": total["predicted_mib"], "total_measured_mib": total.get("measured_mib"),
        "end_to_end": total,
        "store_bytes": pl.store_bytes, "verified": bool(args.verify)})
    return 0
