"""build(): one forward pass, exact values, chunked HDF5 layout, metadata, sharding, chaining, argument checks."""
import os

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pystage.store import (FeatureStore, StoreArgumentError, StoreKeyMismatchError, StoreNotFoundError,
                           dataset_fingerprint)
from pystage.store.format import CHUNK_BYTES


class Counting(nn.Module):
    """A conv stage that counts its forward calls and records whether it ran in eval mode without grad."""

    def __init__(self, c_in=3, c_out=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)
        self.calls, self.modes = 0, set()

    def forward(self, x):  # (B, C, H, W) -> (B, c_out, H, W)
        self.calls += 1
        self.modes.add((self.training, torch.is_grad_enabled()))
        return torch.relu(self.bn(self.conv(x)))


def _data(n=300):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n))


def _stream_all(entry, **kw):
    xs, ys = zip(*entry.stream(shuffle=False, **kw))
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture
def store(tmp_path):
    return FeatureStore(tmp_path / "root", ram_budget="64KiB")


def test_build_is_one_forward_pass_in_eval_no_grad_and_idempotent(store):
    ds, m = _data(), Counting()
    m.train()
    key = store.key(dataset_fingerprint(ds), m, dtype=torch.float32)
    entry = store.build(key, m, ds, batch_size=64, progress=False)
    assert m.calls == 5 == -(-300 // 64)  # one pass, not more
    assert m.modes == {(False, False)} and m.training  # ran in eval/no-grad; the caller's mode is restored
    again = store.build(key, m, ds, batch_size=64, progress=False)
    assert m.calls == 5 and again.path == entry.path and store.has(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stored_values_match_the_module(store, dtype):
    ds, m = _data(), Counting()
    entry = store.build(store.key("fp", m, dtype=dtype), m, ds, batch_size=50, progress=False)
    m.eval()
    with torch.no_grad():
        ref = m(ds.tensors[0]).to(dtype)  # (N, 4, 8, 8)
    x, y = _stream_all(entry, batch_size=64)
    assert entry.dtype == dtype == x.dtype and entry.feature_shape == (4, 8, 8) and entry.num_rows == 300
    assert torch.equal(x, ref) and torch.equal(y, ds.tensors[1])
    with h5py.File(entry.path, "r") as f:  # bfloat16 is stored as its raw uint16 bits, and says so
        expected = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[dtype]
        assert f["features"].dtype == expected
        assert bool(f.attrs["bfloat16_as_uint16"]) == (dtype == torch.bfloat16)


def test_layout_chunks_whole_rows_and_metadata(store):
    ds, m = _data(), Counting()
    key = store.key("fp", m, dtype=torch.float32, split="val", transforms="none")
    entry = store.build(key, m, ds, batch_size=64, progress=False)
    row_bytes = 4 * 8 * 8 * 4
    with h5py.File(entry.path, "r") as f:
        chunks = f["features"].chunks
        assert chunks[1:] == (4, 8, 8) and chunks[0] * row_bytes <= CHUNK_BYTES
        assert f["labels"].shape == (300,) and f["checksums"].shape == (-(-300 // chunks[0]), 2)
    meta = entry.meta
    assert meta["key"] == key and meta["num_rows"] == 300 and meta["format_version"] == 1
    assert meta["split"] == "val" and meta["transforms"] == "none" and meta["upstream"] == "fp"
    assert meta["forward_calls"] == 5 and meta["checksum"] == "crc32" and meta["complete"] is True
    assert entry.nbytes == 300 * (row_bytes + 8)
    assert not [n for n in os.listdir(store.directory) if ".partial-" in n]


def test_big_rows_get_large_chunks(tmp_path):
    store = FeatureStore(tmp_path)
    ds = TensorDataset(torch.randn(40, 64, 32, 32), torch.arange(40))  # 256 KiB rows (float32)
    entry = store.build(store.key("fp", nn.Identity(), torch.float32), nn.Identity(), ds, batch_size=16, progress=False)
    assert entry.chunk_rows == 4  # 1 MiB chunks of whole rows
    assert torch.equal(_stream_all(entry)[0], ds.tensors[0])


def test_stage_two_reads_stage_one_entry(store):
    ds, m1 = _data(), Counting()
    e1 = store.build(store.key(dataset_fingerprint(ds), m1, torch.float32), m1, ds, batch_size=64, progress=False)
    m2 = Counting(4, 2)
    k2 = store.key(e1.key, m2, torch.float16)
    e2 = store.build(k2, m2, e1, batch_size=100, progress=False)
    assert m2.calls == 3
    m1.eval(), m2.eval()
    with torch.no_grad():
        ref = m2(m1(ds.tensors[0])).half()
    x, y = _stream_all(e2)
    assert torch.allclose(x.float(), ref.float(), atol=1e-3) and torch.equal(y, ds.tensors[1])
    with pytest.raises(StoreKeyMismatchError, match="upstream"):
        store.build(store.key("other", m2, torch.float16), m2, e1, progress=False)


def test_dataloader_input_and_contiguous_shards(store):
    ds, m = _data(), Counting()
    parts = []
    for i in range(3):
        key = store.key("fp", m, torch.float32, shard=(i, 3))
        e = store.build(key, m, DataLoader(ds, batch_size=32), progress=False)
        assert e.meta["shard"] == [i, 3] and list(e.meta["row_range"]) == [i * 100, (i + 1) * 100]
        parts.append(_stream_all(e)[1])
    assert torch.equal(torch.cat(parts), ds.tensors[1])  # contiguous ranges, in order, covering every row once
    with pytest.raises(StoreKeyMismatchError, match="shard"):
        store.build(store.key("fp", m, torch.float32, shard=(0, 3)), m, ds, shard=(1, 3), progress=False)


def test_build_refuses_a_module_or_dtype_the_key_was_not_made_for(store):
    ds, m = _data(), Counting()
    key = store.key("fp", m, torch.float16)
    with torch.no_grad():
        m.conv.weight[0, 0, 0, 0] += 1.0  # stale key: must not be served or built under the old key
    with pytest.raises(StoreKeyMismatchError, match="module"):
        store.build(key, m, ds, progress=False)
    with pytest.raises(StoreKeyMismatchError, match="storage_dtype"):
        store.build(store.key("fp", m, torch.float16), m, ds, storage_dtype=torch.float32, progress=False)
    assert not store.has(key)


@pytest.mark.parametrize("case", ["not pairs", "tuple output", "empty", "bad data", "batch size"])
def test_bad_input_raises_and_leaves_no_file(store, case):
    m = Counting()
    data = {"not pairs": TensorDataset(torch.randn(10, 3, 8, 8)), "empty": TensorDataset(torch.empty(0, 3, 8, 8),
            torch.empty(0)), "bad data": [1, 2, 3]}.get(case, _data(10))
    module = nn.Sequential(m, nn.Flatten()) if case != "tuple output" else _TupleOut()
    with pytest.raises(StoreArgumentError):
        store.build(store.key("fp", module), module, data, batch_size=0 if case == "batch size" else 4, progress=False)
    assert os.listdir(store.directory) in ([], [".locks"])


class _TupleOut(nn.Module):
    def forward(self, x):
        return x, x


def test_open_missing_key_names_the_path(store):
    key = store.key("fp", Counting())
    with pytest.raises(StoreNotFoundError, match=str(key)) as err:
        store.open(key)
    assert err.value.path.endswith(f"{key}.h5")
    with pytest.raises(StoreArgumentError, match="key"):
        store.open("../../etc/passwd")
