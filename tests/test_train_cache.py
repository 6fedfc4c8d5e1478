"""The stage cache: identical prefixes are trained once, keys change with what changes the weights, and a killed
run started again continues from its last finished stage and epoch with the features it already stored."""
from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import pystage
from pystage import FeatureStore, StagedNet, TrainConfig, models
from pystage.data import synthetic
from pystage.train.cache import StageCache, stage_key

SHAPE = (3, 16, 16)
CLASSES = 4
CFG = TrainConfig(lr=3e-3)


def task(n: int = 200, n_val: int = 100, seed: int = 0):
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=seed, noise=0.3)
    return synthetic(n=n, **kw), synthetic(n=n_val, split="val", **kw)


def model(name: str, seed: int = 0, width: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    return models.get(name, num_classes=CLASSES, width=width)


def fit(net, train, val, root: Path, **kw):
    kw.setdefault("config", CFG)
    return pystage.fit(net, train, val, store=FeatureStore(root / "store"), checkpoint_dir=root / "stages",
                       progress=False, **kw)


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def count_calls(module: nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


# -- prefix sharing ---------------------------------------------------------------------------------------------

def test_architectures_sharing_a_prefix_train_it_once(tmp_path):
    train, val = task()
    six = fit(model("cnn6"), train, val, tmp_path, method="partial")
    eight_net = StagedNet.from_sequential(model("cnn8"), input_shape=SHAPE, num_classes=CLASSES)
    first_body = count_calls(eight_net.bodies[0])
    eight = fit(eight_net, train, val, tmp_path, method="partial")
    r6, r8 = six.report.stages, eight.report.stages
    assert [s.cached for s in r6] == [False, False]
    assert [s.cached for s in r8] == [True, True, False]
    assert [s.stage_key for s in r8[:2]] == [s.stage_key for s in r6]
    for i in range(2):
        assert same_state(eight.model.bodies[i], six.model.bodies[i])
        # a cached stage reports what its training reached and cost
        assert (r8[i].val_acc, r8[i].train_acc, r8[i].lr) == (r6[i].val_acc, r6[i].train_acc, r6[i].lr)
        assert r8[i].seconds == r6[i].seconds > 0
    assert r8[0].store_key == r6[0].store_key  # stage 1's stored features are reused...
    assert first_body == [1]  # ...so stage 1 runs only in fit's one-sample check: not trained, evaluated or rebuilt
    assert r8[1].store_key is not None and r8[1].store_bytes > 0  # cnn6's last stage stored nothing; cnn8 needs it
    assert len(FeatureStore(tmp_path / "store").ls()) == 4


def test_total_of_the_prefix_is_partials_first_stage(tmp_path):
    train, val = task()
    one = fit(model("cnn1"), train, val, tmp_path, method="total")
    six = fit(model("cnn6"), train, val, tmp_path, method="partial")
    assert six.report.stages[0].cached and not six.report.stages[1].cached
    assert six.report.stages[0].stage_key == one.report.stages[0].stage_key
    assert same_state(six.model.bodies[0], one.model.bodies[0])


def test_share_prefixes_false_retrains(tmp_path):
    train, val = task()
    six = fit(model("cnn6"), train, val, tmp_path, method="partial")
    again = fit(model("cnn6"), train, val, tmp_path, method="partial", share_prefixes=False)
    assert [s.cached for s in again.report.stages] == [False, False]
    assert [s.stage_key for s in again.report.stages] == [s.stage_key for s in six.report.stages]
    assert same_state(again.model, six.model)  # training is deterministic: retraining gives the same weights
    cached = fit(model("cnn6"), train, val, tmp_path, method="partial")
    assert [s.cached for s in cached.report.stages] == [True, True]
    assert same_state(cached.model, six.model)


@pytest.mark.parametrize("change", ["lr", "weight_decay", "seed", "data", "init", "epochs", "batch_size",
                                    "store_dtype"])
def test_anything_that_changes_the_weights_changes_the_key(change, tmp_path):
    train, val = task(n=100, n_val=50)
    base = fit(model("cnn2"), train, val, tmp_path, method="partial")
    kw: dict = {"method": "partial"}
    net, tr, va = model("cnn2"), train, val
    if change == "lr":
        kw["config"] = TrainConfig(lr=1e-2)
    elif change == "weight_decay":
        kw["config"] = TrainConfig(lr=CFG.lr, weight_decay=0.0)
    elif change == "seed":
        kw["seed"] = 1
    elif change == "data":
        tr, _ = task(n=100, n_val=50, seed=1)
    elif change == "init":
        net = model("cnn2", seed=1)
    elif change == "epochs":
        kw["epochs"] = 2
    elif change == "batch_size":
        kw["batch_size"] = 25
    other = fit(net, tr, va, tmp_path, **kw) if change != "store_dtype" else None
    if change == "store_dtype":  # only what reads stored features depends on how they are stored
        other = fit(net, tr, va, tmp_path, store_dtype=torch.float32, **kw)
        assert other.report.stages[0].cached
        assert other.report.stages[0].stage_key == base.report.stages[0].stage_key
        assert other.report.stages[0].store_key != base.report.stages[0].store_key
        stage = 1
    else:
        stage = 0
    assert not other.report.stages[stage].cached
    assert other.report.stages[stage].stage_key != base.report.stages[stage].stage_key


def test_stage_key_hashes_modules_by_weights_and_parts_by_value():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert stage_key(body=a, lr=1e-3) == stage_key(body=b, lr=1e-3)
    assert len(stage_key(body=a)) == 32
    assert stage_key(body=a, lr=1e-3) != stage_key(body=a, lr=2e-3)
    with torch.no_grad():
        b.weight[0, 0] += 1e-6
    assert stage_key(body=a) != stage_key(body=b)
    assert stage_key(body=a) != stage_key(body=nn.Linear(3, 2, bias=False))


def test_unreadable_stage_file_is_retrained(tmp_path, caplog):
    train, val = task(n=100, n_val=50)
    first = fit(model("cnn2"), train, val, tmp_path, method="partial")
    key = first.report.stages[0].stage_key
    (tmp_path / "stages" / f"{key}.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING):
        again = fit(model("cnn2"), train, val, tmp_path, method="partial")
    assert "ignoring unreadable stage file" in caplog.text
    assert [s.cached for s in again.report.stages] == [False, True]  # stage 2's key does not change
    assert same_state(again.model, first.model)
    assert StageCache(str(tmp_path / "stages")).load(key) is not None  # written again, readable


# -- resume after a crash ---------------------------------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import glob, os, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import pystage
    from pystage import FeatureStore, TrainConfig, models
    from pystage.data import synthetic

    root, mode = sys.argv[1], sys.argv[2]
    kw = dict(num_classes=4, shape=(3, 16, 16), seed=0, noise=0.3)
    train, val = synthetic(n=300, **kw), synthetic(n=100, split="val", **kw)
    torch.manual_seed(0)
    net = models.get("cnn8", num_classes=4, width=4)
    stages = os.path.join(root, "stages")

    def hook(module, inputs):  # on stage 2's first layer, in training only
        if not module.training:
            return
        if mode == "self" and glob.glob(os.path.join(stages, "*.progress.pt")):
            os.kill(os.getpid(), signal.SIGKILL)  # stage 2 has saved epoch 1: die mid-way through epoch 2
        if mode == "slow":
            time.sleep(0.03)  # time for the parent to kill us from outside

    net[net.split_points[0]].register_forward_pre_hook(hook)
    pystage.fit(net, train, val, method="partial", epochs=3, config=TrainConfig(lr=3e-3),
                store=FeatureStore(os.path.join(root, "store")), checkpoint_dir=stages, progress=False)
    print("FINISHED", flush=True)
""")


def resume_args():
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=0, noise=0.3)
    train, val = synthetic(n=300, **kw), synthetic(n=100, split="val", **kw)
    torch.manual_seed(0)
    net = models.get("cnn8", num_classes=CLASSES, width=4)
    return net, train, val, dict(method="partial", epochs=3, config=TrainConfig(lr=3e-3))


def files(root: Path) -> tuple[list[str], list[str]]:
    """(finished stage keys, in-progress stage keys) under root/stages."""
    names = [os.path.basename(p) for p in glob.glob(str(root / "stages" / "*.pt"))]
    return (sorted(n[:-3] for n in names if not n.endswith(".progress.pt")),
            sorted(n[:-len(".progress.pt")] for n in names if n.endswith(".progress.pt")))


def entry_stats(root: Path) -> dict[str, tuple[int, int]]:
    return {e.key: (os.stat(e.path).st_mtime_ns, os.stat(e.path).st_ino) for e in FeatureStore(root / "store").ls()}


def uninterrupted(root: Path):
    net, train, val, kw = resume_args()
    return fit(net, train, val, root, **kw)


def resume_and_check(root: Path, reference, caplog, epoch_saved: int):
    done_before, running_before = files(root)
    stored_before = entry_stats(root)
    assert len(done_before) == 1 and len(running_before) == 1
    assert len(stored_before) == 2  # stage 1's features, train and val
    net, train, val, kw = resume_args()
    staged = StagedNet.from_sequential(net, input_shape=SHAPE, num_classes=CLASSES)
    first_body = count_calls(staged.bodies[0])
    with caplog.at_level(logging.INFO, logger="pystage.train.fit"):
        res = fit(staged, train, val, root, **kw)
    rep = res.report
    assert [s.cached for s in rep.stages] == [True, False, False]
    assert rep.stages[0].stage_key == done_before[0] and rep.stages[1].stage_key == running_before[0]
    assert f"stage 2: resuming after epoch {epoch_saved}" in caplog.text
    assert "stage 3: resuming" not in caplog.text
    assert first_body == [1]  # only fit's one-sample check: stage 1 neither retrained nor pushed through again
    stored_after = entry_stats(root)
    assert {k: stored_after[k] for k in stored_before} == stored_before  # same files, untouched
    assert len(stored_after) == 4
    done_after, running_after = files(root)
    assert running_after == [] and len(done_after) == 3
    # the same weights as a run that was never interrupted
    assert [s.stage_key for s in rep.stages] == [s.stage_key for s in reference.report.stages]
    ref_state = reference.model.state_dict()
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(v, ref_state[k], rtol=1e-6, atol=1e-7, msg=k)
    assert rep.val_acc == pytest.approx(reference.report.val_acc, abs=0.011)


def test_killed_run_resumes_from_its_last_epoch(tmp_path, caplog):
    root = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), "self"], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "FINISHED" not in proc.stdout
    _, running = files(root)
    saved = StageCache(str(root / "stages")).load(running[0], "progress")
    assert saved["cursor"]["epoch"] == 1  # killed during epoch 2 of stage 2
    resume_and_check(root, uninterrupted(tmp_path / "reference"), caplog, epoch_saved=1)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYSTAGE_SLOW") != "1", reason="slow (a second subprocess); PYSTAGE_SLOW=1 runs it")
def test_run_killed_from_outside_resumes(tmp_path, caplog):
    """As above, but killed by another process at whatever point stage 2 has reached after saving an epoch."""
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(root), "slow"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            done, running = files(root)
            # stage 1 finished and stage 2 has saved an epoch (stage 1's own progress file is gone by then)
            if done and any(r not in done for r in running):
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"the run ended or stalled before stage 2 saved an epoch: {proc.communicate()}")
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL and "FINISHED" not in out
    done, running = files(root)
    assert len(done) == 1, "killed after stage 2 finished: the test's timing did not hold"
    saved = StageCache(str(root / "stages")).load(running[0], "progress")
    epoch = saved["cursor"]["epoch"]
    assert epoch in (1, 2)
    resume_and_check(root, uninterrupted(tmp_path / "reference"), caplog, epoch_saved=epoch)
