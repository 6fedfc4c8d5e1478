"""fit() with every method: what it returns and reports, that it learns, where each stage's batches come from,
that frozen prefixes stay frozen, checkpoint == total, memory_budget planning, and argument errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pystage
from pystage import FeatureStore, StagedNet, TrainConfig, models
from pystage.data import synthetic
from pystage.staged import StageError
from pystage.train import METHODS
from pystage.train.cache import StageCache

SHAPE = (3, 16, 16)
CLASSES = 4
N, N_VAL, BATCH = 600, 200, 50
CFG = TrainConfig(lr=3e-3)


def task(n: int = N, n_val: int = N_VAL, seed: int = 0):
    """An easy 4-class synthetic task (chance: 25%)."""
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=seed, noise=0.3)
    return synthetic(n=n, **kw), synthetic(n=n_val, split="val", **kw)


def model(name: str = "cnn2", seed: int = 0, **kw) -> nn.Sequential:
    torch.manual_seed(seed)
    return models.get(name, num_classes=CLASSES, **{"width": 8, **kw})


def fit(net, train, val, tmp_path, **kw):
    kw.setdefault("config", CFG)
    return pystage.fit(net, train, val, store=FeatureStore(tmp_path / "store"), checkpoint_dir=tmp_path / "stages",
                       progress=False, **kw)


def accuracy(net: nn.Module, data) -> float:
    with torch.no_grad():
        return int((net(data.x).argmax(1) == data.y).sum()) / len(data.y)


class Calls:
    """Forward hooks on each stage body: (body index, grad enabled, training mode, batch rows) in call order."""

    def __init__(self, bodies) -> None:
        self.events: list[tuple[int, bool, bool, int]] = []
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(bodies)]

    def _hook(self, i):
        def hook(module, inputs, output):
            self.events.append((i, torch.is_grad_enabled(), module.training, inputs[0].shape[0]))
        return hook

    def of(self, i: int) -> list[tuple[bool, bool, int]]:
        return [e[1:] for e in self.events if e[0] == i]

    def first(self, i: int) -> int:
        return next(n for n, e in enumerate(self.events) if e[0] == i)


def batches(rows: int, size: int) -> list[int]:
    return [min(size, rows - i) for i in range(0, rows, size)]


# -- every method -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["total", "partial", "partial-recompute", "checkpoint"])
def test_every_method_trains_a_staged_net_that_learns_and_reports(method, tmp_path):
    train, val = task()
    store = FeatureStore(tmp_path / "store")
    res = pystage.fit(model(), train, val, method=method, epochs=2, config=CFG, store=store,
                      checkpoint_dir=tmp_path / "stages", progress=False)
    net, rep = res.model, res.report
    assert isinstance(net, StagedNet) and len(net) == 2 and not net.training
    out = net(val.x[:7])
    assert out.shape == (7, CLASSES) and out.dtype == torch.float32
    assert net.stages[0].head is None and net.stages[1].head is not None

    per_stage = METHODS[method].per_stage
    assert rep.method == method and rep.epochs == 2 and rep.batch_size == BATCH and rep.device == "cpu"
    assert [s.stage for s in rep.stages] == ([1, 2] if per_stage else [1])
    assert [s.layers for s in rep.stages] == (["1", "2"] if per_stage else ["1-2"])
    assert rep.plan is None and rep.wall_s > 0
    for s in rep.stages:
        assert s.seconds > 0 and s.peak_mem_mib > 0
        assert 0.0 <= s.val_acc <= 1.0 and 0.0 <= s.train_acc <= 1.0
        assert s.lr == CFG.lr and s.weight_decay == CFG.weight_decay
        assert s.trials == 1 and s.search == [] and not s.cached
        assert len(s.stage_key) == 32 and int(s.stage_key, 16) >= 0
    assert len({s.stage_key for s in rep.stages}) == len(rep.stages)
    assert rep.val_acc == rep.stages[-1].val_acc and rep.peak_mem_mib == max(s.peak_mem_mib for s in rep.stages)

    if method == "partial":
        first, last = rep.stages
        assert first.store_key is not None and store.has(first.store_key) and first.store_bytes > 0
        assert first.store_bytes == sum(store.open(e.key).nbytes for e in store.ls())
        assert last.store_key is None and last.store_bytes == 0
    else:
        assert all(s.store_key is None and s.store_bytes == 0 for s in rep.stages)
        assert store.ls() == []  # only partial writes features
    # learning: clearly above chance (25%) after 2 epochs, on held-out data
    assert rep.val_acc > 0.45, rep
    measured = accuracy(net, val)
    if method == "partial":  # the last stage was scored on float16-stored features; the model sees float32
        assert abs(measured - rep.val_acc) <= 0.03
    else:
        assert measured == pytest.approx(rep.val_acc, abs=1e-9)
    d = rep.to_dict()
    assert d["method"] == method and len(d["stages"]) == len(rep.stages) and d["val_acc"] == rep.val_acc
    assert method in str(rep)


def test_without_val_there_is_no_val_acc(tmp_path):
    train, _ = task(n=200)
    rep = fit(model(), train, None, tmp_path, method="partial").report
    assert [s.val_acc for s in rep.stages] == [None, None]
    assert all(0.0 <= s.train_acc <= 1.0 for s in rep.stages)
    assert len(FeatureStore(tmp_path / "store").ls()) == 1  # the train split only


def test_fit_accepts_a_staged_net(tmp_path):
    train, val = task(n=200, n_val=100)
    torch.manual_seed(0)
    net = StagedNet.from_sequential(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                                                  nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
                                    [3], input_shape=SHAPE, num_classes=CLASSES)
    res = fit(net, train, val, tmp_path, method="partial")
    assert res.model is net and len(res.report.stages) == 2
    assert res.model(val.x[:3]).shape == (3, CLASSES)


# -- where batches come from ------------------------------------------------------------------------------------

def test_partial_reads_stored_features_built_with_one_forward_pass(tmp_path):
    train, val = task()
    epochs = 2
    net = model("cnn8", width=4)  # three stages
    staged = StagedNet.from_sequential(net, input_shape=SHAPE, num_classes=CLASSES)
    calls = Calls(staged.bodies)
    store = FeatureStore(tmp_path / "store")
    rep = pystage.fit(staged, train, val, method="partial", epochs=epochs, config=CFG, store=store,
                      checkpoint_dir=tmp_path / "stages", progress=False).report
    build = BATCH  # on the CPU fit builds entries at the training batch size (on a GPU: at least 256 rows)
    steps = epochs * math.ceil(N / BATCH)
    for i in range(3):
        ev = calls.of(i)
        # fit's check (one sample through the whole model), then train, eval
        expected = [(False, False, 1)] + [(True, True, BATCH)] * steps + [(False, False, b) for b in batches(N_VAL, BATCH)]
        if i < 2:  # then one no-grad pass over each split to build the next stage's input
            expected += [(False, False, b) for b in batches(N, build) + batches(N_VAL, build)]
        assert ev == expected, f"stage {i + 1}"
    # stage k+1 never runs stage k: it reads the store (after fit's one-sample check, which runs every stage)
    training = [e for e in calls.events if e[3] != 1]
    for i in range(2):
        first = next(n for n, e in enumerate(training) if e[0] == i + 1)
        assert all(e[0] != i for e in training[first:])
    # one entry per non-last stage per split
    entries = store.ls()
    assert len(entries) == 4
    assert sorted(e.num_rows for e in entries) == [N_VAL, N_VAL, N, N]
    assert {rep.stages[0].store_key, rep.stages[1].store_key} <= {e.key for e in entries}
    assert all("float16" in str(e.dtype) for e in entries)  # store_dtype's default
    assert rep.stages[2].store_key is None


def test_partial_recompute_runs_the_frozen_prefix_every_batch(tmp_path):
    train, val = task()
    epochs = 2
    staged = StagedNet.from_sequential(model("cnn8", width=4), input_shape=SHAPE, num_classes=CLASSES)
    calls = Calls(staged.bodies)
    store = FeatureStore(tmp_path / "store")
    pystage.fit(staged, train, val, method="partial-recompute", epochs=epochs, config=CFG, store=store,
                checkpoint_dir=tmp_path / "stages", progress=False)
    steps = epochs * math.ceil(N / BATCH)
    train_calls = [(True, True, BATCH)] * steps
    frozen_calls = [(False, False, BATCH)] * steps  # every batch of every epoch, no grad, eval mode
    evals = [(False, False, b) for b in batches(N_VAL, BATCH)]
    check = [(False, False, 1)]  # fit's one-sample check through the whole model, before training
    assert calls.of(0) == check + train_calls + evals + (frozen_calls + evals) * 2
    assert calls.of(1) == check + train_calls + evals + frozen_calls + evals
    assert calls.of(2) == check + train_calls + evals
    assert store.ls() == []


@pytest.mark.parametrize("method", ["partial", "partial-recompute"])
def test_frozen_prefixes_stay_frozen(method, tmp_path):
    train, val = task(n=300, n_val=100)
    staged = StagedNet.from_sequential(model("cnn8", width=4, batch_norm=True), input_shape=SHAPE,
                                       num_classes=CLASSES)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    frozen_while_training: dict[int, bool] = {}

    def snap(k):  # when stage k+1 first runs in training mode, stages 1..k are finished
        def hook(module, inputs):
            if module.training and k not in snapshots:
                snapshots[k] = {f"{i}.{n}": t.clone() for i in range(k)
                                for n, t in staged.bodies[i].state_dict().items()}
                frozen_while_training[k] = all(not p.requires_grad and not staged.bodies[i].training
                                               for i in range(k) for p in staged.bodies[i].parameters())
        return hook

    for k in (1, 2):
        staged.bodies[k].register_forward_pre_hook(snap(k))
    rep = fit(staged, train, val, tmp_path, method=method, epochs=2).report
    assert set(snapshots) == {1, 2}
    for k, snap_k in snapshots.items():
        for name, before in snap_k.items():
            i, n = name.split(".", 1)
            assert torch.equal(staged.bodies[int(i)].state_dict()[n], before), (k, name)  # incl. BN running stats
    cache = StageCache(str(tmp_path / "stages"))
    for i, s in enumerate(rep.stages):
        payload = cache.load(s.stage_key)
        assert payload is not None and payload["report"]["stage_key"] == s.stage_key
        body_state = {k[2:]: v for k, v in payload["state"].items() if k.startswith("0.")}
        assert body_state.keys() == staged.bodies[i].state_dict().keys()
        for n, t in staged.bodies[i].state_dict().items():
            assert torch.equal(t, body_state[n]), (i, n)
    assert frozen_while_training == {1: True, 2: True}  # earlier stages: no grad, eval mode
    # the result is an ordinary model again: eval mode, parameters trainable (for fine-tuning)
    assert all(p.requires_grad for b in staged.bodies for p in b.parameters())
    assert all(not b.training for b in staged.bodies)
    # frozen means trained: every stage moved away from its initial weights
    fresh = model("cnn8", width=4, batch_norm=True)
    assert not torch.equal(fresh[0].weight, staged.bodies[0][0].weight)


def test_checkpoint_gives_the_same_weights_as_total(tmp_path):
    train, val = task(n=300, n_val=100)
    a = fit(model("cnn4"), train, val, tmp_path / "a", method="total", epochs=2)
    b = fit(model("cnn4"), train, val, tmp_path / "b", method="checkpoint", epochs=2)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
    assert a.report.stages[0].stage_key == b.report.stages[0].stage_key
    assert not b.report.stages[0].cached
    assert b.report.val_acc == pytest.approx(a.report.val_acc, abs=0.02)


def test_checkpoint_reuses_a_stage_trained_by_total(tmp_path):
    """One computation, one key: checkpoint loads what total saved (and the other way round)."""
    train, val = task(n=200, n_val=100)
    a = fit(model(), train, val, tmp_path, method="total")
    b = fit(model(), train, val, tmp_path, method="checkpoint")
    assert b.report.stages[0].cached and b.report.stages[0].stage_key == a.report.stages[0].stage_key
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    c = fit(model(seed=1), train, val, tmp_path / "c", method="checkpoint")
    d = fit(model(seed=1), train, val, tmp_path / "c", method="total")
    assert d.report.stages[0].cached
    assert all(torch.equal(d.model.state_dict()[k], v) for k, v in c.model.state_dict().items())


def test_partial_and_recompute_share_stage_one_but_not_stage_two(tmp_path):
    train, val = task(n=200, n_val=100)
    a = fit(model(), train, val, tmp_path, method="partial")
    b = fit(model(), train, val, tmp_path, method="partial-recompute")
    assert [s.cached for s in b.report.stages] == [True, False]
    assert a.report.stages[0].stage_key == b.report.stages[0].stage_key
    assert a.report.stages[1].stage_key != b.report.stages[1].stage_key


# -- memory budget ----------------------------------------------------------------------------------------------

def test_memory_budget_takes_split_points_from_the_planner(tmp_path):
    train, val = task(n=200, n_val=100)
    with pytest.raises(pystage.PlanError) as info:  # far too small for any split
        fit(models.get("plain-6-16", num_classes=CLASSES), train, val, tmp_path, memory_budget="1KiB")
    budget = info.value.min_feasible
    assert budget > 1024
    net = models.get("plain-6-16", num_classes=CLASSES)
    assert net.split_points == ()  # one stage as built
    res = fit(net, train, val, tmp_path, method="partial", memory_budget=budget)
    plan = res.report.plan
    assert plan is not None and plan.budget == budget
    assert len(plan.split_points) >= 1  # the whole net does not fit the smallest feasible budget
    assert plan.total_predicted_bytes > budget >= plan.max_peak
    assert len(res.report.stages) == len(res.model) == len(plan.split_points) + 1
    bounds = (0, *plan.split_points, len(net))
    assert [len(b) for b in res.model.bodies] == [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    assert res.report.to_dict()["plan"]["split_points"] == list(plan.split_points)
    assert res.model(val.x[:2]).shape == (2, CLASSES)
    # a roomy budget: one stage
    roomy = fit(models.get("plain-6-16", num_classes=CLASSES), train, val, tmp_path / "roomy", method="total",
                memory_budget="1GiB").report
    assert roomy.plan.split_points == () and len(roomy.stages) == 1


def test_memory_budget_needs_a_sequential(tmp_path):
    train, val = task(n=100, n_val=50)
    staged = StagedNet.from_sequential(model(), input_shape=SHAPE, num_classes=CLASSES)
    with pytest.raises(TypeError, match="memory_budget"):
        fit(staged, train, val, tmp_path, memory_budget="1GiB")


# -- errors -----------------------------------------------------------------------------------------------------

def test_unknown_method_names_the_argument_and_choices(tmp_path):
    train, _ = task(n=100)
    with pytest.raises(ValueError, match=r"method: got 'sideways', expected one of total, partial"):
        fit(model(), train, None, tmp_path, method="sideways")


@pytest.mark.parametrize("kw, word", [({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"),
                                      ({"batch_size": 0}, "batch_size")])
def test_non_positive_epochs_or_batch_size(kw, word, tmp_path):
    train, _ = task(n=100)
    with pytest.raises(ValueError, match=word):
        fit(model(), train, None, tmp_path, **kw)
    assert not (tmp_path / "stages").exists() or not any((tmp_path / "stages").iterdir())


class NotSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("bad", [NotSequential(), nn.Conv2d(3, 4, 3), "cnn2"])
def test_model_must_be_sequential_or_staged_net(bad, tmp_path):
    train, _ = task(n=100)
    with pytest.raises(TypeError, match=r"model must be an nn.Sequential.*or a StagedNet, got"):
        fit(bad, train, None, tmp_path)


def test_bad_split_points_on_the_model(tmp_path):
    train, _ = task(n=100)
    net = model()
    net.split_points = (0,)
    with pytest.raises(StageError, match="split_points"):
        fit(net, train, None, tmp_path)


def test_train_config_checks_its_values():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=-1)


def test_sgd_config_is_used(tmp_path):
    train, val = task(n=200, n_val=100)
    cfg = TrainConfig(lr=0.05, optimizer="sgd", weight_decay=0.0)
    rep = fit(model(), train, val, tmp_path, method="partial", config=cfg).report
    assert [(s.lr, s.weight_decay) for s in rep.stages] == [(0.05, 0.0)] * 2
    other = fit(model(), train, val, tmp_path, method="partial").report
    assert other.stages[0].stage_key != rep.stages[0].stage_key  # the configuration is part of the key


# -- stored features in memory --------------------------------------------------------------------------------------

@pytest.mark.parametrize("copy", ["auto", "never"])
def test_partial_on_features_in_memory_equals_partial_on_features_read_from_disk(tmp_path, copy, monkeypatch):
    """The entries built in memory (the device budget's default on the CPU holds them) train exactly as the same
    entries read from their files; fit returns once every background disk copy is published."""
    from pystage.store.entry import StoreEntry

    train, val = task()
    runs, loads, real = {}, [], StoreEntry._load
    monkeypatch.setattr(StoreEntry, "_load", lambda self, *a: loads.append(self.key) or real(self, *a))
    for name, kw in (("disk", dict(device_budget=0)), ("memory", dict(disk_copy=copy))):
        loads.clear()
        store = FeatureStore(tmp_path / name / "store", **kw)
        runs[name] = pystage.fit(model("cnn8"), train, val, method="partial", store=store, config=CFG,
                                 checkpoint_dir=tmp_path / name / "stages", progress=False)
        keys = [s.store_key for s in runs[name].report.stages[:-1]]
        assert all(store.has(k) for k in keys) == (copy != "never" or name == "disk")
        assert (store.verify() == []) if store.ls() else copy == "never"
        assert bool(loads) == (name == "disk")  # from the files, or never read from a file
    a, b = runs["disk"], runs["memory"]
    assert [s.stage_key for s in a.report.stages] == [s.stage_key for s in b.report.stages]
    assert [s.val_acc for s in a.report.stages] == [s.val_acc for s in b.report.stages]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_a_full_disk_under_a_background_copy_does_not_stop_training(tmp_path, monkeypatch, caplog):
    """The features train the next stage from memory; the failed disk copy is logged, and nothing is left on disk."""
    import errno
    import logging

    import h5py

    train, val = task()
    clean = fit(model(), train, val, tmp_path / "clean", method="partial")

    import pystage.store.chunkfile as chunkfile

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "write_direct", full)
    monkeypatch.setattr(chunkfile, "_pwrite_all", full)  # entries in memory are written with pwrite
    with caplog.at_level(logging.WARNING):
        got = fit(model(), train, val, tmp_path / "full", method="partial")
    assert "was not written" in caplog.text and "No space left" in caplog.text
    assert FeatureStore(tmp_path / "full" / "store").ls() == []
    assert [s.stage_key for s in got.report.stages] == [s.stage_key for s in clean.report.stages]
    for p, q in zip(got.model.parameters(), clean.model.parameters()):
        assert torch.equal(p, q)
