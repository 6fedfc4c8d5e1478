"""Exceptions of the feature store: each names the file or argument, what it got and what was expected."""
from __future__ import annotations

import errno
from typing import Any, Optional

from pystage.errors import PystageError


class StoreError(PystageError):
    """Base class of every feature-store error."""


class StoreArgumentError(StoreError, ValueError):
    """An argument (or an item the data yielded) that the store cannot use."""

    def __init__(self, name: str, got: Any, expected: str) -> None:
        self.name, self.got, self.expected = name, got, expected
        super().__init__(f"{name}: got {got!r}, expected {expected}")


class StoreKeyMismatchError(StoreError, ValueError):
    """build() was given a module, dtype, shard or upstream that differs from what the key was made from."""

    def __init__(self, key: str, what: str, got: Any, expected: Any) -> None:
        self.key, self.what, self.got, self.expected = key, what, got, expected
        super().__init__(f"key {key}: {what} is {got!r} but the key was made for {expected!r}; "
                         f"call store.key() again with this {what}")


class StoreNotFoundError(StoreError, LookupError):
    """No complete entry for the key in the store."""

    def __init__(self, key: str, path: str, detail: str = "build it with store.build()") -> None:
        self.key, self.path = key, path
        super().__init__(f"no feature-store entry for key {key}: {path} does not exist; {detail}")


class StoreCorruptError(StoreError):
    """An entry file that is unreadable, truncated, bit-flipped or has bad metadata."""

    def __init__(self, path: str, what: str, expected: Any, got: Any = None) -> None:
        self.path, self.what, self.expected, self.got = path, what, expected, got
        tail = "" if got is None else f", got {got!r}"
        super().__init__(f"corrupt feature-store entry {path}: {what}: expected {expected}{tail}")


class StoreVersionError(StoreCorruptError):
    """An entry written in a format version this pystage does not read."""

    def __init__(self, path: str, got: Any, expected: int) -> None:
        super().__init__(path, "format_version", f"version {expected} (this pystage's format)", got)


class StoreDiskFullError(StoreError, OSError):
    """The disk filled up while writing an entry; the temporary file has been removed."""

    def __init__(self, path: str, detail: str, needed: Optional[int] = None, free: Optional[int] = None) -> None:
        self.needed, self.free = needed, free
        nums = "" if needed is None else f" (needed ~{needed} bytes, {free} free)"
        OSError.__init__(self, errno.ENOSPC, f"no space left on device while writing {path}{nums}: {detail}; "
                         "the partial file was removed; free space or set disk_budget", path)


class StoreLockTimeout(StoreError, TimeoutError):
    """Another process held an entry's lock longer than the timeout."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        super().__init__(f"lock {path} still held by another process after {timeout} s; "
                         "another build of this key is running (or raise lock_timeout)")
