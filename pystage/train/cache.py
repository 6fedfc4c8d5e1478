"""Trained stages on disk, keyed by content: shared across architectures and resumed after a crash.

A stage's key hashes everything that determines its trained weights: the
upstream key (dataset fingerprint or the previous stage's key), the stage's
architecture and initial weights, its head, the method's input kind, the
training and search configuration, epochs, batch size and seed. Identical
prefixes (e.g. stage 1 of CNN1, CNN6 and CNN8) get identical keys and are
trained once. Files are written to a temporary name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Optional

import torch

from pystage.store.keys import module_digest

FORMAT = 1


def stage_key(**parts: Any) -> str:
    """A stable 32-hex-digit key of ``parts`` (modules are hashed by architecture and weight bytes)."""
    flat = {k: module_digest(v) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
    blob = json.dumps({"format": FORMAT, **flat}, sort_keys=True, default=repr)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


class StageCache:
    """``root/<key>.pt``: a finished stage; ``root/<key>.progress.pt``: the last finished epoch of a running one."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)

    def _path(self, key: str, kind: str) -> str:
        return os.path.join(self.root, f"{key}.{kind}.pt" if kind else f"{key}.pt")

    def load(self, key: str, kind: str = "") -> Optional[dict]:
        path = self._path(key, kind)
        if not os.path.exists(path):
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # a torn or foreign file: ignore it, the stage retrains
            import logging

            logging.getLogger(__name__).warning("ignoring unreadable stage file %s (%s)", path, exc)
            return None

    def save(self, key: str, payload: dict, kind: str = "") -> None:
        path = self._path(key, kind)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
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
