"""The one engine: pystage/train has one training loop and one data source per kind; the feed casts on the device;
sources of a split world cover the single-process batches."""
from __future__ import annotations

import ast
import pathlib

import torch
from torch import nn

import pystage.train
from pystage import FeatureStore
from pystage.data import synthetic
from pystage.train.engine import Cursor, Engine
from pystage.train.feed import Feed
from pystage.train.sources import DatasetSource, StoreSource, global_rows, steps_per_epoch

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
