"""The preadv streaming reader: permuted order, seeded, bit-identical to h5py, dtypes, window lifetime, faults."""
import os

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pystage.store.scatter as scatter
import pystage.store.window as window
from pystage.store import FeatureStore, StoreCorruptError
from pystage.store.layout import chunk_layout
from pystage.store.stream import plan_stream

N = 1000
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _build(root, dtype, shape=(16, 16, 16), n=N, budget="8MiB"):
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(n, *shape, generator=g), torch.arange(n))
    store = FeatureStore(root, ram_budget=budget)
    m = nn.Identity()
    return store, store.build(store.key("fp", m, dtype), m, ds, batch_size=128, progress=False)


@pytest.fixture(scope="module", params=list(DTYPES))
def entry(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp(request.param), DTYPES[request.param])[1]


def _h5(entry):
    with h5py.File(entry.path, "r") as f:
        return f["features"][()], f["labels"][()]


def _bits(x):
    return x.view(torch.int16).numpy().view(np.uint16) if x.dtype == torch.bfloat16 else x.numpy()


def _epoch(entry, **kw):
    xs, ys = zip(*entry.stream(**kw))
    return torch.cat(xs), torch.cat(ys), [len(y) for y in ys]


def test_streaming_is_a_permutation_bit_identical_to_h5py(entry):
    assert not plan_stream(entry._meta, entry.ram_budget, 50).resident  # larger than the budget: streamed
    x, y, sizes = _epoch(entry, batch_size=50, seed=4)
    hx, hy = _h5(entry)
    assert sorted(y.tolist()) == list(range(N)) and y.tolist() != list(range(N))
    assert sizes == [50] * (N // 50)
    assert np.array_equal(_bits(x), hx[y.numpy()]) and np.array_equal(y.numpy(), hy[y.numpy()])
    assert x.dtype == entry.dtype


def test_seeded_order_and_new_order_each_epoch(entry):
    a = _epoch(entry, batch_size=64, seed=9, epoch=1)[1]
    assert torch.equal(a, _epoch(entry, batch_size=64, seed=9, epoch=1)[1])
    assert not torch.equal(a, _epoch(entry, batch_size=64, seed=9, epoch=2)[1])


def test_resident_path_is_bit_identical(entry, tmp_path):
    big = FeatureStore(os.path.dirname(os.path.dirname(entry.path)), ram_budget="64MiB").open(entry.key)
    assert plan_stream(big._meta, big.ram_budget, 50).resident
    x, y, _ = _epoch(big, batch_size=50, seed=4)
    hx, _ = _h5(entry)
    assert big.memory_device == torch.device("cpu") and sorted(y.tolist()) == list(range(N))
    assert np.array_equal(_bits(x), hx[y.numpy()])


def test_unshuffled_stream_and_partial_last_batch(entry):
    x, y, sizes = _epoch(entry, batch_size=48, shuffle=False)
    assert torch.equal(y, torch.arange(N)) and np.array_equal(_bits(x), _h5(entry)[0])
    assert sizes[-1] == N % 48


def test_batches_are_views_of_one_window(entry):
    it = entry.stream(batch_size=16, seed=0)
    (a, _), (b, _) = next(it), next(it)
    assert b.data_ptr() == a.data_ptr() + a.nbytes  # consecutive slices of a window: no copy per batch
    it.close()


def test_a_kept_batch_is_never_overwritten(entry, monkeypatch):
    made = []
    real = window.Window.__init__

    def counting(self, *a, **k):
        made.append(1)
        real(self, *a, **k)

    monkeypatch.setattr(window.Window, "__init__", counting)
    entry.release_buffers()
    kept = list(entry.stream(batch_size=40, seed=2))  # every batch kept, none cloned
    hx, _ = _h5(entry)
    for x, y in kept:
        assert np.array_equal(_bits(x), hx[y.numpy()])
    assert len(made) > 2  # windows still referenced were not reused: new ones were made
    del kept, x, y
    made.clear()
    for _ in entry.stream(batch_size=40, seed=2, epoch=1):
        pass
    assert made == []  # a loop that drops its batches reuses the two kept windows


def test_check_on_read_finds_a_flipped_bit(tmp_path):
    store, entry = _build(tmp_path, torch.float32)
    with h5py.File(entry.path, "r") as f:
        offset = f["features"].id.get_chunk_info(3).byte_offset
    with open(entry.path, "r+b") as f:
        f.seek(offset + 123)
        b = f.read(1)
        f.seek(offset + 123)
        f.write(bytes([b[0] ^ 0x04]))
    for shuffle in (True, False):
        with pytest.raises(StoreCorruptError, match="chunk 3"):
            list(store.open(entry.key).stream(batch_size=50, shuffle=shuffle, check=True))
    assert len(list(store.open(entry.key).stream(batch_size=50, check=False))) == N // 50  # read as is


def test_check_on_read_passes_on_intact_data(entry):
    x, y, _ = _epoch(entry, batch_size=50, seed=1, check=True)
    assert np.array_equal(_bits(x), _h5(entry)[0][y.numpy()])


def test_small_rows_and_hdf5_fallback_give_the_same_batches(tmp_path, monkeypatch):
    store, entry = _build(tmp_path, torch.float32, shape=(16,), n=100000)  # 64-byte rows: read, then scattered
    assert not plan_stream(entry._meta, entry.ram_budget, 50).resident
    x, y, _ = _epoch(entry, batch_size=300, seed=3)
    hx, _ = _h5(entry)
    assert sorted(y.tolist()) == list(range(100000)) and np.array_equal(x.numpy(), hx[y.numpy()])
    monkeypatch.setattr(scatter, "chunk_layout", lambda d, cr: None)  # as if the layout were not plain
    x2, y2, _ = _epoch(store.open(entry.key), batch_size=300, seed=3)
    assert torch.equal(y, y2) and torch.equal(x, x2)


def test_short_reads_are_continued(entry, monkeypatch):
    real = os.preadv

    def short(fd, views, offset):  # the kernel may return less than asked: at most 5000 bytes here
        left, out = 5000, []
        for v in views:
            out.append(v[:min(left, v.nbytes)])
            left -= out[-1].nbytes
            if not left:
                break
        return real(fd, out, offset)

    monkeypatch.setattr(scatter.os, "preadv", short)
    x, y, _ = _epoch(entry, batch_size=50, seed=4)
    assert np.array_equal(_bits(x), _h5(entry)[0][y.numpy()])


def test_truncated_data_raises_with_the_path(tmp_path):
    store, entry = _build(tmp_path, torch.float16)
    opened = store.open(entry.key)  # metadata checked while the file was whole
    with open(entry.path, "r+b") as f:
        f.truncate(os.path.getsize(entry.path) // 2)
    with pytest.raises(StoreCorruptError, match=entry.path):
        list(opened.stream(batch_size=50, shuffle=False))


def test_chunk_layout_plain_contiguous_and_filtered(tmp_path):
    with h5py.File(tmp_path / "t.h5", "w") as f:
        a = np.arange(64 * 10, dtype="<f4").reshape(64, 10)
        f.create_dataset("chunked", data=a, chunks=(16, 10))
        f.create_dataset("contiguous", data=a)
        f.create_dataset("zipped", data=a, chunks=(16, 10), compression="gzip")
        f.create_dataset("big_endian", data=a.astype(">f4"), chunks=(16, 10))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        fd = os.open(tmp_path / "t.h5", os.O_RDONLY)
        try:
            for name in ("chunked", "contiguous"):
                lay = chunk_layout(f[name], 16)
                out = np.empty_like(a)
                for off, r0, r1 in lay.runs(5, 64):
                    os.preadv(fd, [memoryview(out[r0:r1].reshape(-1).view(np.uint8))], off)
                assert np.array_equal(out[5:], a[5:]), name
        finally:
            os.close(fd)
        assert chunk_layout(f["zipped"], 16) is None and chunk_layout(f["big_endian"], 16) is None


def test_dataloader_workers_bit_identical(entry):
    ds = entry.dataset(batch_size=32, seed=5)
    ds.set_epoch(3)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    y = torch.cat([b[1] for b in batches])
    x = torch.cat([b[0] for b in batches])
    assert sorted(y.tolist()) == list(range(N)) and np.array_equal(_bits(x), _h5(entry)[0][y.numpy()])


def test_order_is_the_documented_one(entry):
    """Blocks permuted by rng (seed, epoch, 0), grouped into windows, rows of each window permuted by rng
    (seed, epoch, 1) in window order; batches are consecutive runs (the order the reader had before preadv)."""
    from pystage.store.stream import StreamOptions, _blocks, _windows

    meta, bsz = entry._meta, 48
    plan = plan_stream(meta, entry.ram_budget, bsz)
    blocks = _blocks(meta, plan, StreamOptions(batch_size=bsz, seed=6, epoch=2), np.random.default_rng((6, 2, 0)))
    rng = np.random.default_rng((6, 2, 1))
    parts = []
    for group in _windows(blocks, plan.window_rows):
        rows = np.concatenate([np.arange(a, b) for a, b in group])
        parts.append(rows[rng.permutation(len(rows))])
    y = _epoch(entry, batch_size=bsz, seed=6, epoch=2)[1]
    assert np.array_equal(y.numpy(), np.concatenate(parts))
