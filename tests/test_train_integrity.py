"""Integrity: a corrupt store entry is detected and rebuilt, a tampered stage file is rejected and retrained, a
non-finite loss stops the stage and nothing non-finite is cached or stored, checkpoint counts BatchNorm statistics
once."""
from __future__ import annotations

import glob
import logging
import os
import struct
from pathlib import Path

import h5py
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import pystage
from pystage import FeatureStore, TrainConfig, models
from pystage.data import synthetic
from pystage.store import StoreArgumentError
from pystage.train import FitArgumentError, NonFiniteError, TrainError
from pystage.train.cache import StageCache
from pystage.train.engine import Cursor, Engine
from pystage.train.search import run_search
from pystage.train.sources import DatasetSource

SHAPE, CLASSES = (3, 16, 16), 4
CFG = TrainConfig(lr=3e-3)


def task(n: int = 200, n_val: int = 100):
    kw = dict(num_classes=CLASSES, shape=SHAPE, seed=0, noise=0.3)
    return synthetic(n=n, **kw), synthetic(n=n_val, split="val", **kw)


def model(name: str = "cnn8", **kw) -> nn.Sequential:
    torch.manual_seed(0)
    return models.get(name, num_classes=CLASSES, **{"width": 4, **kw})


def fit(root: Path, net=None, train=None, val=None, **kw):
    if train is None:
        train, val = task()
    kw.setdefault("config", CFG)
    kw.setdefault("method", "partial")
    return pystage.fit(net if net is not None else model(), train, val, store=FeatureStore(root / "store"),
                       checkpoint_dir=root / "stages", progress=False, **kw)


def same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def flip_bytes(path: str, chunk: int = 0, count: int = 3) -> None:
    """Flip ``count`` bytes of one feature chunk in place (the metadata stays intact)."""
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(offset + 37 + 101 * i)
            b = f.read(1)
            f.seek(offset + 37 + 101 * i)
            f.write(bytes([b[0] ^ 0xFF]))


def stage_files(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "stages" / "*.pt")))


# -- a corrupt store entry -----------------------------------------------------------------------------------------

def test_corrupt_entry_read_while_training_is_rebuilt_and_the_result_equals_a_clean_run(tmp_path, caplog):
    clean = fit(tmp_path / "clean")
    root = tmp_path / "run"
    first = fit(root)
    entry = FeatureStore(root / "store").open(first.report.stages[0].store_key)
    flip_bytes(entry.path)
    assert FeatureStore(root / "store").verify(entry.key)  # the checksums see it
    with caplog.at_level(logging.WARNING):
        again = fit(root, share_prefixes=False)  # every stage trains again and reads the stored features
    assert entry.path in caplog.text and "checksum" in caplog.text
    assert FeatureStore(root / "store").verify() == []  # rebuilt
    same_weights(again.model, clean.model)
    assert [s.stage_key for s in again.report.stages] == [s.stage_key for s in clean.report.stages]
    assert [s.val_acc for s in again.report.stages] == [s.val_acc for s in clean.report.stages]
    for f in stage_files(root):  # nothing non-finite was cached
        assert StageCache(str(root / "stages")).load(os.path.basename(f)[:-3]) is not None


def test_corrupt_entry_read_by_the_next_build_is_rebuilt_first(tmp_path, caplog):
    clean = fit(tmp_path / "clean")
    root = tmp_path / "run"
    first = fit(root)
    store = FeatureStore(root / "store")
    flip_bytes(store.open(first.report.stages[0].store_key).path)
    store.remove(first.report.stages[1].store_key)  # stage 2's features: rebuilt from stage 1's corrupt ones
    with caplog.at_level(logging.WARNING):
        again = fit(root)
    assert [s.cached for s in again.report.stages] == [True, True, True]
    assert "checksum" in caplog.text and store.verify() == []
    same_weights(again.model, clean.model)
    assert again.report.stages[1].store_key == clean.report.stages[1].store_key


