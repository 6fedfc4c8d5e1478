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
    lines = ["| method | status/fits | wall s | training memory MiB | predicted MiB | budget MiB | RSS peak MiB | "
             "val acc |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d.get("runs", []):
        lines.append(f"| {r.get('method')} | {r.get('status', r.get('fits', '-'))} | {_fmt(r.get('wall_s'))} | "
                     f"{_fmt(r.get('measured_peak_mib'))} | {_fmt(r.get('predicted_peak_mib'))} | "
                     f"{_fmt(r.get('budget_mib'))} | {_fmt(r.get('rss_peak_mib'))} | "
                     f"{_fmt(r.get('val_acc'), '.3f')} |")
    source = next((r["measured_peak_source"] for r in d.get("runs", []) if r.get("measured_peak_source")), "-")
    lines += ["", f"training memory: {source}"]
    ratios = [(k, t) for k, t in (("total_vs_plain_throughput", ">= 0.95"), ("partial_vs_total_wall", "<= 1.05"))
              if d.get(k) is not None]
    if ratios:
        lines.append("; ".join(f"{k} {_fmt(d[k], '.3f')} (target {t})" for k, t in ratios))
    return lines


def budget(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    lines = [f"{d.get('model')}, budget {_fmt(d.get('budget_mib'))} MiB: end-to-end needs "
             f"{_fmt(d.get('total_over_budget'), '.2f')}x the budget (target >= {_fmt(d.get('target_ratio'))}); "
             f"partial fits: {d.get('partial_fits')}, partial val acc {_fmt(d.get('partial_val_acc'), '.3f')}; "
             f"job {_fmt(d.get('job_s'))} s", ""]
    return lines + train(out, name)


def search(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    lines = [f"{d.get('model')}, {d.get('n_train')} rows, {d.get('draws')} draws, halving {d.get('halving')}: "
             f"population/one {_fmt(d.get('population_vs_one'), '.2f')} (GPU target <= 2.5), population/sequential "
             f"{_fmt(d.get('population_vs_sequential'), '.2f')} (CPU target <= 1), same choice {d.get('same_choice')}, "
             f"population ran {d.get('population_ran')}", "",
             "| way | trials | fit s | search s | vs one | vs sequential | val acc |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.get('way')} | {r.get('trials')} | {_fmt(r.get('fit_s'), '.2f')} | {_fmt(r.get('search_s'), '.2f')} "
              f"| {_fmt(r.get('vs_one'), '.2f')} | {_fmt(r.get('vs_sequential'), '.2f')} | "
              f"{_fmt(r.get('val_acc'), '.3f')} |" for r in d.get("rows", [])]
    return lines


def layers(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    lines = ["| case | dtype | trainable | path | dense bwd ms | speedup | ideal | of ideal | forward overhead |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d.get("results", []):
        lines.append(f"| {r.get('case')} | {r.get('dtype', '-')} | {_fmt(r.get('trainable_fraction'), '.2f')} | "
                     f"{r.get('path', '-')} | {_fmt(r.get('dense_backward_ms'), '.3f')} | "
                     f"{_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('ideal_speedup'), '.2f')} | "
                     f"{_fmt(r.get('speedup_vs_ideal'), '.2f')} | {_fmt(r.get('forward_overhead'), '+.1%')} |")
    slow = [r for r in d.get("results", []) if isinstance(r.get("speedup"), (int, float)) and r["speedup"] < 1.0]
    lines += ["", f"cases slower than dense (target: none): {len(slow)}"]
    return lines


def paper(out: Path, name: str) -> list[str]:
    d = _load(out, name)
    if d is None:
        return [f"{name}: missing"]
    runs = d.get("tables") or [d]
    lines = ["| table | search | halving | shared s | independent s | ratio | same results |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r.get('table')} | {r.get('search')} | {r.get('halving')} | {_fmt(r.get('shared_s'))} | "
              f"{_fmt(r.get('independent_s'))} | {_fmt(r.get('ratio'), '.2f')} | {r.get('same_results', '-')} |"
              for r in runs]
    both: dict[tuple[Any, Any], list[Any]] = {}
    for r in runs:  # the moonshot: both tables, one search and halving setting, summed
        both.setdefault((r.get("search"), r.get("halving")), []).append(r)
    for (search_mode, halving), rs in both.items():
        tables = {str(r.get("table")) for r in rs}
        key = "shared_s" if all(r.get("shared_s") is not None for r in rs) else "independent_s"
        if {"2", "3"} <= tables and all(r.get(key) is not None for r in rs):
            lines.append(f"\nboth tables, {search_mode} search, halving {halving}: "
                         f"{sum(r[key] for r in rs):.1f} s ({key[:-2]} sweep; moonshot target <= 120 s)")
    return lines


SECTIONS: list[tuple[str, str, Callable[[Path, str], list[str]]]] = [
    ("layers", "layers.json", layers), ("plan16", "plan16.json", plan), ("plan24_rec", "plan24_recorded.json", plan),
    ("budget", "budget.json", budget), ("train", "train.json", train), ("search", "search.json", search),
    ("plan24", "plan24.json", plan), ("plan40", "plan40.json", plan), ("train_budget", "train_budget.json", train),
    ("paper", "paper.json", paper), ("paper_full", "paper_full.json", paper), ("train_full", "train_full.json", train),
    ("search_full", "search_full.json", search)]


def _not_selected(steps: list[dict[str, str]], step: str) -> bool:
    return any(s["step"] == step and s["rc"] == "not selected" for s in steps)


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
        if not (out / name).exists() and _not_selected(steps, step):
            continue
        print(f"\n## {step}\n")
        try:
            print("\n".join(fn(out, name)))
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a JSON shape this summary does not know
            print(f"{name}: could not summarise ({type(e).__name__}: {e}); see the JSON")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: summarize.py OUTDIR")
    main(Path(sys.argv[1]))
