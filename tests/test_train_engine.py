"""The one engine: pystage/train has one training loop and one data source per kind; the feed casts on the device;
sources of a split world cover the single-process batches."""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
from torch import nn

import pystage.train
from pystage import FeatureStore
from pystage.data import synthetic
from pystage.train.engine import Cursor, Engine
from pystage.train.feed import Feed
from pystage.train.sources import DatasetSource, StoreSource, data_device, global_rows, steps_per_epoch

TRAIN = pathlib.Path(pystage.train.__file__).parent
PACKAGE = TRAIN.parent


def _calls(path: pathlib.Path, attr: str) -> int:
    tree = ast.parse(path.read_text())
    return sum(1 for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Attribute, ast.Name))
               and (n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id) == attr)


def test_pystage_train_has_one_loop():
    """backward, optimizer steps and optimizer construction happen in engine.py only; batch sources live in
    sources.py only (no copied loop or source in the search, the growth methods or distributed.py). The one
    other step: population.py's, every search draw at once on stacked tensors (gradients by autograd.grad)."""
    files = sorted(TRAIN.glob("*.py")) + [PACKAGE / "distributed.py", PACKAGE / "staged.py"]
    for attr in ("backward", "zero_grad", "make_optimizer"):
        where = {p.name: _calls(p, attr) for p in files if _calls(p, attr)}
        assert set(where) == {"engine.py"}, (attr, where)
    # optimizer steps, and the engine's own; the population's stacked step
    assert {p.name for p in files if _calls(p, "step")} == {"engine.py", "population.py"}
    classes = {p.name: [n.name for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)
                        and n.name.endswith("Source")] for p in files}
    assert {k: v for k, v in classes.items() if v} == {
        "sources.py": ["BatchSource", "DatasetSource", "StoreSource", "PrefixSource"]}
    assert not (TRAIN / "loop.py").exists() and not (TRAIN / "sharded.py").exists()


