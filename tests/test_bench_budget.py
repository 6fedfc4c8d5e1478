"""``pystage-bench budget`` (the default job) on tiny settings: total does not fit, partial trains within the budget."""
import importlib.util
import json

import pytest

from pystage.bench import budget
from pystage.bench.cli import main

TINY = ["--model", "flat-6-8", "--size", "8", "--n", "60", "--val-n", "20", "--epochs", "1", "--batch-size", "10",
        "--budget", "256KiB"]  # flat-6-8 at 8x8, batch 10: end to end ~0.34 MiB, one-layer stages ~0.18 MiB


def test_default_job_shows_total_over_the_budget_and_partial_within(tmp_path, capsys):
    out, png = tmp_path / "budget.json", tmp_path / "budget.png"
    plotting = importlib.util.find_spec("matplotlib") is not None  # the 'plot' extra (CI installs it)
    assert main([*TINY, "--json", str(out), *(["--plot", str(png)] if plotting else [])]) == 0  # the default job
    data = json.loads(out.read_text())
    assert data["benchmark"] == "budget" and data["budget_mib"] == 0.25
    total, partial, checkpoint = data["runs"]
    assert [r["method"] for r in data["runs"]] == ["total", "partial", "checkpoint"]
    for r in data["runs"]:  # the run fields of train --budget
        assert {"method", "fits", "measured_peak_mib", "budget_mib", "wall_s", "val_acc", "rss_peak_mib"} <= set(r)
        assert r["budget_mib"] == 0.25 and r["measured_peak_mib"] < r["rss_peak_mib"]
    assert total["fits"] is False and total["wall_s"] is None and total["measured_peak_mib"] > 0.25
    assert total["predicted_peak_mib"] == data["plan"]["total_predicted_mib"]
    assert data["total_over_budget"] == total["measured_peak_mib"] / 0.25
    assert partial["fits"] is True and partial["measured_peak_mib"] <= 0.25 and partial["wall_s"] > 0
    assert len(partial["stages"]) == len(data["plan"]["split_points"]) + 1 >= 2
    assert all(s["measured_peak_mib"] <= 0.25 for s in partial["stages"])
    assert 0.0 <= partial["val_acc"] <= 1.0 and data["partial_fits"] is True
    assert checkpoint["wall_s"] > 0 and checkpoint["fits"] == (checkpoint["measured_peak_mib"] <= 0.25)
    assert png.stat().st_size > 0 if plotting else not png.exists()
    text = capsys.readouterr().out
    assert "does not fit" in text and "partial trained in" in text and "measured_peak_mib" in text


def test_total_that_fits_is_trained(tmp_path):
    out = tmp_path / "fits.json"
    assert main(["budget", *TINY[:-2], "--budget", "64MiB", "--methods", "total", "--json", str(out)]) == 0
    (total,) = json.loads(out.read_text())["runs"]
    assert total["fits"] is True and total["wall_s"] > 0 and total["val_acc"] is not None


def test_verdict_and_cells():
    rows = [budget._row({"method": "total", "measured_peak_mib": 10.0, "wall_s": None, "status": "does not fit",
                         "val_acc": None, "stages": []}, 2.0, None),
            budget._row({"method": "partial", "measured_peak_mib": 1.5, "wall_s": 3.0, "val_acc": 0.9,
                         "stages": [{}, {}, {}]}, 2.0,
                        {"total_predicted_mib": 9.5, "stages": [{"predicted_mib": 1.4}]})]
    v = budget.verdict(rows, 2.0)
    assert v["total_over_budget"] == 5.0 and v["partial_fits"] is True and v["partial_val_acc"] == 0.9
    cells = [budget._cells(r) for r in rows]
    assert cells[0]["fits"] == "no" and cells[0]["wall_s"] == "does not fit" and cells[0]["vs_budget"] == "5.00x"
    assert cells[1]["fits"] == "yes" and cells[1]["val_acc"] == "90.0%" and cells[1]["stages"] == 3
    assert rows[1]["predicted_peak_mib"] == 1.4
    assert "5.00x the 2 MiB budget" in budget._summary(v, rows)


@pytest.mark.parametrize("job", [[], ["train"]])
def test_plot_without_matplotlib_is_a_one_line_error_before_the_job_runs(tmp_path, capsys, monkeypatch, job):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    png = tmp_path / "x.png"
    assert main([*job, "--n", "60", "--val-n", "20", "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "needs matplotlib" in err[0] and err[0].startswith("pystage-bench")
    assert not png.exists() and "running" not in captured.out  # refused before any run started


def test_a_stage_on_a_gpu_counts_its_own_memory_not_what_earlier_stages_left():
    """On CUDA a stage's training memory is ``used_mib`` (max_memory_allocated above the stage's start: what fit's
    cap holds to the budget), not the process's whole max_memory_allocated (cuBLAS workspaces, other weights)."""
    import types

    from pystage.bench.train_worker import stage_memory

    stage = types.SimpleNamespace(peak_mem_mib=75.0, used_mib=9.5, measured_peak_mib=8.0)
    assert stage_memory(stage, "cuda") == 9.5
    assert stage_memory(stage, "cpu") == 8.0  # the live tensors of the measured step
    assert stage_memory(types.SimpleNamespace(peak_mem_mib=75.0, used_mib=None), "cuda") == 75.0
