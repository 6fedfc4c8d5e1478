"""Per-key file locks, so that two processes build (or remove) one key one at a time."""
from __future__ import annotations

import logging
import os
import time
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
        return lock
    except filelock.Timeout:
        log.info("waiting for %s: another process (or thread) is building or removing key %s", path, key)
    deadline = None if timeout < 0 else time.monotonic() + timeout
    while True:  # finite waits: filelock refuses an endless one on a lock another thread of ours holds
        wait = 60.0 if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            lock.acquire(timeout=wait)
            return lock
        except filelock.Timeout:
            if deadline is not None:
                raise StoreLockTimeout(path, timeout) from None


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