def test_feed_casts_stored_half_precision_after_the_move():
    feed = Feed(torch.device("cpu"), torch.float32)
    x, y = feed(torch.ones(2, 3, dtype=torch.float16), torch.tensor([0, 1]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    x, _ = Feed(torch.device("cpu"), torch.float64)(torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor([0, 1]))
    assert x.dtype == torch.float64
    ints, _ = feed(torch.ones(2, dtype=torch.int64), torch.tensor([0, 1]))
    assert ints.dtype == torch.int64  # only floating inputs are cast


def test_engine_trains_on_float16_and_float64_stored_features(tmp_path):
    data = synthetic(n=120, num_classes=3, shape=(3, 4, 4))
    store = FeatureStore(tmp_path)
    for dtype in (torch.float16, torch.float64):
        m = nn.Identity()
        entry = store.build(store.key("fp", m, dtype), m, data, progress=False)
        src = StoreSource(entry, 32)
        assert next(iter(src.batches(0)))[0].dtype == dtype  # served as stored
        net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        stats = Engine(net, pystage.TrainConfig(), torch.device("cpu")).run(src, None, Cursor())
        assert stats.seen == 120 and 0 <= stats.accuracy <= 1


def test_split_sources_cover_the_single_process_batches():
    data = synthetic(n=23, num_classes=3, shape=(3, 2, 2))
    one = DatasetSource(data, 10, seed=4)
    parts = [DatasetSource(data, 10, seed=4, part=(r, 3)) for r in range(3)]
    assert steps_per_epoch(one) == 3 and [global_rows(one, i) for i in range(3)] == [10, 10, 3]
    for epoch in (0, 1):
        whole = list(one.batches(epoch))
        split = [list(p.batches(epoch)) for p in parts]
        assert all(len(s) == 3 for s in split)  # every rank steps through every global batch
        for i, (x, y) in enumerate(whole):
            assert torch.equal(torch.cat([s[i][1] for s in split]), y)
            assert torch.equal(torch.cat([s[i][0] for s in split]), x)


# -- the lean loop: batches fed one ahead, prefetched by a thread where the host works per batch -------------------

class _Rows(torch.utils.data.Dataset):
    """Rows read one by one (no ``.tensors``): a source with host work per batch."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def _threads() -> set:
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("pystage-prefetch")}


def test_feed_batches_are_the_source_batches_in_order_threaded_or_not():
    data = synthetic(n=47, num_classes=3, shape=(3, 2, 2))
    feed = Feed(torch.device("cpu"), torch.float64)
    want = list(DatasetSource(data, 10, seed=1).batches(0))
    for threaded in (False, True):
        got = list(feed.batches(DatasetSource(_Rows(data), 10, seed=1).batches(0), threaded=threaded))
        assert len(got) == len(want) == 5
        for (gx, gy), (wx, wy) in zip(got, want):
            assert gx.dtype == torch.float64 and torch.equal(gx, wx.double()) and torch.equal(gy, wy)
    assert list(feed.batches(iter([]))) == []


def test_a_stopped_threaded_feed_stops_its_thread_and_errors_reach_the_consumer():
    data = synthetic(n=200, num_classes=3, shape=(3, 2, 2))
    before = _threads()
    it = Feed(torch.device("cpu")).batches(DatasetSource(_Rows(data), 10).batches(0), threaded=True)
    next(it)
    assert _threads() - before
    it.close()
    assert _threads() == before

    def broken():
        yield torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(Feed(torch.device("cpu")).batches(broken(), threaded=True))
    assert _threads() == before


def test_row_by_row_sources_are_prefetched_and_train_the_same():
    data = synthetic(n=90, num_classes=3, shape=(3, 4, 4))
    rows, tensors = DatasetSource(_Rows(data), 20, seed=2), DatasetSource(data, 20, seed=2)
    assert rows.prefetch and not tensors.prefetch
    nets = []
    for src in (rows, tensors):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
        cursor = Cursor()
        engine = Engine(net, pystage.TrainConfig(), torch.device("cpu"))
        stats = engine.run(src, 3, cursor)  # stops mid-epoch: the read-ahead batch is dropped, not counted
        assert cursor.batch == 3 and stats.seen == 60
        engine.run(src, None, cursor)
        assert cursor.epoch == 1 and cursor.batch == 0
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)


def test_a_dataset_source_on_a_device_gives_the_same_batches():
    data = synthetic(n=33, num_classes=3, shape=(3, 2, 2))
    assert data_device(torch.device("cpu"), None, data) is None  # on the CPU the data is where it is
    on = DatasetSource(data, 8, seed=5, device=torch.device("cpu"))  # the CPU standing in for the device
    for (a, ya), (b, yb) in zip(on.batches(1), DatasetSource(data, 8, seed=5).batches(1)):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_compile_mode_is_checked_and_compiles_the_stage_step(tmp_path, monkeypatch):
    import pystage.train.engine as engine_mod
    from pystage.train import FitArgumentError

    train, val = synthetic(n=60, num_classes=3, shape=(3, 8, 8)), synthetic(n=20, num_classes=3, shape=(3, 8, 8))
    with pytest.raises(FitArgumentError, match="compile_mode"):
        pystage.fit(pystage.models.get("cnn2", num_classes=3, width=4), train, val, compile_mode="fast")
    seen, real = [], torch.compile

    def eager_compile(net, mode, dynamic):  # dynamo traces; the eager backend keeps the test free of a C++ build
        seen.append((mode, dynamic))
        return real(net, backend="eager", dynamic=dynamic)

    monkeypatch.setattr(engine_mod.torch, "compile", eager_compile)
    results = []
    for mode in (None, "default"):
        torch.manual_seed(0)
        net = pystage.models.get("cnn2", num_classes=3, width=4)
        results.append(pystage.fit(net, train, val, method="total", compile_mode=mode, progress=False,
                                   checkpoint_dir=tmp_path / str(mode), device="cpu"))
    assert seen == [("default", False)]
    for a, b in zip(results[0].model.parameters(), results[1].model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_the_measured_step_of_a_compiled_net_runs_its_original_module():
    """A compiled graph (a CUDA graph replay under "reduce-overhead") would hide its ops from the live-tensor
    accounting; the measured step runs the same parameters eagerly. (torch 2.13's dynamo also runs a frame eagerly
    while a dispatch mode is active; the engine does not rely on that.)"""
    runs = []

    def counting(gm, example_inputs):  # a torch.compile backend that counts the compiled graph's runs
        def run(*args):
            runs.append(1)
            return gm.forward(*args)
        return run

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    engine = Engine(torch.compile(net, backend=counting, dynamic=False), pystage.TrainConfig(), torch.device("cpu"))
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,))
    engine.step(x, y, 10)
    assert runs, "the compiled graph ran for a plain step"
    before = len(runs)
    _, _, _, peak = engine.measured_step(x, y, 10)
    assert len(runs) == before and peak > sum(p.numel() * 4 for p in net.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_epoch_on_cuda_never_waits_for_the_device(tmp_path):
    """Inside ``run`` nothing synchronizes (CUDA's sync debug mode raises on a sync); ``_close`` reads once."""
    data = synthetic(n=200, num_classes=3, shape=(3, 8, 8))
    dev = torch.device("cuda")
    for src in (DatasetSource(data, 20, device=dev), DatasetSource(data, 20)):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)).to(dev)
        engine = Engine(net, pystage.TrainConfig(), dev)
        engine.run(src, 2, Cursor())  # warm-up: allocator, optimizer state
        close = engine._close

        def relaxed(*a, **kw):
            torch.cuda.set_sync_debug_mode(0)
            return close(*a, **kw)

        engine._close = relaxed
        torch.cuda.set_sync_debug_mode("error")
        try:
            stats = engine.run(src, None, Cursor())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert stats.seen == 200


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feed_to_cuda_copies_each_batch_before_its_source_buffer_is_reused():
    dev = torch.device("cuda")
    want = [torch.full((4, 3), float(i)) for i in range(7)]

    def reused():  # one host buffer, overwritten for every batch (as a loader's ring of buffers is)
        buf = torch.empty(4, 3)
        for w in want:
            buf.copy_(w)
            yield buf, torch.zeros(4, dtype=torch.long)

    got = [x.cpu() for x, _ in Feed(dev, torch.float64, slots=2).batches(reused())]
    assert [g.dtype for g in got] == [torch.float64] * 7
    assert all(torch.equal(g, w.double()) for g, w in zip(got, want))
    data = synthetic(n=33, num_classes=3, shape=(3, 2, 2))
    assert data_device(dev, FeatureStore(device_budget="1GiB"), data, data) == dev
    assert data_device(dev, FeatureStore(device_budget="1KiB"), data) is None  # 33 rows of 12 floats: 1.8 KiB
    assert data_device(dev, None, _Rows(data)) is None
    for (a, ya), (b, yb) in zip(DatasetSource(data, 8, seed=5, device=dev).batches(1),
                                DatasetSource(data, 8, seed=5).batches(1)):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b) and torch.equal(ya.cpu(), yb)
