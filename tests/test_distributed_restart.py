"""A rank SIGKILLed while stage 2 trains, under ``torchrun --max-restarts 1`` (gloo, 2 CPU processes): the
restarted group finishes the fit from what the killed one left - stage 1 from its checkpoint, the stored
features as they were, stage 2 from its last finished epoch - and ends with an uninterrupted run's weights.
The script that runs on every rank is tests/dist_restart_script.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "dist_restart_script.py")
TIMEOUT_S = 300  # a loaded 2-core machine takes ~50 s; a hang fails the test instead of stalling the suite


def _torchrun(out: str) -> tuple[int, str]:
    """Run the script on 2 ranks under torchrun (free ports, its own process group); (exit code, its output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2", SCRIPT, out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = os.path.join(out, "torchrun.log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = -1
        finally:  # torchrun and both ranks share the session's process group: nothing outlives the test
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    with open(log) as f:
        return rc, f.read()


def test_a_rank_killed_while_stage_2_trains_resumes_to_the_uninterrupted_weights(tmp_path):
    from dist_restart_script import STEPS

    out = str(tmp_path)
    rc, log = _torchrun(out)
    assert rc == 0, f"torchrun exit {rc} (-1: timed out after {TIMEOUT_S} s); its output ends:\n{log[-6000:]}"
    attempts = sorted(p for p in os.listdir(out) if p.startswith("attempt"))
    assert attempts == ["attempt0-rank0", "attempt0-rank1", "attempt1-rank0", "attempt1-rank1"]
    assert os.path.exists(os.path.join(out, "before-kill.json")), "rank 1 was never killed"
    got = torch.load(os.path.join(out, "result.pt"), weights_only=False)
    assert got["attempt"] == 1  # the result is the restarted group's
    # stage 1 came from its checkpoint, stage 2 trained (resumed): the report says which
    assert [(s["stage"], s["cached"]) for s in got["report"]["stages"]] == [(1, True), (2, False)]
    assert not any(s["cached"] for s in got["reference_report"]["stages"])
    # the restarted fit pushed no batch through stage 1 (no training, no store build) and trained stage 2 for
    # its second epoch only: the first epoch came from the progress checkpoint
    assert "1/train" not in got["counts"] and "1/other" not in got["counts"]
    assert got["counts"]["2/train"] == STEPS
    # the stored features and stage 1's checkpoint are the files the killed group wrote, untouched
    with open(os.path.join(out, "before-kill.json")) as f:
        before = json.load(f)
    kept = {p: t for p, t in before.items() if p.endswith(".h5") or p.startswith("stages/")}
    assert len([p for p in kept if p.endswith(".h5")]) == 4  # 2 ranks' shards of the train and val features
    assert {p: got["after"][p] for p in kept} == kept
    assert sorted(p for p in got["after"] if p.endswith(".h5")) == sorted(p for p in kept if p.endswith(".h5"))
    # and the result is the uninterrupted run's, to float tolerance
    assert got["state"].keys() == got["reference"].keys()
    for k, v in got["reference"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
