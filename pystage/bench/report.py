"""Output shared by every benchmark: environment header, text tables, JSON files."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from typing import Any, Sequence

import torch


def environment(device: str = "cpu") -> dict[str, Any]:
    """Device, versions and the command that reproduces this run."""
    env: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in ["pystage-bench", *sys.argv[1:]]),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def require_plotting(path: str | None) -> None:
    """Before a job runs: ``--plot PATH`` needs matplotlib (the ``plot`` extra); a one-line UsageError if it is
    missing, instead of a traceback after the whole job has run."""
    if path is None:
        return
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        from pystage.errors import UsageError

        raise UsageError(f"--plot {path} needs matplotlib, which is not installed: "
                         "pip install matplotlib (or the package's 'plot' extra)")


def print_environment(env: dict[str, Any]) -> None:
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table; floats get 3 significant decimals."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2e}" if v and abs(v) < 0.01 else f"{v:.3f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
