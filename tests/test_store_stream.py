"""stream() and dataset(): every row once per epoch, seeded order, RAM plan, resident mode, DataLoader workers."""
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pystage.store import FeatureStore, StoreArgumentError
from pystage.store.stream import plan_stream

N = 1000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 1000-row entry of 16x16x16 float32 rows (16 KiB; 64 rows per 1 MiB chunk), 16 MiB in all."""
    root = tmp_path_factory.mktemp("stream")
    ds = TensorDataset(torch.randn(N, 16, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(N))
    store = FeatureStore(root, ram_budget="8MiB")  # half the entry: the streaming path
    m = nn.Identity()
    entry = store.build(store.key("fp", m, torch.float32), m, ds, batch_size=128, progress=False)
    return store, entry, ds.tensors[0]


def _epoch(entry, **kw):
    xs, ys = zip(*entry.stream(**kw))
    return torch.cat(xs), torch.cat(ys), [len(y) for y in ys]


def test_streaming_plan_respects_the_budget(built):
    store, entry, _ = built
    plan = plan_stream(entry._meta, store.config.ram_budget, batch_size=50)
    row = 16 * 16 * 16 * 4 + 8
    assert not plan.resident and 2 * plan.window_rows * row <= store.config.ram_budget // 2
    assert plan.block_rows % entry.chunk_rows == 0 and plan.window_rows % plan.block_rows == 0


def test_every_row_once_with_the_right_features(built):
    _, entry, x_ref = built
    x, y, sizes = _epoch(entry, batch_size=64, shuffle=True, seed=3)
    assert sorted(y.tolist()) == list(range(N)) and torch.equal(x, x_ref[y])
    assert sizes == [64] * (N // 64) + [N % 64]
    assert y.tolist() != list(range(N))  # shuffled


def test_same_seed_same_order_other_epoch_other_order(built):
    _, entry, _ = built
    a = _epoch(entry, batch_size=50, seed=7, epoch=2)[1]
    assert torch.equal(a, _epoch(entry, batch_size=50, seed=7, epoch=2)[1])
    assert not torch.equal(a, _epoch(entry, batch_size=50, seed=7, epoch=3)[1])
    assert not torch.equal(a, _epoch(entry, batch_size=50, seed=8, epoch=2)[1])


def test_shuffle_spreads_rows_beyond_one_block(built):
    _, entry, _ = built
    y = _epoch(entry, batch_size=100, seed=0)[1]
    first = y[:100]
    assert first.max() - first.min() > entry.chunk_rows  # a batch mixes rows of several blocks


def test_no_shuffle_is_store_order_and_drop_last(built):
    _, entry, x_ref = built
    x, y, sizes = _epoch(entry, batch_size=96, shuffle=False, drop_last=True)
    assert torch.equal(y, torch.arange(96 * (N // 96))) and torch.equal(x, x_ref[: len(y)])
    assert set(sizes) == {96}


def test_resident_when_the_entry_fits_the_budget(built):
    store, entry, x_ref = built
    big = FeatureStore(store.config.root, ram_budget="64MiB").open(entry.key)
    assert plan_stream(big._meta, big.ram_budget, 50).resident
    x, y, _ = _epoch(big, batch_size=50, seed=1)
    assert big.memory_device == torch.device("cpu") and torch.equal(x, x_ref[y]) and sorted(y.tolist()) == list(range(N))
    y2 = _epoch(big, batch_size=50, seed=1)[1]
    assert torch.equal(y, y2)


def test_stopping_early_stops_the_prefetch_thread(built):
    _, entry, _ = built
    def readers():
        return {t for t in threading.enumerate() if t.name.startswith("pystage-store-prefetch")}

    before = readers()
    it = entry.stream(batch_size=10)
    next(it)
    assert readers() - before  # the read threads run while the stream is open
    it.close()
    assert readers() == before


def test_dataloader_workers_cover_every_row_once(built):
    _, entry, x_ref = built
    ds = entry.dataset(batch_size=32, seed=5)
    ds.set_epoch(1)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    y = torch.cat([b[1] for b in batches])
    x = torch.cat([b[0] for b in batches])
    assert sorted(y.tolist()) == list(range(N)) and torch.equal(x, x_ref[y])
    again = torch.cat([b[1] for b in DataLoader(ds, batch_size=None, num_workers=2)])
    assert torch.equal(y, again)


def test_bad_stream_arguments(built):
    _, entry, _ = built
    for kw in ({"batch_size": 0}, {"seed": -1}, {"epoch": 1.5}):
        with pytest.raises(StoreArgumentError):
            next(entry.stream(**kw))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_to_cuda_gives_the_same_batches(built):
    _, entry, x_ref = built
    x, y, _ = _epoch(entry, batch_size=64, seed=2, device="cuda")
    assert x.is_cuda and y.is_cuda
    x_cpu, y_cpu, _ = _epoch(entry, batch_size=64, seed=2)
    assert torch.equal(x.cpu(), x_cpu) and torch.equal(y.cpu(), y_cpu)