def test_a_stage_on_stored_features_is_keyed_by_their_content(tmp_path, monkeypatch):
    """Features rebuilt with other bytes under the same entry key (as a non-deterministic GPU build would) make the
    stages that read them other stages, and the features built from them other entries."""
    import pystage.store.build as build

    root = tmp_path / "run"
    a = fit(root)
    store = FeatureStore(root / "store")
    store.remove(a.report.stages[0].store_key)
    real = build._to_numpy
    monkeypatch.setattr(build, "_to_numpy", lambda t, dtype: real(t * 1.001 if t.is_floating_point() else t, dtype))
    b = fit(root)
    monkeypatch.undo()
    assert b.report.stages[0].cached and b.report.stages[0].store_key == a.report.stages[0].store_key
    assert not b.report.stages[1].cached and b.report.stages[1].stage_key != a.report.stages[1].stage_key
    assert b.report.stages[1].store_key != a.report.stages[1].store_key


# -- a tampered stage checkpoint -----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["bytes", "rewritten"])
def test_tampered_stage_file_is_rejected_and_retrained(tmp_path, caplog, how):
    root = tmp_path / "run"
    first = fit(root, net=model("cnn6"))
    key = first.report.stages[0].stage_key
    path = root / "stages" / f"{key}.pt"
    if how == "bytes":  # one weight overwritten by 1e30 in the file's bytes
        payload = StageCache(str(root / "stages")).load(key)
        weight = next(v for k, v in payload["state"].items() if k.endswith("weight"))
        raw = bytearray(path.read_bytes())
        at = raw.index(weight.reshape(-1)[:4].numpy().tobytes())
        raw[at:at + 4] = struct.pack("<f", 1e30)
        path.write_bytes(bytes(raw))
    else:  # loaded, one weight set to 1e30, saved again as a plain torch file
        payload = StageCache(str(root / "stages")).load(key)
        name = next(k for k in payload["state"] if k.endswith("weight"))
        payload["state"][name].view(-1)[0] = 1e30
        torch.save(payload, path)
    with caplog.at_level(logging.WARNING):
        again = fit(root, net=model("cnn6"))
    assert "ignoring unreadable stage file" in caplog.text and str(path) in caplog.text
    assert [s.cached for s in again.report.stages] == [False, True]  # stage 2's key does not depend on the file
    same_weights(again.model, first.model)
    assert StageCache(str(root / "stages")).load(key) is not None  # written again, intact


def test_stage_file_with_non_finite_values_is_rejected(tmp_path, caplog):
    cache = StageCache(str(tmp_path))
    cache.save("a" * 32, {"state": {"w": torch.tensor([1.0, float("nan")])}})
    with caplog.at_level(logging.WARNING):
        assert cache.load("a" * 32) is None
    assert "non-finite" in caplog.text


# -- non-finite values ----------------------------------------------------------------------------------------

class Rows(Dataset):
    """A dataset read row by row (not a TensorDataset): fit cannot scan it up front."""

    def __init__(self, data) -> None:
        self.x, self.y, self.num_classes = data.x, data.y, data.num_classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def test_nan_pixel_in_memory_is_refused_before_training(tmp_path):
    train, val = task()
    train.x[17, 1, 3, 4] = float("nan")
    with pytest.raises(FitArgumentError, match=r"train: got 'non-finite inputs .*first in row 17'"):
        fit(tmp_path, train=train, val=val)
    assert stage_files(tmp_path) == [] and FeatureStore(tmp_path / "store").ls() == []


@pytest.mark.parametrize("method", ["partial", "total"])
def test_nan_input_stops_the_stage_naming_it_and_caches_nothing(tmp_path, method):
    train, val = task()
    train.x[117, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"stage 1(-3)?: non-finite loss at step \d+") as info:
        fit(tmp_path, train=Rows(train), val=val, method=method)
    assert info.value.stage in ("1", "1-3") and 1 <= info.value.step <= 4  # the epoch's batch holding row 117
    assert isinstance(info.value, TrainError)
    assert stage_files(tmp_path) == []  # neither the stage nor its progress
    assert FeatureStore(tmp_path / "store").ls() == []  # nor features


