"""summary.md for a bench/gpu/run.sh output folder: each step's rc and time, and the figures that matter.

Tolerant by design: other benchmarks change their JSON while this runs, so a file that is missing or
shaped differently gives a "-" and a note, never a failure.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable


def _load(out: Path, name: str) -> Any:
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _last_line(out: Path, log: str, words: tuple[str, ...]) -> str:
    path = out / log
    if not path.exists():
        return "-"
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if any(w in ln for w in words)]
    return lines[-1] if lines else "-"


def plan(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    rows = [*d.get("stages", []), *([d["end_to_end"]] if d.get("end_to_end") else [])]
    errs = [r["error_pct"] for r in rows if r.get("error_pct") is not None]
    head = (f"{d.get('model')} batch {d.get('batch_size')}, budget {_fmt(d.get('budget_mib'))} MiB, split points "
            f"{d.get('split_points')}; |error| max {_fmt(max(map(abs, errs)) if errs else None)}%")
    lines = [head, "", "| stage | layers | predicted MiB | measured MiB | error % | predicted reserved | "
             "measured reserved |", "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.get('stage')} | {r.get('layers')} | {_fmt(r.get('predicted_mib'))} | "
              f"{_fmt(r.get('measured_mib'))} | {_fmt(r.get('error_pct'))} | {_fmt(r.get('reserved_mib'))} | "
              f"{_fmt(r.get('measured_reserved_mib'))} |" for r in rows]
    return lines


def train(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    lines = ["| method | status/fits | wall s | peak MiB | predicted MiB | measured step MiB | budget MiB | "
             "val acc |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d.get("runs", []):
        lines.append(f"| {r.get('method')} | {r.get('status', r.get('fits', '-'))} | {_fmt(r.get('wall_s'))} | "
                     f"{_fmt(r.get('peak_mem_mib'))} | {_fmt(r.get('predicted_peak_mib'))} | "
                     f"{_fmt(r.get('measured_peak_mib'))} | {_fmt(r.get('budget_mib'))} | "
                     f"{_fmt(r.get('val_acc'), '.3f')} |")
    return lines


def layers(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    lines = ["| case | trainable | speedup | ideal | forward overhead |", "| --- | --- | --- | --- | --- |"]
    for r in d.get("results", []):
        lines.append(f"| {r.get('case')} | {_fmt(r.get('trainable_fraction'), '.2f')} | "
                     f"{_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('ideal_speedup'), '.2f')} | "
                     f"{_fmt(r.get('forward_overhead'), '.2f')} |")
    return lines


def paper(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    return [f"shared {_fmt(d.get('shared_s'))} s, independent {_fmt(d.get('independent_s'))} s, ratio "
            f"{_fmt(d.get('ratio'), '.2f')} (target {_fmt(d.get('target_ratio'), '.2f')}), same results: "
            f"{d.get('same_results')}, models: {len(d.get('models', []))}"]


SECTIONS: list[tuple[str, str, Callable[[Path, str], list[str]]]] = [
    ("plan16", "plan16.json", plan), ("plan24", "plan24.json", plan), ("plan24_rec", "plan24_recorded.json", plan),
    ("plan40", "plan40.json", plan), ("train_budget", "train_budget.json", train), ("train", "train.json", train),
    ("layers", "layers.json", layers), ("layers_bf16", "layers_bf16.json", layers), ("paper", "paper.json", paper)]


def main(out: Path) -> None:
    with open(out / "summary.tsv") as f:
        steps = list(csv.DictReader(f, delimiter="\t"))
    print(f"# GPU check: {out}\n")
    print("| step | rc | seconds | limit s | log |\n| --- | --- | --- | --- | --- |")
    for s in steps:
        print(f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['limit_s']} | {s['log']} |")
    print(f"\nenvironment: {_last_line(out, 'env.log', ('torch',))}; {_last_line(out, 'env.log', ('cudnn',))}")
    print(f"CUDA tests: {_last_line(out, 'cuda_tests.log', ('passed', 'failed', 'error', 'skipped'))}")
    for step, name, fn in SECTIONS:
        print(f"\n## {step}\n")
        try:
            print("\n".join(fn(out, name)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a JSON shape this summary does not know
            print(f"{name}: could not summarise ({type(e).__name__}: {e}); see the JSON")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summarize.py OUTDIR")
    main(Path(sys.argv[1]))
