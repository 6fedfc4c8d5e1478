"""Bad input fails before training, with a pystage error naming the argument, the value and what was expected;
each method's unsupported options raise; (x, y) arrays and float64 stored features are accepted."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch
from torch import nn

import pystage
from pystage import CapacityConfig, FeatureStore, IncrementalConfig, SearchConfig, TrainConfig, models
from pystage.data import synthetic
from pystage.train import FitArgumentError, FitTypeError, TrainError, UnsupportedOptionError
from pystage.train.engine import Engine

SHAPE, CLASSES = (3, 16, 16), 4


def task(n: int = 100, n_val: int = 40, shape=SHAPE, classes=CLASSES):
    kw = dict(num_classes=classes, shape=shape, seed=0, noise=0.3)
    return synthetic(n=n, **kw), synthetic(n=n_val, split="val", **kw)


def model(name: str = "cnn2") -> nn.Sequential:
    torch.manual_seed(0)
    return models.get(name, num_classes=CLASSES, width=4)


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any stage starts training."""
    def boom(self, *a, **kw):
        raise AssertionError("a stage started training")

    monkeypatch.setattr(Engine, "run", boom)


NOT_GIVEN = object()


def raises_before_training(tmp_path, error, match, *, net=None, train=None, val=NOT_GIVEN, **kw):
    train = task()[0] if train is None else train
    val = task()[1] if val is NOT_GIVEN else val
    kw.setdefault("store", FeatureStore(tmp_path / "store"))
    kw.setdefault("checkpoint_dir", tmp_path / "stages")
    with pytest.raises(error, match=match) as info:
        pystage.fit(net if net is not None else model(), train, val, progress=False, **kw)
    assert isinstance(info.value, TrainError), type(info.value)
    assert not glob.glob(str(tmp_path / "stages" / "*.pt")) and not glob.glob(str(tmp_path / "store" / "features" / "*"))
    return info.value


def relabel(data, labels):
    data.tensors = (data.x, torch.as_tensor(labels))
    return data


