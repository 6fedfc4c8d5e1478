"""fit under a memory budget: a stage that runs out of memory anyway is re-planned, finished stages are kept."""
import pytest
import torch

import pystage
from pystage.train.engine import Engine


def _data():
    return pystage.data.synthetic(n=120, seed=0), pystage.data.synthetic(n=40, seed=0, split="val")


def _oom_once(monkeypatch, when):
    """Make Engine.run raise torch.OutOfMemoryError the first time ``when(net)`` holds for the module it trains
    (a stand-in for CUDA OOM)."""
    real, fired = Engine.run, []

    def run(self, *args, **kw):
        if not fired and when(self.module):
            fired.append(True)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args, **kw)

    monkeypatch.setattr(Engine, "run", run)
    return fired


def test_oom_in_a_stage_replans_the_rest_and_keeps_finished_stages(tmp_path, monkeypatch, caplog):
    train, val = _data()
    torch.manual_seed(0)
    model = pystage.models.get("plain-24-16")
    budget = "13MiB"  # at batch 20: two stages (split at layer 8); the second re-plans into two more
    first = pystage.plan(model, (3, 32, 32), 20, budget, dataset_rows=len(train))
    last_start = first.stages[-1].start
    assert len(first.stages) >= 2
    fired = _oom_once(monkeypatch, lambda net: len(net[0]) == len(model) - last_start)  # the last stage's body
    result = pystage.fit(model, train, val, method="partial", batch_size=20, memory_budget=budget,
                         store=pystage.FeatureStore(str(tmp_path / "store")), checkpoint_dir=str(tmp_path / "stages"),
                         progress=False)
    rep = result.report
    assert fired and rep.replans == 1
    assert "ran out of memory" in caplog.text
    # the stages before the failed one were not trained again, the failed one's layers were split further
    n_before = len(first.stages) - 1
    assert [s.cached for s in rep.stages[:n_before]] == [True] * n_before
    assert len(rep.stages) > len(first.stages)
    assert rep.plan.split_points[: len(first.split_points)] == first.split_points
    assert all(p <= last_start for p in first.split_points)
    new = rep.plan.stages[n_before:]
    assert new[0].start == last_start and new[-1].stop == len(model)
    assert all(s.peak <= 0.8 * first.stages[-1].peak for s in new)
    assert result.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_oom_without_a_budget_is_not_caught(tmp_path, monkeypatch):
    train, val = _data()
    _oom_once(monkeypatch, lambda net: True)
    with pytest.raises(torch.OutOfMemoryError):
        pystage.fit(pystage.models.get("cnn2", width=8), train, val, method="partial",
                    store=pystage.FeatureStore(str(tmp_path / "s")), checkpoint_dir=str(tmp_path / "c"),
                    progress=False)
