"""Integrity by default: streams, resident loads, builds from an entry and sharded reads verify every chunk's CRC;
the content digest describes what a verified read serves; non-finite features are refused."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pystage.store import FeatureStore, StoreArgumentError, StoreCorruptError
from pystage.store.shards import ShardSet
from pystage.store.stream import plan_stream

N = 600


def _data(n: int = N, width: int = 1024) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, width, generator=g), torch.arange(n))


def _flip(path: str, chunk: int) -> None:
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 11)
        b = f.read(1)
        f.seek(offset + 11)
        f.write(bytes([b[0] ^ 0x01]))


def _entry(root, budget: str, n: int = N, shard=None):
    store, m = FeatureStore(root, ram_budget=budget), nn.Identity()
    return store, store.build(store.key("fp", m, torch.float32, shard=shard), m, _data(n), shard=shard, progress=False)


@pytest.mark.parametrize("budget", ["64MiB", "1MiB"])  # resident, and windows of blocks
def test_stream_verifies_by_default(tmp_path, budget):
    store, entry = _entry(tmp_path, budget)
    assert plan_stream(entry._meta, entry.ram_budget, 50).resident == (budget == "64MiB")
    assert len(list(entry.stream(batch_size=50))) == N // 50  # intact: no complaint
    _flip(entry.path, 1)
    with pytest.raises(StoreCorruptError, match="chunk 1"):
        list(store.open(entry.key).stream(batch_size=50))


def test_a_resident_entry_is_verified_once_when_loaded(tmp_path):
    store, entry = _entry(tmp_path, "64MiB")
    list(entry.stream())  # loaded and verified
    _flip(entry.path, 0)
    assert len(list(entry.stream(epoch=1))) == N // 50  # served from the verified copy in RAM
    with pytest.raises(StoreCorruptError):
        list(store.open(entry.key).stream())  # a fresh open reads the file again


def test_building_from_a_corrupt_entry_raises_naming_it(tmp_path):
    store, entry = _entry(tmp_path, "1MiB")
    _flip(entry.path, 2)
    m = nn.Linear(1024, 8)
    with pytest.raises(StoreCorruptError, match=entry.path):
        store.build(store.key(entry.content_digest, m, torch.float32), m, store.open(entry.key), progress=False)


def test_content_digest_follows_the_bytes_not_the_key(tmp_path):
    _, a = _entry(tmp_path / "a", "64MiB")
    _, b = _entry(tmp_path / "b", "64MiB")
    assert a.key == b.key and a.content_digest == b.content_digest and len(a.content_digest) == 32
    store, m = FeatureStore(tmp_path / "c"), nn.Identity()
    data = _data()
    data.tensors[0][5, 0] += 1.0
    c = store.build(store.key("fp", m, torch.float32), m, data, progress=False)  # same key, other bytes
    assert c.key == a.key and c.content_digest != a.content_digest
    m2 = nn.Identity()
    k2 = store.key(c.content_digest, m2, torch.float32)
    assert store.build(k2, m2, c, progress=False).num_rows == N  # an entry may be keyed by its upstream's content


def test_sharded_reads_verify_the_chunks_they_touch(tmp_path):
    store, m = FeatureStore(tmp_path, ram_budget="64KiB"), nn.Identity()  # far below the shards: chunk reads
    shards = [store.build(store.key("fp", m, torch.float32, shard=(i, 2)), m, _data(), progress=False)
              for i in range(2)]
    sset = ShardSet(shards, store.config.ram_budget)
    x, y = sset.rows(np.array([599, 0, 300, 17]))
    assert y.tolist() == [599, 0, 300, 17] and torch.equal(x[1], _data().tensors[0][0])
    _flip(shards[1].path, 0)
    with pytest.raises(StoreCorruptError, match="chunk 0"):
        ShardSet(shards, store.config.ram_budget).rows(np.array([310]))
    assert ShardSet(shards, store.config.ram_budget).rows(np.array([5]))[1].tolist() == [5]  # shard 0 is intact


def test_non_finite_features_are_refused(tmp_path):
    store, m = FeatureStore(tmp_path), nn.Identity()
    data = TensorDataset(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.tensor([0, 1]))
    with pytest.raises(StoreArgumentError, match="non-finite"):
        store.build(store.key("fp", m, torch.float32), m, data, progress=False)
    assert store.ls() == []