BAD = {
    "wrong channels": (dict(train=task(shape=(1, 16, 16))[0], val=None), r"train: got 'samples of shape \(1, 16, 16\)', "
                       r"expected inputs the model accepts \(RuntimeError"),
    "too-small images": (dict(net=model("cnn8"), train=task(shape=(3, 2, 2))[0], val=None), r"train: got 'samples of shape"),
    "train/val shapes": (dict(train=task()[0], val=task(shape=(3, 8, 8))[1]),
                         r"val: got 'samples of shape \(3, 8, 8\)', expected the training samples' shape \(3, 16, 16\)"),
    "empty train": (dict(train=task()[0].subset(torch.arange(0))), r"train: got 'a dataset of 0"),
    "empty val": (dict(val=task()[1].subset(torch.arange(0))), r"val: got 'a dataset of 0 samples'"),
    "val labels out of range": (dict(val=relabel(task()[1], torch.arange(40) % 7)),
                                r"val labels: got 'range \[0, 6\]', expected class ids in \[0, 4\)"),
    "train labels negative": (dict(train=relabel(task()[0], torch.arange(100) % 4 - 1)),
                              r"train labels: got 'range \[-1, 2\]'"),
    "store_dtype int8": (dict(store_dtype=torch.int8), r"store_dtype: got torch.int8, expected one of"),
    "epochs 2.5": (dict(epochs=2.5), r"epochs: got 2.5, expected an int >= 1"),
    "batch_size '50'": (dict(batch_size="50"), r"batch_size: got '50', expected an int >= 1"),
    "seed -1": (dict(seed=-1), r"seed: got -1"),
    "head": (dict(head="mlp"), r"head: got 'mlp', expected one of"),
    "device": (dict(device="tpu9"), r"device: got 'tpu9'"),
    "memory_budget": (dict(memory_budget="lots"), r"memory_budget: got 'lots', expected a size"),
    "search type": (dict(search={"draws": 3}), r"search: got \{'draws': 3\}, expected None or a pystage.SearchConfig"),
    "config type": (dict(config={"lr": 0.1}), r"config: got"),
    "store type": (dict(store="/tmp/x"), r"store: got 'str', expected None or a pystage.FeatureStore"),
    "(x, y) of garbage": (dict(train=("a", "b")), r"train: got 'tuple'"),
    "growth for total": (dict(method="total", growth=IncrementalConfig()), r"growth: .*method='total' does not"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_pystage_error_before_training(case, tmp_path, no_training):
    kw, match = BAD[case]
    raises_before_training(tmp_path, FitArgumentError, match, **kw)


def test_store_root_that_is_a_file(tmp_path, no_training):
    (tmp_path / "file").write_text("not a directory")
    err = raises_before_training(tmp_path, FitArgumentError, r"store: got '.*file/features', expected a writable directory",
                                 store=FeatureStore(tmp_path / "file"))
    assert err.name == "store"
    raises_before_training(tmp_path, FitArgumentError, r"checkpoint_dir: got '.*file/stages', expected a writable",
                           method="total", checkpoint_dir=tmp_path / "file" / "stages")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_read_only_store_root(tmp_path, no_training):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        raises_before_training(tmp_path, FitArgumentError, r"store: .*expected a writable directory",
                               store=FeatureStore(ro))
    finally:
        ro.chmod(0o700)


def test_model_that_is_not_sequential(tmp_path, no_training):
    err = raises_before_training(tmp_path, FitTypeError, r"model must be an nn.Sequential", net=nn.Conv2d(3, 4, 3))
    assert isinstance(err, TypeError)


def test_search_config_is_checked_when_made():
    with pytest.raises(FitArgumentError, match=r"SearchConfig.draws: got 2.5, expected an int >= 0"):
        SearchConfig(draws=2.5)


# -- options each method supports ------------------------------------------------------------------------------

CAPACITY_UNSUPPORTED = [("memory_budget", "1KiB"), ("search", SearchConfig(draws=1)), ("checkpoint_dir", "/nonexistent"),
                        ("share_prefixes", False), ("store_dtype", torch.float32)]


@pytest.mark.parametrize("option, value", CAPACITY_UNSUPPORTED)
def test_capacity_raises_for_options_it_does_not_support(option, value, tmp_path, no_training):
    train, val = task()
    with pytest.raises(UnsupportedOptionError, match=f"{option}: .*method='capacity' does not support") as info:
        pystage.fit(model(), train, val, method="capacity", progress=False, **{option: value})
    assert info.value.option == option and info.value.method == "capacity"


@pytest.mark.parametrize("option, value", [("memory_budget", "1KiB"), ("search", SearchConfig(draws=1))])
def test_incremental_raises_for_options_it_does_not_support(option, value, tmp_path, no_training):
    train, val = task()
    with pytest.raises(UnsupportedOptionError, match=f"method='incremental' does not support '{option}'"):
        pystage.fit(model(), train, val, method="incremental", progress=False, store=FeatureStore(tmp_path),
                    **{option: value})


def test_the_issues_capacity_call_raises(tmp_path, no_training):
    train, val = task()
    with pytest.raises(UnsupportedOptionError):
        pystage.fit(model(), train, val, method="capacity", memory_budget="1KiB", checkpoint_dir="/nonexistent",
                    progress=False)


@pytest.mark.parametrize("method", ["capacity", "incremental"])
def test_growing_methods_refuse_to_train_every_rank_alone(method, monkeypatch, no_training):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun
    train, val = task()
    with pytest.raises(UnsupportedOptionError, match=f"distributed: .*method='{method}' does not support"):
        pystage.fit(model(), train, val, method=method, progress=False)


def test_growing_methods_support_measure_memory(tmp_path):
    train, val = task()
    rep = pystage.fit(model(), train, val, method="capacity", progress=False, measure_memory=True,
                      growth=CapacityConfig(fractions=2)).report
    assert rep.stages[0].measured_peak_mib > 0
    rep = pystage.fit(model(), train, val, method="incremental", progress=False, measure_memory=True,
                      store=FeatureStore(tmp_path / "s"), checkpoint_dir=tmp_path / "c",
                      growth=IncrementalConfig(max_epochs_per_step=1, lookahead_epochs=1)).report
    assert all(s.measured_peak_mib > 0 for s in rep.stages)


def test_incremental_caches_its_steps_and_resumes(tmp_path):
    train, val = task()
    kw = dict(method="incremental", progress=False, store=FeatureStore(tmp_path / "s"), checkpoint_dir=tmp_path / "c",
              growth=IncrementalConfig(max_epochs_per_step=2, lookahead_epochs=1, ws=2))
    a = pystage.fit(model(), train, val, **kw)
    b = pystage.fit(model(), train, val, **kw)
    assert [s.cached for s in a.report.stages] == [False, False] and [s.cached for s in b.report.stages] == [True, True]
    assert b.report.history == a.report.history
    for k, v in a.model.state_dict().items():
        assert torch.equal(b.model.state_dict()[k], v), k
    c = pystage.fit(model(), train, val, **{**kw, "share_prefixes": False})
    assert [s.cached for s in c.report.stages] == [False, False]


# -- accepted inputs -------------------------------------------------------------------------------------------

def test_x_y_arrays_are_accepted(tmp_path):
    train, val = task()
    arrays = (train.x.numpy(), train.y.numpy())
    res = pystage.fit(model(), arrays, (val.x, val.y), method="total", store=FeatureStore(tmp_path / "s"),
                      checkpoint_dir=tmp_path / "c", progress=False, config=TrainConfig(lr=3e-3))
    ref = pystage.fit(model(), train, val, method="total", store=FeatureStore(tmp_path / "s"),
                      checkpoint_dir=tmp_path / "c", progress=False, config=TrainConfig(lr=3e-3))
    assert not res.report.stages[0].cached and ref.report.stages[0].cached  # the same data however given: one stage
    assert res.report.val_acc == ref.report.val_acc and isinstance(arrays[0], np.ndarray)


def test_float64_stored_features_train(tmp_path):
    train, val = task()
    store = FeatureStore(tmp_path / "s")
    rep = pystage.fit(model(), train, val, method="partial", store=store, checkpoint_dir=tmp_path / "c",
                      progress=False, store_dtype=torch.float64, config=TrainConfig(lr=3e-3)).report
    assert all(str(e.dtype) == "float64" for e in store.ls()) and 0 <= rep.val_acc <= 1
