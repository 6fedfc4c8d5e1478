"""Entries built into memory on the build device (host RAM standing in for GPU memory on the CPU), served in the
file's order; disk copies written by the writer thread beside the forward pass, in the background or not at all."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pystage.store import FeatureStore, StoreArgumentError, StoreDiskFullError, StoreNotFoundError
from pystage.store.memory import budget_bytes
from pystage.store.stream import StreamOptions, iter_stream, plan_stream
from pystage.store.chunkfile import ChunkFile

N = 700


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.arange(n))


def _stage(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())


def _build(root, dtype=torch.float16, width=4, **kw):
    store, m = FeatureStore(root, **kw), _stage(width)
    return store, store.build(store.key("fp", m, dtype), m, _data(), batch_size=64, progress=False)


def _file_epoch(entry, **kw):
    """One epoch read from the file (never from memory), with the entry's own RAM budget."""
    opts = StreamOptions(check=True, **kw)
    return list(iter_stream(entry._meta, entry.ram_budget, opts))


@pytest.mark.parametrize("ram, dtype", [("64MiB", torch.float16), ("8MiB", torch.float16),
                                        ("64MiB", torch.bfloat16), ("8MiB", torch.float32)])
def test_an_entry_that_fits_is_built_in_memory_and_serves_the_files_batches(tmp_path, ram, dtype):
    """Resident (64MiB) and windowed (8MiB: the 5.5-11 MiB file is read in windows of 2 MiB) plans: memory serves
    the same batches in the same order."""
    store, entry = _build(tmp_path, dtype, 64, ram_budget=ram, device_budget="16MiB")
    assert plan_stream(entry._meta, entry.ram_budget, 50).resident == (ram == "64MiB")
    assert entry.memory_device == torch.device("cpu") and entry.on_disk and store.verify() == []
    for kw in (dict(batch_size=50, seed=1, epoch=0), dict(batch_size=64, seed=1, epoch=3),
               dict(batch_size=7, shuffle=False), dict(batch_size=96, seed=2, epoch=1, drop_last=True)):
        mem, disk = list(entry.stream(**kw)), _file_epoch(entry, **kw)
        assert len(mem) == len(disk) > 0
        for (mx, my), (dx, dy) in zip(mem, disk):
            assert mx.dtype == dtype and torch.equal(my, dy) and torch.equal(mx, dx)
    assert sorted(torch.cat([y for _, y in entry.stream(batch_size=50)]).tolist()) == list(range(N))


def test_rows_in_memory_are_the_stored_bytes(tmp_path):
    store, entry = _build(tmp_path, torch.float16, ram_budget="64MiB")
    with h5py.File(entry.path, "r") as f:
        x = f["features"][()]
    assert np.array_equal(entry.host_rows()[0], x)
    m = _stage()
    with torch.no_grad():
        want = m(_data().tensors[0]).half()
    assert torch.equal(torch.cat([b for b, _ in entry.stream(batch_size=64, shuffle=False)]), want)


def test_device_budget_zero_or_too_small_builds_to_disk_only(tmp_path):
    _, entry = _build(tmp_path / "a", ram_budget="64MiB", device_budget=0)
    assert entry.memory_device is None and entry.on_disk
    _, small = _build(tmp_path / "b", ram_budget="64MiB", device_budget=1000)  # the entry is 90 KiB
    assert small.memory_device is None


def test_device_budget_values(tmp_path):
    assert budget_bytes("auto", "cpu", 256 << 20) == 128 << 20  # what a stream would hold in RAM
    assert budget_bytes("1MiB", "cpu", 0) == budget_bytes(1 << 20, "cpu", 0) == 1 << 20
    assert budget_bytes(0, "cpu", 1 << 30) == 0 and budget_bytes(None, "cpu", 1 << 30) == 0
    assert 0 < budget_bytes(0.5, "cpu", 0)  # half the available RAM
    for bad in (1.5, -0.1, "lots", -5):
        with pytest.raises(StoreArgumentError, match="device_budget"):
            FeatureStore(tmp_path, device_budget=bad)
    with pytest.raises(StoreArgumentError, match="disk_copy"):
        FeatureStore(tmp_path, disk_copy="later")
    store = FeatureStore(tmp_path, ram_budget="8MiB", disk_budget="1GiB")
    other = store.replace(device_budget=0)
    assert other.directory == store.directory and other.config.device_budget == 0 and store.config.device_budget == "auto"
    assert (other.config.ram_budget, other.config.disk_budget) == (8 << 20, 1 << 30)


class _Gate:
    """Holds the writer thread's first write until ``open()``: the build's forward pass is not held."""

    def __init__(self, monkeypatch, method: str = "append") -> None:
        self.event, self.calls, real = threading.Event(), [], getattr(ChunkFile, method)

        def held(file, *a, **kw):
            self.calls.append(1)
            assert self.event.wait(300), "the gate was never opened"
            return real(file, *a, **kw)

        monkeypatch.setattr(ChunkFile, method, held)

    def open(self) -> None:
        self.event.set()


