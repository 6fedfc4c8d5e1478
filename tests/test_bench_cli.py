"""pystage-bench end to end on tiny settings: tables printed, JSON written with the documented keys."""
import json
import re
import subprocess
import sys

import pytest
import torch

from pystage.bench.cli import DEFAULT_JOB, JOBS, main


def test_layers_job_writes_results(tmp_path, capsys):
    out = tmp_path / "layers.json"
    assert main(["layers", "--cases", "2", "--fractions", "0.5", "--repeats", "1", "--forward-repeats", "1",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    (row,) = data["results"]
    for key in ("layer", "trainable_fraction", "dense_backward_ms", "masked_backward_ms", "hook_backward_ms",
                "composed_backward_ms", "speedup", "ideal_speedup", "forward_overhead"):
        assert key in row
    assert row["layer"] == "conv2d" and row["trainable_fraction"] == 0.5
    assert row["ideal_speedup"] == pytest.approx(2 / (0.5 + 0.25))
    assert "torch" in data["environment"] and "speedup" in capsys.readouterr().out


def test_train_job_runs_methods_in_processes(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["train", "--model", "cnn2", "--n", "120", "--val-n", "40", "--epochs", "1",
                 "--methods", "total,partial", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["method"] for r in runs] == ["total", "partial"]
    for r in runs:
        assert r["model"] == "cnn2" and r["epochs"] == 1 and r["wall_s"] > 0
        # the training memory (live tensors of a step on CPU) is far below the process RSS (torch itself)
        assert 0 < r["measured_peak_mib"] < r["rss_peak_mib"] and r["measured_peak_source"].startswith("live tensor")
        assert 0.0 <= r["val_acc"] <= 1.0
    assert runs[1]["store_bytes"] > 0 and runs[0]["store_bytes"] == 0
    out = capsys.readouterr().out
    assert "partial" in out and "measured_peak_mib" in out and "rss_peak_mib" in out and "peak_mem_mib" not in out


def test_train_job_under_a_budget_marks_total(tmp_path):
    out = tmp_path / "budget.json"
    # plain-12-16 at batch 20: end-to-end ~8.5 MiB predicted, smallest feasible stage ~7.5 MiB
    assert main(["train", "--model", "plain-12-16", "--n", "100", "--val-n", "20", "--epochs", "1",
                 "--batch-size", "20", "--methods", "total,partial", "--budget", "8MiB", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    total, partial = data["runs"]
    assert data["plan"]["total_predicted_mib"] > data["plan"]["budget_mib"] == 8.0
    assert len(data["plan"]["split_points"]) >= 1
    assert total["fits"] is False and total["wall_s"] is None
    assert partial["fits"] is True and partial["measured_peak_mib"] <= 8.0


def test_every_job_is_registered():
    assert {"budget", "train", "layers", "store", "plan", "paper", "repro"} <= set(JOBS)
    assert DEFAULT_JOB == "budget"


# ---------------------------------------------------------------- user errors: one line, exit status 2


def _mnist(folder, truncate: bool = False):
    """Tiny IDX files; ``truncate`` cuts the training images short."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 4), ("t10k", 2)):
        images = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28)) + bytes(n * 784)
        labels = (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(n)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(images[:100] if truncate and prefix == "train" else images)
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(labels)
    return folder


def _cifar_bad(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    return folder


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    job = next(a for a in argv if a in JOBS)
    assert len(lines) == 1 and lines[0].startswith(f"pystage-bench {job}: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("case", ["unknown model", "missing data", "truncated idx", "malformed cifar", "bad size",
                                  "impossible budget", "bad method", "no path", "cuda without a gpu"])
def test_user_errors_are_one_line_with_exit_status_2(tmp_path, capsys, case):
    argv, match = {
        "unknown model": (["train", "--model", "nope"], r"unknown model name 'nope'; expected one of cnn1"),
        "missing data": (["train", "--data", "mnist", "--path", str(tmp_path / "missing")],
                         rf"MNIST folder {tmp_path / 'missing'} lacks train-images-idx3-ubyte"),
        "truncated idx": (["train", "--data", "mnist", "--path", str(_mnist(tmp_path / "m", truncate=True))],
                          r"train-images-idx3-ubyte: truncated IDX file: size 100 bytes.*expected 3152"),
        "malformed cifar": (["train", "--data", "cifar10", "--path", str(_cifar_bad(tmp_path / "c"))],
                            r"data_batch_1: not a CIFAR-10 python pickle batch"),
        "bad size": (["train", "--model", "cnn2", "--budget", "12XB"], r"--budget must be .*got '12XB'"),
        "impossible budget": (["train", "--model", "cnn2", "--budget", "1KiB"],
                              r"no split of the model fits the memory budget 1.0KiB.*smallest feasible budget"),
        "bad method": (["train", "--methods", "total,nope"], r"--methods got nope, expected names from total"),
        "no path": (["train", "--data", "cifar10"], r"--data cifar10 needs --path"),
        "cuda without a gpu": (["train", "--device", "cuda"], r"--device cuda asked for"),
    }[case]
    if case == "cuda without a gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _one_line_error(capsys, argv, match)


def test_verbose_user_error_adds_the_traceback(capsys):
    assert main(["train", "--model", "nope", "-v"]) == 2  # -v after the job works too
    err = capsys.readouterr().err
    assert "Traceback" in err and "ModelError" in err
    assert err.strip().splitlines()[-1].startswith("pystage-bench train: error: unknown model name 'nope'")


def test_user_error_in_a_worker_process_is_one_line(capsys):
    """The partial run plans in its own process (fit(memory_budget=...)); its PlanError comes back as one line
    (the runs beside it are stopped), and with -v the worker's traceback comes with it."""
    argv = ["budget", "--model", "flat-3-4", "--size", "8", "--n", "20", "--val-n", "10", "--batch-size", "10",
            "--budget", "1KiB"]
    line = _one_line_error(capsys, argv, r"method 'partial': no split of the model fits the memory budget 1.0KiB")
    assert "smallest feasible budget" in line
    assert main(["-v", *argv[:-2], "--methods", "partial", "--budget", "1KiB"]) == 2
    err = capsys.readouterr().err
    assert "in the worker process" in err and "PlanError" in err


def test_argument_errors_are_one_line(capsys):
    for argv, match in ((["train", "--epochs", "0"], r"argument --epochs: must be >= 1, got 0"),
                        (["budget", "--data", "imagenet"], r"argument --data: invalid choice: 'imagenet'")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pystage-bench {argv[0]}: error: ")
        assert re.search(match, lines[0]), lines[0]


def test_jobs_that_raise_system_exit_get_the_same_one_line_form(capsys):
    _one_line_error(capsys, ["paper", "--data", "cifar10"], r"^pystage-bench paper: error: --data cifar10 needs --path")


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    """The real process: no traceback on stderr, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "pystage.bench.cli", "train", "--data", "mnist", "--path",
                           str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"pystage-bench train: error: MNIST folder {tmp_path / 'nowhere'} lacks")
