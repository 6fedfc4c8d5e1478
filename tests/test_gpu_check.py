"""bench/gpu/run.sh: the GPU check's machinery on the CPU (deadline, per-step records, summary).

The full dry run (`bash bench/gpu/run.sh OUT --device cpu`) takes about 4 minutes on 2 cores, too long for
the suite; this runs it with a 15 s deadline, so the first steps run and the rest are recorded as skipped.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu" / "run.sh"
STEPS = ["env", "build", "cuda_tests", "plan16", "plan24", "plan24_rec", "plan40", "train_budget", "layers",
         "layers_bf16", "train", "paper"]


def test_dry_run_records_every_step_and_keeps_the_deadline(tmp_path):
    env = {**os.environ, "PYSTAGE_GPU_TOTAL_S": "15", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--device", "cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "summary.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["step"] for r in rows] == STEPS
    assert rows[0]["rc"] == "0" and (tmp_path / "env.log").read_text().startswith("$ ")
    assert rows[-1]["rc"] == "skipped"  # the deadline, not the step's own limit, ended the run
    assert all(r["rc"] == "skipped" or (int(r["rc"]) >= 0 and int(r["seconds"]) <= int(r["limit_s"]) + 11)
               for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check") and "| paper | skipped |" in summary and "plan16.json: missing" in summary


def test_bad_arguments_are_refused(tmp_path):
    for args in ([], [str(tmp_path), "--device", "tpu"], [str(tmp_path), "--verbose"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "usage" in done.stderr