def test_the_forward_pass_runs_ahead_of_the_writes(tmp_path, monkeypatch):
    gate, calls = _Gate(monkeypatch), []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x * 2

    store, m = FeatureStore(tmp_path, device_budget=0), Counting()
    done = []
    t = threading.Thread(target=lambda: done.append(store.build(store.key("fp", m, torch.float32), m, _data(),
                                                                batch_size=50, progress=False)))
    t.start()
    deadline = time.time() + 300
    while len(calls) < 5 and time.time() < deadline:  # the writer holds its first block; the queue takes 4 more
        time.sleep(0.01)
    assert len(calls) >= 5 and len(gate.calls) == 1 and not done  # 5 batches computed, none written yet
    gate.open()
    t.join(300)
    assert done and done[0].on_disk and len(calls) == 14 and store.verify() == []


def test_background_disk_copy_is_published_later_and_hidden_until_then(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch, "finish")
    store, entry = _build(tmp_path, ram_budget="64MiB", disk_copy="background")
    assert entry.memory_device == torch.device("cpu") and not entry.on_disk
    assert not os.path.exists(entry.path) and not store.has(entry.key) and store.ls() == []
    x = torch.cat([b for b, _ in entry.stream(batch_size=64, shuffle=False)])  # served while the copy is held
    digest = entry.content_digest  # the CRC table is complete before the file is
    assert not entry.on_disk
    gate.open()
    assert entry.wait() is entry and entry.on_disk and store.verify() == []
    fresh = store.open(entry.key)
    assert fresh.content_digest == entry.content_digest == digest
    assert torch.equal(torch.cat([b for b, _ in fresh.stream(batch_size=64, shuffle=False)]), x)


def test_building_a_key_whose_copy_is_being_written_waits_for_it(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch, "finish")
    store, entry = _build(tmp_path, ram_budget="64MiB", disk_copy="background")
    calls = []
    m = _stage()
    m.register_forward_hook(lambda *a: calls.append(1))
    threading.Timer(0.3, gate.open).start()
    again = FeatureStore(tmp_path).build(store.key("fp", m, torch.float16), m, _data(), batch_size=64, progress=False)
    assert not calls and again.on_disk and again.content_digest == entry.content_digest  # built once


def test_no_disk_copy(tmp_path):
    store, entry = _build(tmp_path / "a", ram_budget="64MiB", disk_copy="never")
    assert entry.memory_device == torch.device("cpu") and not entry.on_disk and not store.has(entry.key)
    assert not os.path.exists(entry.path) and store.ls() == []
    _, on_disk = _build(tmp_path / "b", ram_budget="64MiB")
    assert entry.content_digest == on_disk.content_digest  # the CRC table is computed all the same
    for kw in (dict(batch_size=50, seed=4, epoch=2), dict(batch_size=64, shuffle=False)):
        for (a, ya), (b, yb) in zip(entry.stream(**kw), on_disk.stream(**kw)):
            assert torch.equal(a, b) and torch.equal(ya, yb)
    entry.release_buffers()  # the rows are the entry: kept
    assert entry.memory_device is not None and len(list(entry.stream())) == -(-N // 50)
    for read in (entry.dataset, entry.verify):
        with pytest.raises(StoreNotFoundError, match="disk_copy='never'"):
            read()


def test_an_entry_built_from_an_entry_in_memory_reads_it_from_memory(tmp_path, monkeypatch):
    import pystage.store.entry as entry_mod

    store, first = _build(tmp_path, ram_budget="64MiB")
    monkeypatch.setattr(entry_mod, "iter_stream", None)  # the file is not read
    m = nn.Flatten()
    second = store.build(store.key(first.content_digest, m, torch.float16), m, first, progress=False)
    assert second.num_rows == N and second.memory_device == torch.device("cpu")
    want = torch.cat([x.flatten(1) for x, _ in first.stream(batch_size=100, shuffle=False)])
    assert torch.equal(torch.cat([x for x, _ in second.stream(batch_size=100, shuffle=False)]), want)


@pytest.mark.parametrize("copy", ["background", "wait", "disk only"])
def test_disk_full_in_the_writer_leaves_nothing_on_disk(tmp_path, monkeypatch, copy):
    """Waiting (or writing to disk only), the build raises. In the background the entry in memory stays whole (its
    CRC table too: the content digest is the one a clean build gives) and ``wait()`` raises."""
    import pystage.store.chunkfile as chunkfile

    calls = []

    def failing(real):
        def write(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*a, **kw)
        return write

    _, clean = _build(tmp_path / "clean", width=64, ram_budget="64MiB")
    monkeypatch.setattr(h5py.Dataset, "write_direct", failing(h5py.Dataset.write_direct))  # rows handed over
    monkeypatch.setattr(chunkfile, "_pwrite_all", failing(chunkfile._pwrite_all))  # rows written from memory
    monkeypatch.setattr("pystage.store.build.STAGING_BYTES", 16 << 10)  # a write per 1 MiB chunk: 6 chunks
    monkeypatch.setattr("pystage.store.writer.BLOCK_BYTES", 1 << 20)
    kw = dict(device_budget=0) if copy == "disk only" else dict(disk_copy=copy)
    store, m = FeatureStore(tmp_path / "full", ram_budget="64MiB", **kw), _stage(64)
    key = store.key("fp", m, torch.float16)
    if copy != "background":
        with pytest.raises(StoreDiskFullError):
            store.build(key, m, _data(), batch_size=64, progress=False)
    else:
        entry = store.build(key, m, _data(), batch_size=64, progress=False)
        assert entry.content_digest == clean.content_digest
        for (a, _), (b, _) in zip(entry.stream(batch_size=50), clean.stream(batch_size=50)):
            assert torch.equal(a, b)
        with pytest.raises(StoreDiskFullError):
            entry.wait()
        assert not entry.on_disk
        with pytest.raises(StoreDiskFullError):
            entry.verify()
    assert len(calls) >= 3 and [n for n in os.listdir(store.directory) if not n.startswith(".")] == []
    monkeypatch.undo()
    assert store.build(key, m, _data(), batch_size=64, progress=False).wait().on_disk  # the lock was released


CHILD = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from pystage.store import FeatureStore
    from pystage.store import chunkfile
    root, out = sys.argv[1], sys.argv[2]
    def hang(self, *a, **kw):  # rows written, nothing published yet
        open(out + ".ready", "w").close()
        time.sleep(600)
    chunkfile.ChunkFile.finish = hang
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3, padding=1)
    ds = TensorDataset(torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(300))
    store = FeatureStore(root, disk_copy="background")
    key = store.key("fp", m, torch.float32)
    open(out + ".key", "w").write(key)
    entry = store.build(key, m, ds, batch_size=50, progress=False)
    assert entry.memory_device is not None and sum(len(y) for _, y in entry.stream()) == 300
    open(out + ".served", "w").close()
    time.sleep(600)
