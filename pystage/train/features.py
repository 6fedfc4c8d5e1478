"""The feature-store entries a run builds for its next stages, and how each was built, so a corrupt one is rebuilt.

Keys: an entry built from a dataset is keyed by the dataset's fingerprint; one built from another entry by
that entry's *content digest* (its verified checksums), so features computed from different bytes never
share a key. Reads verify every chunk's CRC; when a read (while training, or while building the next
entry) finds a mismatch, ``repair`` removes the corrupt entry and builds it again from the recipe it was
built with; the entries built from it are rebuilt in turn when their keys (content-derived) change.
In a process group each rank builds its own shard (``distributed.build_shards``; shards of the next
stage are keyed by the world-size-independent manifest id) and a corrupt shard stops the run: a
restart verifies and rebuilds it.

An entry that fits the store's device budget is built into memory on the training device and the next stage
reads it from there; its disk copy is written in the background while that stage trains (the store's
``disk_copy="auto"``), and ``wait()`` (``fit`` calls it before returning) blocks until every copy is
published. Once the entries of the next stage are built from an entry, its rows in memory are released
(a repair reads its file).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from pystage import distributed
from pystage.store import FeatureStore, StoreCorruptError, StoreEntry, dataset_fingerprint

log = logging.getLogger(__name__)
MAX_REPAIRS = 3


@dataclass
class _Recipe:
    key: Any  # the StoreKey
    module: nn.Module
    data: Any  # a Dataset, or the entry it was built from


def upstream_of(data: Any) -> str:
    """What a key built from ``data`` hashes: an entry's content digest, a ShardSet's manifest id, a dataset's
    fingerprint."""
    from pystage.store.shards import ShardSet

    if isinstance(data, StoreEntry):
        return data.content_digest
    if isinstance(data, ShardSet):
        return data.key  # the manifest id (distributed.build_shards sets it): the same in every world size
    return dataset_fingerprint(data)


class FeatureChain:
    """Builds (and on corruption rebuilds) the entries of ``store`` that later stages read."""

    def __init__(self, store: FeatureStore, dtype: torch.dtype, batch_size: int, device: torch.device,
                 progress: bool) -> None:
        self.store, self.dtype, self.batch_size, self.device, self.progress = store, dtype, batch_size, device, progress
        self._recipes: dict[str, _Recipe] = {}  # by entry path
        self._latest: dict[str, Any] = {}  # entry path -> the entry object built last
        # on the CPU a build runs at the training batch size: its activations stay in cache (2x faster than 256
        # rows for the paper's stage 1 here); a GPU wants large batches
        self.build_batch = batch_size if torch.device(device).type == "cpu" else max(batch_size, 256)
        copy = store.config.disk_copy
        self.disk_copy = "background" if copy == "auto" else copy

    def build(self, module: nn.Module, inputs: tuple[Any, ...], splits: tuple[str, ...] = ("train", "val"),
              extra: Any = None) -> tuple[tuple[Any, ...], float]:
        """The entries of ``module``'s features over each input (None stays None), and the seconds it took."""
        t = time.perf_counter()
        out = []
        for split, data in zip(splits, inputs):
            if data is None:
                out.append(None)
            elif distributed.world().active:
                out.append(distributed.build_shards(self.store, upstream_of(data), module, data, split, self.dtype,
                                                    self.build_batch, self.device, self.progress))
            else:
                key = self.store.key(upstream=upstream_of(data), module=module, dtype=self.dtype, split=split,
                                     extra=extra)
                out.append(self._build(_Recipe(key, module, data)))
        for data in inputs:  # read once, by this build: their rows need not stay in memory
            if isinstance(data, StoreEntry):
                self.latest(data).release_buffers()
        return tuple(out), time.perf_counter() - t

    def wait(self) -> None:
        """Block until every entry this chain built is on disk (unless built with ``disk_copy="never"``); a disk copy
        that failed (a full disk) is logged: the run used the rows in memory."""
        for entry in self._latest.values():
            if isinstance(entry, StoreEntry):
                try:
                    entry.wait()
                except OSError as e:  # a full disk: training read the rows from memory; a later run builds again
                    log.warning("the disk copy of %s was not written: %s; the features were used from memory and "
                                "are not stored for another run", entry.path, e)

    def _build(self, recipe: _Recipe) -> Any:
        for attempt in range(MAX_REPAIRS + 1):
            try:
                entry = self.store.build(recipe.key, recipe.module, self.latest(recipe.data),
                                         batch_size=self.build_batch, device=self.device,
                                         storage_dtype=self.dtype, progress=self.progress, disk_copy=self.disk_copy)
                break
            except StoreCorruptError as e:  # the entry it reads from is corrupt: rebuild that one, then this
                if attempt == MAX_REPAIRS or not self.repair(e):
                    raise
        self._recipes[entry.path], self._latest[entry.path] = recipe, entry
        return entry

    def latest(self, data: Any) -> Any:
        """``data``, or the entry that replaced it if it was rebuilt."""
        path = getattr(data, "path", None)
        return self._latest.get(path, data) if path is not None else data

    def repair(self, exc: StoreCorruptError) -> bool:
        """Remove and rebuild the entry ``exc`` names, if this chain built it; False if it did not."""
        recipe = self._recipes.get(exc.path)
        if recipe is None or distributed.world().active:
            return False
        log.warning("%s; removing it and building it again", exc)
        self.store.remove(recipe.key)
        self._build(recipe)
        return True


def rebuilt(chain: Optional[FeatureChain], inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """``inputs`` with every entry that was rebuilt replaced by its new one."""
    return inputs if chain is None else tuple(chain.latest(d) if d is not None else None for d in inputs)
