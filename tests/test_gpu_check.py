"""bench/gpu/run.sh: the GPU check's machinery on the CPU (step selection, deadline, per-step records, summary).

The full dry run (`bash bench/gpu/run.sh OUT --device cpu`) takes minutes on 2 cores, too long for the suite;
these run one selected step, or none within a deadline of 0 s, so what they check does not depend on speed.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu" / "run.sh"
STEPS = ["env", "build", "cuda_tests", "layers", "plan16", "plan24_rec", "budget", "train", "search", "plan24",
         "plan40", "train_budget", "paper", "paper_full", "train_full", "search_full"]
EXTRAS = {"paper_full", "train_full", "search_full"}


def _run(out: Path, *args: str, total: str = "470") -> list[dict]:
    env = {**os.environ, "PYSTAGE_GPU_TOTAL_S": total, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with open(out / "summary.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_selected_steps_run_and_the_others_are_recorded(tmp_path):
    rows = _run(tmp_path, "--steps", "env")
    assert [r["step"] for r in rows] == STEPS
    assert rows[0]["rc"] == "0" and (tmp_path / "env.log").read_text().startswith("$ ")
    assert all(r["rc"] == "not selected" for r in rows[1:])
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# GPU check") and "| paper | not selected |" in summary
    assert "## plan16" not in summary  # a step not selected gets no section


def test_the_summary_reads_the_jobs_json_and_marks_what_is_missing(tmp_path):
    import json

    _run(tmp_path, "--steps", "env")
    (tmp_path / "train.json").write_text(json.dumps({"runs": [
        {"method": "plain", "wall_s": 2.0, "measured_peak_mib": None, "rss_peak_mib": 400.0, "val_acc": 0.5},
        {"method": "total", "wall_s": 2.1, "measured_peak_mib": 27.0, "measured_peak_source": "live tensor bytes",
         "rss_peak_mib": 410.0, "val_acc": 0.5}], "total_vs_plain_throughput": 0.952}))
    tsv = tmp_path / "summary.tsv"  # plan16 ran and failed before writing its JSON
    tsv.write_text(tsv.read_text().replace("plan16\tnot selected\t0\t0\t-", "plan16\t1\t3\t30\tplan16.log"))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "summarize.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "| total | - | 2.1 | 27.0 | - | - | 410.0 | 0.500 |" in done.stdout
    assert "total_vs_plain_throughput 0.952 (target >= 0.95)" in done.stdout
    assert "plan16.json: missing" in done.stdout


def test_the_deadline_skips_what_it_leaves_no_time_for(tmp_path):
    rows = _run(tmp_path, total="0")
    assert [r["step"] for r in rows] == STEPS
    assert all(r["rc"] == ("not selected" if r["step"] in EXTRAS else "skipped") for r in rows)


def test_bad_arguments_are_refused(tmp_path):
    for args in ([], [str(tmp_path), "--device", "tpu"], [str(tmp_path), "--verbose"]):
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and "usage" in done.stderr