def test_divergence_in_a_later_stage_keeps_the_finished_stages_only(tmp_path, monkeypatch):
    real = Engine.step

    def step(self, x, y, rows):  # stage 2's third step produces an infinite loss
        out, loss, factor = real(self, x, y, rows)
        if self.stage == "2" and self._steps == 2:
            loss = loss * float("inf")
        self._steps = getattr(self, "_steps", 0) + 1
        return out, loss, factor

    monkeypatch.setattr(Engine, "_steps", 0, raising=False)
    monkeypatch.setattr(Engine, "step", step)
    with pytest.raises(NonFiniteError, match=r"stage 2: non-finite loss at step 3") as info:
        fit(tmp_path)
    assert info.value.step == 3
    assert len(stage_files(tmp_path)) == 1  # stage 1, finished before: nothing of stage 2
    assert len(FeatureStore(tmp_path / "store").ls()) == 2  # stage 1's features (train, val), nothing after


def test_non_finite_features_are_never_stored(tmp_path):
    store = FeatureStore(tmp_path)
    data = torch.utils.data.TensorDataset(torch.full((10, 3), 7e4), torch.zeros(10, dtype=torch.long))
    m = nn.Identity()
    with pytest.raises(StoreArgumentError, match="non-finite"):  # 7e4 is beyond float16's range
        store.build(store.key("fp", m, torch.float16), m, data, progress=False)
    assert store.ls() == [] and not glob.glob(str(tmp_path / "features" / "*.partial-*"))
    assert store.build(store.key("fp", m, torch.float32), m, data, progress=False).num_rows == 10


def test_a_diverging_search_draw_is_ranked_last_and_an_all_failing_search_stops():
    data = synthetic(n=60, num_classes=CLASSES, shape=(3, 4, 4))
    src = DatasetSource(data, 10)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    ok, wild = TrainConfig(optimizer="sgd", lr=0.05), TrainConfig(optimizer="sgd", lr=1e38)
    best, summary = run_search(Engine(net, ok, torch.device("cpu")), [wild, ok, wild], src, None, 1, halving=True,
                               eta=2)
    assert best.config == ok and all(torch.isfinite(p).all() for p in net.parameters())
    assert ["error" in s for s in summary] == [True, False, True] and "non-finite" in summary[0]["error"]
    with pytest.raises(NonFiniteError):
        run_search(Engine(net, ok, torch.device("cpu")), [wild, wild], src, None, 1, halving=False, eta=2)


def test_engine_reads_the_device_once_per_run(monkeypatch):
    """No host sync per step: the metrics and the guard are read in one .tolist() when run returns. (SGD here:
    torch's Adam reads its step counters with .item(), which live in host memory even for CUDA parameters.)"""
    data = synthetic(n=100, num_classes=CLASSES, shape=(3, 4, 4))
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    engine = Engine(net, TrainConfig(optimizer="sgd", lr=0.1), torch.device("cpu"))
    reads = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name: reads.append(_n) or _r(self, *a))
    stats = engine.run(DatasetSource(data, 10), None, Cursor())
    monkeypatch.undo()
    assert stats.seen == 100 and reads == ["tolist"], reads


# -- checkpoint and BatchNorm ------------------------------------------------------------------------------------

def test_checkpoint_counts_batchnorm_statistics_once_and_shares_totals_key(tmp_path):
    train, val = task(n=200, n_val=60)
    a = fit(tmp_path / "a", net=model("cnn1", batch_norm=True), train=train, val=val, method="total", epochs=2)
    b = fit(tmp_path / "b", net=model("cnn1", batch_norm=True), train=train, val=val, method="checkpoint", epochs=2)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    tracked = [k for k in sa if k.endswith("num_batches_tracked")]
    assert tracked and all(int(sa[k]) == int(sb[k]) == 2 * 4 for k in tracked)  # 2 epochs x 4 batches, once each
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)  # running means and variances too
    assert a.report.stages[0].stage_key == b.report.stages[0].stage_key