""")


def test_a_process_killed_while_its_copy_is_written_leaves_no_entry(tmp_path):
    script, root, out = tmp_path / "child.py", tmp_path / "root", tmp_path / "run"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)])
    deadline = time.time() + 120
    while not (os.path.exists(f"{out}.ready") and os.path.exists(f"{out}.served")):
        assert proc.poll() is None and time.time() < deadline, "the child died before its copy was written"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store, key = FeatureStore(root), open(f"{out}.key").read()
    assert not store.has(key) and store.ls() == []
    assert [n for n in os.listdir(store.directory) if ".partial-" in n]  # only the temporary file
    torch.manual_seed(0)
    m = nn.Conv2d(3, 4, 3, padding=1)
    ds = TensorDataset(torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(300))
    assert store.build(key, m, ds, batch_size=50, progress=False).num_rows == 300 and store.verify() == []
    assert not [n for n in os.listdir(store.directory) if ".partial-" in n]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_build_keeps_the_entry_in_gpu_memory_and_serves_the_files_batches(tmp_path):
    store, m = FeatureStore(tmp_path, ram_budget="128KiB", device_budget="64MiB"), _stage().cuda()
    entry = store.build(store.key("fp", m, torch.float16), m, _data(), batch_size=64, device="cuda", progress=False)
    assert entry.memory_device.type == "cuda" and entry.on_disk and store.verify() == []
    for kw in (dict(batch_size=50, seed=1, epoch=2), dict(batch_size=64, shuffle=False)):
        mem = list(entry.stream(device="cuda", **kw))
        assert all(x.device.type == "cuda" for x, _ in mem)
        for (mx, my), (dx, dy) in zip(mem, _file_epoch(entry, **kw)):
            assert torch.equal(mx.cpu(), dx) and torch.equal(my.cpu(), dy)
    fresh = FeatureStore(tmp_path, ram_budget="128KiB", device_budget="64MiB").open(entry.key)
    first = list(fresh.stream(device="cuda", batch_size=50))  # loaded into GPU memory once, verified
    assert fresh.memory_device.type == "cuda" and len(first) == -(-N // 50)


def test_released_rows_are_freed_by_the_entry_and_its_writer(tmp_path, monkeypatch):
    """Once an entry's disk copy is written and the entry is released, nothing holds its rows (the writer thread
    let go of them when it finished), and the freed heap is handed back to the OS (malloc_trim on glibc)."""
    import gc
    import weakref

    from pystage.store import entry as entry_module

    trims = []
    monkeypatch.setattr(entry_module, "trim_host_heap", lambda: trims.append(1))
    store, entry = _build(tmp_path, ram_budget="64MiB", disk_copy="background")
    entry._writer.wait()  # the copy is on disk; the entry still holds its writer (fit waits on it at the end)
    rows = weakref.ref(entry._memory)
    entry.release_buffers()
    gc.collect()
    assert rows() is None and entry.memory_device is None and trims == [1]
    assert [len(y) for _, y in entry.stream(batch_size=100, shuffle=False)] == [100] * 7  # from the file now
