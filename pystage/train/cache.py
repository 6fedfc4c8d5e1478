"""Trained stages on disk, keyed by content: shared across architectures and resumed after a crash.

A stage's key hashes everything that determines its trained weights: the
upstream key (dataset fingerprint or the previous stage's key), the content of
the stored features it reads (their verified checksums), the stage's
architecture and initial weights, its head, the method's input kind, the
training and search configuration, epochs, batch size and seed. Identical
prefixes (e.g. stage 1 of CNN1, CNN6 and CNN8) get identical keys and are
trained once.

Every file carries a BLAKE2b digest of its payload's bytes (a header line before
the ``torch.save`` bytes), checked at load: a
file that was edited, truncated or written by an older pystage (no digest), or
whose tensors are not finite, is logged, ignored and its stage retrained. Files
are written to a temporary name, fsynced and renamed into place.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Optional

import torch

from pystage.store.keys import module_digest

log = logging.getLogger(__name__)
FORMAT = 2  # 2: checksummed files; checkpoint recomputation with frozen BatchNorm statistics; content-keyed inputs
MAGIC = b"pystage-stage-v2\n"  # then the payload's BLAKE2b (hex) on its own line, then the torch.save bytes


def stage_key(**parts: Any) -> str:
    """A stable 32-hex-digit key of ``parts`` (modules are hashed by architecture and weight bytes)."""
    flat = {k: module_digest(v) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
    blob = json.dumps({"format": FORMAT, **flat}, sort_keys=True, default=repr)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def _digest(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=32).hexdigest()


class StageCache:
    """``root/<key>.pt``: a finished stage; ``root/<key>.progress.pt``: the last finished epoch of a running one."""

    def __init__(self, root: str) -> None:
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str, kind: str) -> str:
        return os.path.join(self.root, f"{key}.{kind}.pt" if kind else f"{key}.pt")

    def load(self, key: str, kind: str = "") -> Optional[dict]:
        """The payload saved under ``key``, or None (absent, unreadable, tampered or not finite: logged)."""
        path = self._path(key, kind)
        if not os.path.exists(path):
            return None
        try:
            payload = self._read(path)
        except Exception as exc:  # a torn, tampered or foreign file: ignore it, the stage retrains
            log.warning("ignoring unreadable stage file %s (%s); the stage trains again", path, exc)
            return None
        if not _finite(payload):
            log.warning("ignoring stage file %s: it holds non-finite values; the stage trains again", path)
            return None
        return payload

    @staticmethod
    def _read(path: str) -> dict:
        with open(path, "rb") as f:
            magic, want, blob = f.readline(), f.readline().strip().decode("ascii", "replace"), f.read()
        if magic != MAGIC:
            raise ValueError(f"not a {MAGIC.strip().decode()} file (written by another pystage version?)")
        if _digest(blob) != want:
            raise ValueError(f"checksum mismatch: the file was changed after it was written (blake2b {want})")
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)

    def save(self, key: str, payload: dict, kind: str = "") -> None:
        buf = io.BytesIO()
        torch.save(payload, buf)
        blob = buf.getvalue()
        path = self._path(key, kind)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + _digest(blob).encode() + b"\n" + blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def discard(self, key: str, kind: str) -> None:
        path = self._path(key, kind)
        if os.path.exists(path):
            os.remove(path)


def _finite(obj: Any) -> bool:
    """Every floating tensor in ``obj`` (nested dicts/lists) is finite."""
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True
