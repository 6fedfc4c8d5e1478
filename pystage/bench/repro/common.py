"""Shared by the reproductions: mean/std rows, the markdown file and the JSON payload."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any, Sequence

from pystage.bench.report import environment, format_table, print_environment, write_json

COLUMNS = ["variant", "metric", "mean", "std", "seeds"]


def row(variant: str, metric: str, values: Sequence[float], **extra: Any) -> dict[str, Any]:
    """Mean and (sample) std of ``values`` over seeds; extra columns ride along."""
    vals = [float(v) for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"variant": variant, "metric": metric, "mean": statistics.fmean(vals), "std": std, "seeds": len(vals),
            "values": vals, **extra}


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 and v else f"{v:.4f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def finish(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print the environment and table; write the markdown file and the JSON."""
    env = environment("cpu")
    if sys.argv and sys.argv[0].endswith(".py"):  # run as bench/repro_<name>.py rather than pystage-bench
        env["command"] = " ".join(["python", *sys.argv])
    print_environment(env)
    columns = result.get("columns", COLUMNS)
    print(result.get("title", args.name))
    print(format_table(result["rows"], columns))
    for note in result.get("notes", []):
        print(note)
    path = args.md or os.path.join("bench", "results", f"repro_{args.name}.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"### {result.get('title', args.name)}\n\n`{env['command']}` ({env['cpu']}, {env['threads']} threads, "
                f"torch {env['torch']})\n\n{markdown(result['rows'], columns)}\n")
        for section in result.get("extra_md", []):
            f.write("\n" + section + "\n")
        for note in result.get("notes", []):
            f.write(f"\n{note}\n")
    print(f"markdown: {path}")
    write_json(args.json, {"environment": env, **{k: v for k, v in result.items() if k != "extra_md"}})
