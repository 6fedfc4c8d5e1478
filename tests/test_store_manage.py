"""ls, remove, verify, prune (LRU under disk_budget), default root, and the ``python -m pystage.store`` shell commands."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from pystage.store import FeatureStore, StoreArgumentError, StoreNotFoundError, default_root
from pystage.store.__main__ import main


def _build(store, i, rows=100):
    m = nn.Linear(8, 16)  # different weights each time -> different keys
    ds = TensorDataset(torch.randn(rows, 8), torch.arange(rows))
    return store.build(store.key(f"fp{i}", m, torch.float32), m, ds, batch_size=50, progress=False)


def _age(entry, seconds_ago):
    st = os.stat(entry.path)
    os.utime(entry.path, (st.st_atime - seconds_ago, st.st_mtime))


def test_default_root_env_and_argument(monkeypatch, tmp_path):
    monkeypatch.delenv("PYSTAGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_root() == str(tmp_path / "xdg" / "pystage")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_root() == os.path.join(os.path.expanduser("~"), ".cache", "pystage")
    monkeypatch.setenv("PYSTAGE_CACHE", str(tmp_path / "env"))
    assert FeatureStore().directory == str(tmp_path / "env" / "features")
    assert FeatureStore(tmp_path / "arg").directory == str(tmp_path / "arg" / "features")
    with pytest.raises(StoreArgumentError, match="ram_budget"):
        FeatureStore(tmp_path, ram_budget="lots")


def test_ls_remove_and_last_used(tmp_path):
    store = FeatureStore(tmp_path)
    a, b = _build(store, 0), _build(store, 1)
    _age(a, 100)
    rows = store.ls()
    assert [r.key for r in rows] == [b.key, a.key]  # most recently used first
    assert rows[0].num_rows == 100 and rows[0].feature_shape == (16,) and rows[0].dtype == "float32"
    assert rows[0].size_bytes == os.path.getsize(b.path) and rows[0].created and rows[0].problem is None
    store.open(a.key)  # a use moves it to the front
    assert [r.key for r in store.ls()] == [a.key, b.key]
    assert store.remove(a.key) and not os.path.exists(a.path) and not store.remove(a.key)
    assert [r.key for r in store.ls()] == [b.key]
    with pytest.raises(StoreNotFoundError):
        store.verify(a.key)


def test_prune_evicts_least_recently_used_to_fit_the_budget(tmp_path):
    store = FeatureStore(tmp_path)
    entries = [_build(store, i) for i in range(4)]
    for age, e in zip((400, 300, 200, 100), entries):
        _age(e, age)
    size = os.path.getsize(entries[0].path)
    stale = entries[0].path + ".partial-99999-deadbeef"
    open(stale, "wb").close()
    removed = store.prune(disk_budget=2 * size)
    assert removed == [entries[0].key, entries[1].key] and not os.path.exists(stale)
    assert {r.key for r in store.ls()} == {entries[2].key, entries[3].key}


def test_build_keeps_the_store_under_disk_budget(tmp_path):
    first = _build(FeatureStore(tmp_path), 0)
    _age(first, 100)
    size = os.path.getsize(first.path)
    store = FeatureStore(tmp_path, disk_budget=int(size * 1.5))
    second = _build(store, 1)
    assert [r.key for r in store.ls()] == [second.key]


def test_cli_ls_verify_rm_prune(tmp_path, capsys):
    store = FeatureStore(tmp_path)
    a, b = _build(store, 0), _build(store, 1)
    root = ["--root", str(tmp_path)]
    assert main(root + ["ls"]) == 0
    out = capsys.readouterr().out
    assert a.key in out and b.key in out and "2 entries" in out and "(16,)" in out
    assert main(root + ["verify"]) == 0 and "0 problem(s)" in capsys.readouterr().out
    with open(b.path, "r+b") as f:
        f.truncate(1000)
    assert main(root + ["verify"]) == 1
    out = capsys.readouterr().out
    assert f"BAD {b.path}" in out and "1 problem(s)" in out
    assert main(root + ["verify", "--remove"]) == 1 and not os.path.exists(b.path)
    capsys.readouterr()
    assert main(root + ["rm", a.key]) == 0 and store.ls() == []
    assert main(root + ["rm", a.key]) == 1 and "no entry" in capsys.readouterr().err
    assert main(root + ["rm", "nonsense"]) == 2 and "key" in capsys.readouterr().err
    assert main(root + ["prune", "--disk-budget", "1GiB"]) == 0 and "removed 0" in capsys.readouterr().out


def test_cli_runs_as_a_module(tmp_path):
    _build(FeatureStore(tmp_path), 0)
    r = subprocess.run([sys.executable, "-m", "pystage.store", "--root", str(tmp_path), "ls"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "1 entries" in r.stdout
