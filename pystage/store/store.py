"""FeatureStore: content-addressed, disk-backed features of frozen stages (build once, stream many times)."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from pystage.store.build import BuildSpec, build_entry, remove_partials
from pystage.store.entry import StoreEntry
from pystage.store.errors import StoreArgumentError, StoreCorruptError, StoreKeyMismatchError, StoreNotFoundError
from pystage.store.format import entry_path, read_meta
from pystage.store.keys import StoreKey, check_key, check_shard, module_digest
from pystage.store.lock import acquire_key_lock
from pystage.store.memory import DeviceBudget, budget_bytes, check_budget
from pystage.store.sink import DISK_COPIES
from pystage.store.manage import (EntryInfo, StoreProblem, entry_keys, list_entries, mark_used, prune_entries,
                                  remove_entry, verify_entries)
from pystage.store.sizes import Size, parse_optional_size, parse_size

log = logging.getLogger(__name__)
ENV_ROOT = "PYSTAGE_CACHE"
SUBDIR = "features"


def default_root() -> str:
    """``$PYSTAGE_CACHE``, else ``$XDG_CACHE_HOME/pystage``, else ``~/.cache/pystage``."""
    if os.environ.get(ENV_ROOT):
        return os.environ[ENV_ROOT]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pystage")


@dataclass(frozen=True)
class StoreConfig:
    """Where a store lives and what it may use; entries go in ``<root>/features/``."""

    root: str
    ram_budget: int = 256 << 20  # extra RAM a stream may use (bytes)
    disk_budget: Optional[int] = None  # bytes; after each build, LRU entries are evicted to stay under it
    lock_timeout: float = -1  # seconds to wait for another process's build of the same key; -1: forever
    device_budget: DeviceBudget = "auto"  # features kept in memory on the build device (memory.py)
    disk_copy: str = "auto"  # of an entry kept in memory: "auto", "background", "wait" or "never"

    @property
    def directory(self) -> str:
        return os.path.join(self.root, SUBDIR)


class FeatureStore:
    """Build, open, stream and manage feature entries under ``root`` (see docs/store.md).

    ``device_budget``: an entry whose bytes fit it is built straight into memory on the build device (GPU memory;
    host RAM on the CPU) and streamed from there; entries opened from disk are loaded there once when streamed to
    that device. "auto" (default): half the free device memory on CUDA, half ``ram_budget`` on the CPU; a fraction
    in (0, 1] of the free memory; a size; 0: never. ``disk_copy``: how such an entry reaches the disk:
    "background" (a writer thread publishes it while the caller goes on; ``entry.wait()`` blocks until it has),
    "wait" (before ``build`` returns), "never" (memory only: nothing to resume from or to share), or "auto" (the
    default: "wait" for ``build()`` called directly, "background" inside ``pystage.fit``, which waits for every
    disk copy before it returns).
    """

    def __init__(self, root: Optional[str] = None, ram_budget: Size = "256MiB", disk_budget: Optional[Size] = None,
                 lock_timeout: float = -1, device_budget: DeviceBudget = "auto", disk_copy: str = "auto") -> None:
        if root is not None and (not isinstance(root, (str, os.PathLike)) or not str(root)):
            raise StoreArgumentError("root", root, "a directory path or None (the default cache directory)")
        if disk_copy not in DISK_COPIES:
            raise StoreArgumentError("disk_copy", disk_copy, f"one of {DISK_COPIES}")
        self.config = StoreConfig(root=os.path.abspath(os.path.expanduser(str(root) if root else default_root())),
                                  ram_budget=parse_size(ram_budget, "ram_budget"),
                                  disk_budget=parse_optional_size(disk_budget, "disk_budget"), lock_timeout=lock_timeout,
                                  device_budget=check_budget(device_budget), disk_copy=disk_copy)
        self.directory = self.config.directory

    def __repr__(self) -> str:
        c = self.config
        return (f"FeatureStore(root={c.root!r}, ram_budget={c.ram_budget}, disk_budget={c.disk_budget}, "
                f"device_budget={c.device_budget!r}, disk_copy={c.disk_copy!r})")

    def replace(self, **changes: Any) -> "FeatureStore":
        """The same store (same root and entries) with other options: ``store.replace(device_budget=0)``."""
        c = dataclasses.replace(self.config, **changes)
        return FeatureStore(c.root, c.ram_budget, c.disk_budget, c.lock_timeout, c.device_budget, c.disk_copy)

    def key(self, upstream: str, module: nn.Module, dtype: torch.dtype = torch.float16, transforms: str = "",
            split: str = "train", shard: Optional[tuple[int, int]] = None, extra: Any = None) -> StoreKey:
        """Key of ``module``'s features stored as ``dtype``: hash of ``upstream`` (a dataset fingerprint, or the
        entry the features are computed from: its key or its ``content_digest``), architecture, weights, options."""
        return StoreKey(upstream, module, dtype, transforms, split, shard, extra)

    def path(self, key: str) -> str:
        """Where the entry of ``key`` lives (whether or not it exists)."""
        return entry_path(self.directory, check_key(key))

    def has(self, key: str) -> bool:
        """True when a complete entry with valid metadata exists for ``key``."""
        try:
            self.open(key, touch=False)
        except (StoreNotFoundError, StoreCorruptError):
            return False
        return True

    def open(self, key: str, touch: bool = True) -> StoreEntry:
        """The entry of ``key``; StoreNotFoundError, StoreCorruptError or StoreVersionError (with the path) if unusable."""
        path = self.path(key)
        if not os.path.exists(path):
            raise StoreNotFoundError(check_key(key), path)
        entry = StoreEntry(read_meta(path, check_key(key)), self.config.ram_budget, self.config.device_budget)
        if touch:
            mark_used(path)
        return entry

    def build(self, key: str, module: nn.Module, data: Any, batch_size: int = 256, device: Union[str, torch.device] = "cpu",
              storage_dtype: Optional[torch.dtype] = None, progress: bool = True,
              shard: Optional[tuple[int, int]] = None, verify: bool = False, disk_copy: Optional[str] = None) -> StoreEntry:
        """The entry of ``key``, computing it with one no-grad forward pass of ``module`` over ``data`` if needed.

        ``data``: a Dataset or DataLoader of ``(x, y)``, or the previous stage's StoreEntry. Idempotent and
        process-safe: an existing valid entry is returned (with ``verify``, only if every checksum matches), a
        corrupt one is rebuilt, and a file lock makes concurrent builders of one key compute it once. An entry that
        fits the device budget is kept in memory on ``device`` and served from there; ``disk_copy`` (None: the
        store's) says when its file is written (class docstring). Until the file is published no other process
        sees the entry, and a killed build leaves none.
        """
        k = check_key(key)
        copy = disk_copy if disk_copy is not None else self.config.disk_copy
        if copy not in DISK_COPIES:
            raise StoreArgumentError("disk_copy", disk_copy, f"None or one of {DISK_COPIES}")
        storage_dtype, shard = self._check_build(key, module, data, storage_dtype, shard)
        entry = self._existing(k, verify)
        if entry is not None:
            return entry
        lock = acquire_key_lock(self.directory, k, self.config.lock_timeout)
        try:
            entry = self._existing(k, verify=False)  # another process may have built it while we waited
            if entry is None:
                remove_partials(self.directory, k)
        except BaseException:
            lock.release()
            raise
        if entry is not None:
            lock.release()
            return entry
        info = {} if not isinstance(key, StoreKey) else {
            "upstream": str(key.upstream), "split": str(key.split_name), "transforms": str(key.transforms),
            "extra": key.extra, "module_digest": str(key.module)}
        c = self.config
        memory = 0 if shard is not None else budget_bytes(c.device_budget, device, c.ram_budget)
        spec = BuildSpec(key=k, batch_size=batch_size, device=str(device), storage_dtype=storage_dtype, shard=shard,
                         progress=progress, info=info, memory_budget=memory,
                         disk_copy="wait" if copy == "auto" else copy)
        built = build_entry(self.directory, module, data, spec, lock=lock, on_publish=lambda: self._published(k))
        if built.memory is None:
            return self.open(k)
        return StoreEntry(built.meta, c.ram_budget, c.device_budget, memory=built.memory,  # type: ignore[arg-type]
                          writer=built.writer)

    def _published(self, key: str) -> None:
        """After an entry is renamed into place (in the writer thread, the key's lock held): keep the disk budget."""
        mark_used(self.path(key))
        if self.config.disk_budget is not None:
            prune_entries(self.directory, self.config.disk_budget, keep=[key])

    def _check_build(self, key: str, module: nn.Module, data: Any, storage_dtype: Optional[torch.dtype],
                     shard: Any) -> tuple[Optional[torch.dtype], Optional[tuple[int, int]]]:
        """Check build()'s arguments against what a StoreKey was made from; resolve dtype and shard."""
        os.makedirs(self.directory, exist_ok=True)
        shard = check_shard(shard)
        if not isinstance(key, StoreKey):
            return storage_dtype, shard
        if storage_dtype is not None and storage_dtype != key.dtype:
            raise StoreKeyMismatchError(key, "storage_dtype", storage_dtype, key.dtype)
        if shard is not None and shard != key.shard:
            raise StoreKeyMismatchError(key, "shard", shard, key.shard)
        if module_digest(module) != key.module:
            raise StoreKeyMismatchError(key, "module (architecture or weights)", "a different module",
                                        "the module passed to store.key()")
        if isinstance(data, StoreEntry) and key.upstream not in (data.key, data.content_digest):
            raise StoreKeyMismatchError(key, "upstream entry", data.key, key.upstream)
        return key.dtype, key.shard

    def _existing(self, key: str, verify: bool) -> Optional[StoreEntry]:
        """The valid entry of ``key``, or None after removing a corrupt one (logged with its path)."""
        try:
            entry = self.open(key)
        except StoreNotFoundError:
            return None
        except StoreCorruptError as e:
            log.warning("%s; removing it and building again", e)
            remove_entry(self.directory, key, self.config.lock_timeout)
            return None
        if verify:
            bad = entry.verify()
            if bad:
                log.warning("corrupt feature-store entry %s: checksum mismatch in chunks %s; building again",
                            entry.path, [c for c, _, _ in bad])
                remove_entry(self.directory, key, self.config.lock_timeout)
                return None
        return entry

    def ls(self) -> list[EntryInfo]:
        """Every entry (key, size, shapes, created, last used), most recently used first."""
        return list_entries(self.directory)

    def remove(self, key: str) -> bool:
        """Delete the entry of ``key``; False when there was none."""
        return remove_entry(self.directory, check_key(key), self.config.lock_timeout)

    def verify(self, key: Optional[str] = None) -> list[StoreProblem]:
        """Problems (unreadable file, bad metadata, checksum mismatch) of one entry or of all; empty if all is well."""
        keys = entry_keys(self.directory) if key is None else [check_key(key)]
        if key is not None and not os.path.exists(self.path(key)):
            raise StoreNotFoundError(check_key(key), self.path(key))
        return verify_entries(self.directory, keys)

    def prune(self, disk_budget: Optional[Size] = None) -> list[str]:
        """Remove leftovers of killed builds and evict least-recently-used entries to fit ``disk_budget``."""
        budget = parse_optional_size(disk_budget, "disk_budget") if disk_budget is not None else self.config.disk_budget
        return prune_entries(self.directory, budget)
