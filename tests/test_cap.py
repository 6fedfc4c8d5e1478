"""pystage.memory.cap: the CUDA caching allocator capped to a stage's budget, and the per-stage figures."""
from __future__ import annotations

import types

import pytest
import torch

import pystage
from pystage.memory.cap import StageCap

HAS_GPU = torch.cuda.is_available()
MiB = 1 << 20


def test_cap_on_cpu_only_reports_the_plan():
    plan = types.SimpleNamespace(budget=64 * MiB, stages=[types.SimpleNamespace(peak=40 * MiB)])
    with StageCap.for_stage("cpu", plan, 0) as cap:
        x = torch.ones(1 << 20)
    assert cap.limit is None and cap.reserved_mib is None and cap.used_mib is None and cap.planned_mib == 40.0
    assert StageCap.for_stage("cpu", None, 0).planned_mib is None
    assert StageCap.for_stage("cpu", plan, 3).planned_mib is None and x.numel() == 1 << 20
    with pytest.raises(ValueError):
        StageCap("cpu", 0)


def test_fit_under_a_budget_reports_the_planned_peak_per_stage(tmp_path):
    train, val = pystage.data.synthetic(n=60, seed=0), pystage.data.synthetic(n=20, seed=0, split="val")
    torch.manual_seed(0)
    model = pystage.models.get("plain-24-16")
    result = pystage.fit(model, train, val, method="partial", batch_size=20, memory_budget="13MiB", device="cpu",
                         store=pystage.FeatureStore(str(tmp_path / "store")), checkpoint_dir=str(tmp_path / "stages"),
                         progress=False)
    rep = result.report
    assert len(rep.stages) == len(rep.plan.stages) >= 2
    for s, planned in zip(rep.stages, rep.plan.stages):
        assert s.planned_mib == planned.peak / MiB and s.reserved_mib is None and s.used_mib is None  # no CUDA
    assert "planned_mib" in str(rep) and "reserved_mib" not in str(rep)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_cap_turns_an_overrun_into_out_of_memory_and_restores_the_fraction():
    dev = torch.device("cuda")
    before = torch.cuda.get_per_process_memory_fraction(dev)
    with StageCap(dev, 64 * MiB) as cap:
        ok = torch.empty(32 * MiB, dtype=torch.uint8, device=dev)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(64 * MiB, dtype=torch.uint8, device=dev)
        del ok
    assert torch.cuda.get_per_process_memory_fraction(dev) == before
    assert cap.limit is not None and cap.reserved_mib is not None and 32 <= cap.used_mib <= 64
    torch.empty(128 * MiB, dtype=torch.uint8, device=dev)  # no cap any more


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
def test_fit_on_cuda_keeps_every_stage_within_the_budget(tmp_path):
    train, val = pystage.data.synthetic(n=256, seed=0), pystage.data.synthetic(n=64, seed=0, split="val")
    torch.manual_seed(0)
    model = pystage.models.get("plain-60-64")
    budget = 140 * MiB
    need = pystage.plan(model, (3, 32, 32), 64, "64GiB", device="cuda").total_predicted_bytes
    assert need >= 4 * budget  # a net that needs 4x the budget end to end
    result = pystage.fit(model, train, val, method="partial", batch_size=64, memory_budget=budget, device="cuda",
                         store=pystage.FeatureStore(str(tmp_path / "store")), checkpoint_dir=str(tmp_path / "stages"),
                         progress=False)
    assert len(result.report.stages) >= 4
    for s in result.report.stages:
        assert s.planned_mib is not None and s.planned_mib <= budget / MiB
        assert s.used_mib is not None and s.used_mib <= budget / MiB, s  # the stage's max_memory_allocated
        assert s.reserved_mib is not None
