"""Per-key file locks, so that two processes build (or remove) one key one at a time."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

import filelock

from pystage.store.errors import StoreLockTimeout

log = logging.getLogger(__name__)
LOCK_DIR = ".locks"


def lock_path(directory: str, key: str) -> str:
    return os.path.join(directory, LOCK_DIR, key + ".lock")


def acquire_key_lock(directory: str, key: str, timeout: float = -1) -> filelock.FileLock:
    """The key's lock, held (an OS file lock: released by the kernel if the holder dies); timeout -1 waits forever.

    Any thread may release it (a build hands it to the thread that publishes the entry)."""
    path = lock_path(directory, key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = filelock.FileLock(path, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("waiting for %s: another process (or thread) is building or removing key %s", path, key)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreLockTimeout(path, timeout) from None
    return lock


@contextmanager
def key_lock(directory: str, key: str, timeout: float = -1) -> Iterator[None]:
    """Hold the key's lock for the ``with`` block."""
    lock = acquire_key_lock(directory, key, timeout)
    try:
        yield
    finally:
        lock.release()


def is_locked(directory: str, key: str) -> bool:
    """True while another process holds the key's lock."""
    path = lock_path(directory, key)
    if not os.path.exists(path):
        return False
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return True
    lock.release()
    return False
