"""List, verify, remove and prune (LRU under a disk budget) the entries of a store directory."""
from __future__ import annotations

import glob
import logging
import os
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from pystage.store.build import PARTIAL
from pystage.store.errors import StoreCorruptError, StoreLockTimeout
from pystage.store.format import SUFFIX, entry_path, read_meta
from pystage.store.keys import dtype_name
from pystage.store.lock import is_locked, key_lock
from pystage.store.reader import verify_checksums
from pystage.store.stream import BLOCK_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EntryInfo:
    """One row of ``ls``: what an entry holds and when it was made and last used."""

    key: str
    path: str
    size_bytes: int  # on disk
    num_rows: int
    feature_shape: tuple[int, ...]
    dtype: str
    created: str  # ISO 8601, UTC
    last_used: float  # unix time (the file's atime, set on every open)
    problem: Optional[str] = None  # set when the metadata cannot be read


@dataclass(frozen=True)
class StoreProblem:
    """One problem ``verify`` found: which entry, which file, what is wrong."""

    key: str
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.key}: {self.what}"


def entry_keys(directory: str) -> list[str]:
    """Keys of the complete entries in ``directory`` (temporary files are not entries)."""
    if not os.path.isdir(directory):
        return []
    return sorted(n[: -len(SUFFIX)] for n in os.listdir(directory) if n.endswith(SUFFIX) and len(n) == 32 + len(SUFFIX))


def mark_used(path: str) -> None:
    """Record a use: set the file's access time to now (mtime kept), which ``prune`` evicts by."""
    try:
        os.utime(path, (time.time(), os.stat(path).st_mtime))
    except OSError as e:  # a read-only store still serves; it just cannot rank entries by use
        log.debug("cannot mark %s used: %s", path, e)


def list_entries(directory: str) -> list[EntryInfo]:
    """Every entry, most recently used first; unreadable ones carry ``problem`` instead of failing the listing."""
    rows = []
    for key in entry_keys(directory):
        path = entry_path(directory, key)
        st = os.stat(path)
        try:
            m = read_meta(path, key)
            rows.append(EntryInfo(key, path, st.st_size, m.num_rows, m.feature_shape, dtype_name(m.dtype),
                                  str(m.attrs.get("created", "")), st.st_atime))
        except StoreCorruptError as e:
            rows.append(EntryInfo(key, path, st.st_size, -1, (), "", "", st.st_atime, problem=str(e)))
    return sorted(rows, key=lambda r: r.last_used, reverse=True)


def verify_entries(directory: str, keys: Iterable[str]) -> list[StoreProblem]:
    """Structure, metadata and every chunk's CRC of each entry; an empty list means all is well."""
    problems = []
    for key in keys:
        path = entry_path(directory, key)
        try:
            meta = read_meta(path, key)
            bad = verify_checksums(meta, max(meta.chunk_rows, BLOCK_BYTES // max(1, meta.row_bytes)))
        except StoreCorruptError as e:
            problems.append(StoreProblem(key, path, str(e)))
            continue
        for chunk, a, b in bad:
            problems.append(StoreProblem(key, path, f"corrupt feature-store entry {path}: checksum mismatch in chunk "
                                                    f"{chunk} (rows {a}:{b}); remove it and build again"))
    return problems


def remove_entry(directory: str, key: str, timeout: float = -1) -> bool:
    """Delete an entry (under its lock); False when there was none."""
    path = entry_path(directory, key)
    with key_lock(directory, key, timeout):
        if not os.path.exists(path):
            return False
        os.remove(path)
    log.info("removed %s", path)
    return True


def remove_stale_partials(directory: str) -> list[str]:
    """Temporary files of builds that died (their key is not locked by a live build)."""
    removed = []
    for p in glob.glob(os.path.join(glob.escape(directory), "*" + SUFFIX + PARTIAL + "*")):
        key = os.path.basename(p).split(".", 1)[0]
        if not is_locked(directory, key) and os.path.exists(p):
            os.remove(p)
            removed.append(p)
    return removed


def prune_entries(directory: str, disk_budget: Optional[int], keep: Iterable[str] = ()) -> list[str]:
    """Remove stale temporary files, then least-recently-used entries until the total fits ``disk_budget``."""
    for p in remove_stale_partials(directory):
        log.warning("removed %s: left by a build that did not finish", p)
    if disk_budget is None:
        return []
    keep = set(keep)
    entries = sorted(list_entries(directory), key=lambda r: r.last_used)  # least recently used first
    total = sum(e.size_bytes for e in entries)
    removed = []
    for e in entries:
        if total <= disk_budget:
            break
        if e.key in keep:
            continue
        try:
            if remove_entry(directory, e.key, timeout=0):
                removed.append(e.key)
                total -= e.size_bytes
        except StoreLockTimeout:
            log.info("prune: skipping %s, locked by another process", e.path)
    if total > disk_budget:
        log.warning("store %s holds %d bytes after pruning, over disk_budget %d (kept: %s)", directory, total,
                    disk_budget, sorted(keep))
    return removed
