"""Stage training on torch.distributed (gloo, 2 CPU processes on 127.0.0.1): same result as one process, shards
built once and never mixed across world sizes, a killed build leaves no visible shard."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import pystage
from pystage.store import FeatureStore
from pystage.store.order import epoch_order
from pystage.store.shards import ShardSet, StoreShardError, read_manifest, write_manifest
from pystage.train.sources import rank_parts

FIT = dict(method="partial", epochs=2, batch_size=50, seed=0, progress=False, store_dtype=torch.float32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    return pystage.data.synthetic(n=200, seed=0, split="train"), pystage.data.synthetic(n=100, seed=0, split="val")


def _fit(root: str):
    torch.manual_seed(0)
    train, val = _data()
    model = pystage.models.get("cnn2", width=8)
    return pystage.fit(model, train, val, store=FeatureStore(root), checkpoint_dir=os.path.join(root, "stages"), **FIT)


def _rank(rank: int, size: int, port: int, root: str, out: str) -> None:
    """One rank: fit (from torchrun-style environment variables), then fit again after planting a foreign manifest."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    first = _fit(root)
    files = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "features", "*.h5"))}
    from pystage import distributed

    if rank == 0:  # a manifest left by a run with another world size
        for p in glob.glob(os.path.join(root, "features", "*.shards.json")):
            body = json.load(open(p))
            json.dump({**body, "world_size": 3}, open(p, "w"))
    distributed.barrier()
    second = _fit(root)
    if rank == 0:
        torch.save({"state": first.model.state_dict(), "report": first.report.to_dict(),
                    "second": second.report.to_dict(), "files": files,
                    "files_after": {p: os.stat(p).st_mtime_ns for p in files}}, out)
    torch.distributed.destroy_process_group()


def test_two_ranks_train_like_one_process(tmp_path):
    single = _fit(str(tmp_path / "one"))
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path / "two"), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    ref = single.model.state_dict()
    assert got["state"].keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    for a, b in zip(got["report"]["stages"], single.report.to_dict()["stages"]):
        assert a["train_acc"] == pytest.approx(b["train_acc"]) and a["val_acc"] == pytest.approx(b["val_acc"])
    # each rank built its shard of each split once: 2 shards x (train, val), never rebuilt by the second run
    metas = [pystage.FeatureStore(str(tmp_path / "two")).open(os.path.basename(p)[:-3]).meta for p in got["files"]]
    assert sorted((m["split"], tuple(m["shard"])) for m in metas) == [
        ("train", (0, 2)), ("train", (1, 2)), ("val", (0, 2)), ("val", (1, 2))]
    assert all(m["forward_calls"] >= 1 for m in metas)
    assert got["files_after"] == got["files"]
    # the restart resumed from the finished stage checkpoints, and replaced the foreign (world size 3) manifests
    assert all(s["cached"] for s in got["second"]["stages"])
    for p in glob.glob(str(tmp_path / "two" / "features" / "*.shards.json")):
        assert json.load(open(p))["world_size"] == 2


def _indexed(n: int, width: int) -> TensorDataset:
    """Rows whose features are their own index (in every column), so a served row says which row it is."""
    return TensorDataset(torch.arange(n, dtype=torch.float32)[:, None].expand(n, width).contiguous(), torch.arange(n))


@pytest.mark.parametrize("budget", ["64MiB", "2MiB"])  # resident, and windows of blocks
def test_epoch_order_is_the_stream_order(tmp_path, budget):
    store, m = FeatureStore(tmp_path, ram_budget=budget), nn.Identity()
    entry = store.build(store.key("fp", m, torch.float32), m, _indexed(3000, 1024), progress=False)
    for epoch in (0, 1):
        served = torch.cat([y for _, y in entry.stream(batch_size=50, seed=3, epoch=epoch)]).numpy()
        order = epoch_order(entry._meta, store.config.ram_budget, 50, True, 3, epoch)
        assert (served == order).all()


def test_rank_parts_cover_each_global_batch_in_order():
    order = torch.arange(23)
    parts = [list(rank_parts(order, 10, r, 2)) for r in range(2)]
    joined = [torch.cat([a, b]) for a, b in zip(*parts)]
    assert [j.tolist() for j in joined] == [list(range(0, 10)), list(range(10, 20)), [20, 21, 22]]
    assert [len(p) for p in parts[0]] == [5, 5, 1]


def test_shards_of_another_world_size_are_detected(tmp_path):
    store, m = FeatureStore(tmp_path), nn.Identity()
    data = _indexed(90, 8)
    three = [store.build(store.key("fp", m, torch.float32, shard=(i, 3)), m, data, progress=False) for i in range(3)]
    with pytest.raises(StoreShardError, match="shard"):
        ShardSet(three[:2], store.config.ram_budget)  # shards 0 and 1 of 3 offered as a world of 2
    x, y = ShardSet(three, store.config.ram_budget).rows(torch.tensor([89, 0, 45]).numpy())
    assert y.tolist() == [89, 0, 45] and x[:, 0].tolist() == [89.0, 0.0, 45.0]
    write_manifest(store.directory, "a" * 32, three, [30, 30, 30])
    assert read_manifest(store.directory, "a" * 32, 3)["num_rows"] == 90
    with pytest.raises(StoreShardError, match="world_size"):
        read_manifest(store.directory, "a" * 32, 2)


class _Stall(nn.Module):
    """Identity that signals after its first batch and then stalls, so the build can be killed midway."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if os.path.exists(self.flag):
            time.sleep(60)
        open(self.flag, "w").close()
        return x


def _build_shard(root: str, flag: str) -> None:
    store, m = FeatureStore(root), _Stall(flag)
    store.build(store.key("fp", m, torch.float32, shard=(1, 2)), m, _indexed(400, 8), batch_size=10, progress=False)


def test_a_rank_killed_mid_build_leaves_no_visible_shard(tmp_path):
    flag = str(tmp_path / "started")
    proc = mp.get_context("spawn").Process(target=_build_shard, args=(str(tmp_path), flag))
    proc.start()
    store, m = FeatureStore(tmp_path), _Stall(flag)
    key = store.key("fp", m, torch.float32, shard=(1, 2))
    deadline = time.monotonic() + 60
    while not (os.path.exists(flag) and glob.glob(store.path(key) + ".partial-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert glob.glob(store.path(key) + ".partial-*"), "the build was killed before it wrote anything"
    assert not store.has(key) and not os.path.exists(store.path(key))
    os.remove(flag)
    entry = store.build(key, _Stall(flag), _indexed(400, 8), batch_size=400, progress=False)  # one call: no stall
    assert entry.num_rows == 200 and entry.meta["shard"] == [1, 2]
    assert not glob.glob(store.path(key) + ".partial-*")


def test_each_torchrun_restart_joins_under_its_own_store_prefix(monkeypatch):
    """torchrun keeps one agent store across restarts; the killed group's keys (rank addresses) stay in it.
    ``init`` puts each restart's keys under their own prefix on one node, and leaves other setups to torch."""
    from datetime import timedelta

    import torch.distributed as dist

    from pystage import distributed

    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for attempt in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        distributed._restart_store(2).set("rank_0", f"address of attempt {attempt}")
    assert server.get("pystage/restart-0/rank_0") == b"address of attempt 0"
    assert server.get("pystage/restart-1/rank_0") == b"address of attempt 1"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # 2 nodes: restart counts may differ between them
    assert distributed._restart_store(2) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed._restart_store(2) is None
