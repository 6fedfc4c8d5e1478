"""Injected faults: SIGKILL mid-write, truncation, bit flips, disk full, concurrent builders, bad metadata."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pystage.store.build as build_mod
import pystage.store.sink as sink_mod
from pystage.store import (FeatureStore, StoreCorruptError, StoreDiskFullError, StoreNotFoundError,
                           StoreVersionError)

# A child process: builds key of a seeded stage over seeded data in ROOT; the stage can hang or be slow.
CHILD = textwrap.dedent("""
    import json, os, sys, time, torch
    from torch import nn
    from torch.utils.data import TensorDataset
    from pystage.store import FeatureStore
    root, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
        def forward(self, x):
            with open(out + ".calls", "a") as f:
                f.write("1\\n")
            if mode == "hang" and sum(1 for _ in open(out + ".calls")) == 4:
                open(out + ".ready", "w").close()
                time.sleep(600)
            if mode == "slow":
                time.sleep(0.05)
            return self.conv(x)

    ds = TensorDataset(torch.randn(600, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(600))
    store = FeatureStore(root)
    m = Stage()
    key = store.key("fp", m, dtype=torch.float32)
    open(out + ".key", "w").write(key)
    entry = store.build(key, m, ds, batch_size=40, progress=False)
    json.dump({"key": key, "path": entry.path, "rows": entry.num_rows}, open(out + f".{os.getpid()}.json", "w"))
""")


def _stage():
    torch.manual_seed(0)
    return nn.Conv2d(3, 8, 3, padding=1)


def _ds():
    return TensorDataset(torch.randn(600, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(600))


def _child(tmp_path, root, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), str(root), mode, str(tmp_path / "run")])


def _built(tmp_path, **kw):
    store = FeatureStore(tmp_path / "root", **kw)
    m = _stage()
    key = store.key("fp", m, dtype=torch.float32)
    return store, key, m, store.build(key, m, _ds(), batch_size=40, progress=False)


def test_sigkill_mid_write_leaves_no_entry_and_next_build_rebuilds(tmp_path):
    root = tmp_path / "root"
    proc = _child(tmp_path, root, "hang")
    deadline = time.time() + 60
    while not (tmp_path / "run.ready").exists():
        assert proc.poll() is None and time.time() < deadline, "child died before it started writing"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store, m = FeatureStore(root), _stage()
    key = (tmp_path / "run.key").read_text()  # a plain str key: build() then takes the module as it comes
    partials = [n for n in os.listdir(store.directory) if ".partial-" in n]
    assert partials and not store.has(key) and store.ls() == []
    with pytest.raises(StoreNotFoundError):
        store.open(key)
    entry = store.build(key, m, _ds(), batch_size=40, progress=False)
    assert entry.num_rows == 600 and store.verify() == []
    assert not [n for n in os.listdir(store.directory) if ".partial-" in n]


def test_two_processes_build_the_same_key_once(tmp_path):
    root = tmp_path / "root"
    procs = [_child(tmp_path, root, "slow") for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    results = [json.loads(p.read_text()) for p in tmp_path.glob("run.*.json")]
    assert len(results) == 2 and results[0] == results[1] and results[0]["rows"] == 600
    calls = (tmp_path / "run.calls").read_text().count("1")
    assert calls == 15  # 600 rows / 40 per batch: one forward pass in all, not one per process
    store = FeatureStore(root)
    assert [e.key for e in store.ls()] == [results[0]["key"]] and store.verify() == []


def test_truncated_file_is_detected_reported_and_rebuilt(tmp_path, caplog):
    store, key, m, entry = _built(tmp_path)
    size = os.path.getsize(entry.path)
    with open(entry.path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(StoreCorruptError, match=entry.path):
        store.open(key)
    problems = store.verify()
    assert len(problems) == 1 and problems[0].path == entry.path and entry.path in problems[0].what
    with caplog.at_level(logging.WARNING):
        rebuilt = store.build(key, m, _ds(), batch_size=40, progress=False)
    assert entry.path in caplog.text and os.path.getsize(rebuilt.path) == size and store.verify() == []


def _flip_a_data_bit(path, chunk=1):
    with h5py.File(path, "r") as f:
        offset = f["features"].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 0x10]))


def test_bit_flip_is_found_by_verify_and_check_on_read_and_rebuilt(tmp_path, caplog):
    store, key, m, entry = _built(tmp_path)
    clean = torch.cat([x for x, _ in entry.stream(shuffle=False)])
    _flip_a_data_bit(entry.path, chunk=1)
    store.open(key)  # metadata is intact: open does not read the data
    problems = store.verify(key)
    assert len(problems) == 1 and "chunk 1" in problems[0].what and entry.path in problems[0].what
    with pytest.raises(StoreCorruptError, match="chunk 1"):
        list(store.open(key).stream(check=True))
    with caplog.at_level(logging.WARNING):
        store.build(key, m, _ds(), batch_size=40, progress=False, verify=True)
    assert entry.path in caplog.text and store.verify() == []
    assert torch.equal(torch.cat([x for x, _ in store.open(key).stream(shuffle=False)]), clean)


@pytest.mark.parametrize("style", ["errno", "hdf5 message"])
def test_disk_full_mid_write_raises_and_removes_the_temporary_file(tmp_path, monkeypatch, style):
    real, calls = h5py.Dataset.write_direct, []

    def full(self, *a, **kw):  # the third write hits a full disk
        calls.append(1)
        if len(calls) == 3:
            if style == "errno":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")
        return real(self, *a, **kw)

    monkeypatch.setattr(h5py.Dataset, "write_direct", full)
    monkeypatch.setattr(build_mod, "STAGING_BYTES", 64 << 10)  # several writes for a small entry
    store = FeatureStore(tmp_path / "root", device_budget=0)  # rows handed to the writer (memory: test_store_memory)
    m = _stage()
    key = store.key("fp", m, dtype=torch.float32)
    with pytest.raises(StoreDiskFullError, match="no space left") as err:
        store.build(key, m, _ds(), batch_size=40, progress=False)
    assert err.value.errno == errno.ENOSPC and ".partial-" in err.value.filename
    assert len(calls) == 3 and not store.has(key)
    assert [n for n in os.listdir(store.directory) if not n.startswith(".")] == []


def test_disk_too_small_fails_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(sink_mod.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    store = FeatureStore(tmp_path / "root")
    m = _stage()
    with pytest.raises(StoreDiskFullError) as err:
        store.build(store.key("fp", m, dtype=torch.float32), m, _ds(), batch_size=40, progress=False)
    assert err.value.needed == 600 * (8 * 16 * 16 * 4 + 8) and err.value.free == 1000
    assert [n for n in os.listdir(store.directory) if not n.startswith(".")] == []


@pytest.mark.parametrize("damage, error, words", [
    ("version", StoreVersionError, "version 1"), ("no num_rows", StoreCorruptError, "num_rows"),
    ("incomplete", StoreCorruptError, "complete"), ("wrong key", StoreCorruptError, "attribute 'key'"),
    ("not hdf5", StoreCorruptError, "HDF5"), ("wrong shape", StoreCorruptError, "shape of '/features'")])
def test_bad_metadata_names_the_file_and_what_was_expected(tmp_path, damage, error, words):
    store, key, m, entry = _built(tmp_path)
    if damage == "not hdf5":
        with open(entry.path, "wb") as f:
            f.write(b"not an hdf5 file" * 100)
    else:
        with h5py.File(entry.path, "r+") as f:
            if damage == "version":
                f.attrs["format_version"] = 99
            elif damage == "no num_rows":
                del f.attrs["num_rows"]
            elif damage == "incomplete":
                f.attrs["complete"] = False
            elif damage == "wrong key":
                f.attrs["key"] = "0" * 32
            else:
                f.attrs["num_rows"] = 599
    with pytest.raises(error, match=words) as err:
        store.open(key)
    assert err.value.path == entry.path and entry.path in str(err.value)
    assert not store.has(key) and [p.key for p in store.verify()] == [key]
    assert store.build(key, m, _ds(), batch_size=40, progress=False).num_rows == 600  # rebuilt
