"""Sharded entries: a manifest naming one world's shard keys, and reading global rows across the shard files.

A split built by ``count`` processes is ``count`` ordinary entries, each made with
``shard=(index, count)`` (so the shard is in its key and in its metadata) and
holding the contiguous source rows ``shard_range(N, (index, count))``. The
manifest ``<directory>/<id>.shards.json`` (``id``: a key that does not depend on
the world size) lists them; it is written by one process after every shard is
built. A manifest or a shard of another world size is never mixed in: opening
checks ``world_size``, every shard's ``shard`` metadata and its row range.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from pystage.store.build import shard_range
from pystage.store.entry import StoreEntry
from pystage.store.errors import StoreError

MANIFEST_SUFFIX = ".shards.json"
MANIFEST_FORMAT = 1


class StoreShardError(StoreError):
    """A shard or manifest that belongs to another world size (or another row split) than the one asked for."""

    def __init__(self, path: str, what: str, got: Any, expected: Any) -> None:
        self.path, self.what, self.got, self.expected = path, what, got, expected
        super().__init__(f"{path}: {what} is {got!r}, expected {expected!r}; shards of different world sizes are "
                         "never mixed: build the shards for this world size (pystage.distributed does it)")


def manifest_path(directory: str, manifest_id: str) -> str:
    return os.path.join(directory, manifest_id + MANIFEST_SUFFIX)


def check_shard_entry(entry: StoreEntry, index: int, count: int, source_rows: int) -> None:
    """StoreShardError unless ``entry`` is shard ``(index, count)`` of ``source_rows`` rows."""
    shard = entry.meta.get("shard")
    if shard is None or list(shard) != [index, count]:
        raise StoreShardError(entry.path, "shard (index, world size)", shard, [index, count])
    start, stop = shard_range(source_rows, (index, count))
    if entry.num_rows != stop - start:
        raise StoreShardError(entry.path, f"rows of shard {index}/{count} of {source_rows}", entry.num_rows,
                              stop - start)


def write_manifest(directory: str, manifest_id: str, keys: Sequence[str], rows: Sequence[int]) -> str:
    """Write the manifest (temporary file, then rename); returns its path."""
    path = manifest_path(directory, manifest_id)
    body = {"format": MANIFEST_FORMAT, "id": manifest_id, "world_size": len(keys), "num_rows": int(sum(rows)),
            "shards": [{"index": i, "key": str(k), "rows": int(r)} for i, (k, r) in enumerate(zip(keys, rows))]}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(directory: str, manifest_id: str, world_size: Optional[int] = None) -> Optional[dict[str, Any]]:
    """The manifest, or None if there is none; StoreShardError if it was written for another world size."""
    path = manifest_path(directory, manifest_id)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        body = json.load(f)
    if world_size is not None and body.get("world_size") != world_size:
        raise StoreShardError(path, "world_size", body.get("world_size"), world_size)
    return body


class ShardSet(Dataset):
    """The shard entries of one split, in index order, read as one dataset of ``num_rows`` global rows.

    Global row ``g`` lives in the shard whose row range holds it. ``rows(indices)`` reads any rows: from RAM when
    all shards fit half of ``ram_budget`` (loaded and verified once), else by reading the chunks that hold them,
    each chunk's CRC verified.
    ``__getitems__`` lets a DataLoader (and ``build``) fetch a batch in one call.
    """

    def __init__(self, entries: Sequence[StoreEntry], ram_budget: int) -> None:
        self.entries, self.ram_budget = list(entries), ram_budget
        count = len(self.entries)
        self.num_rows = sum(e.num_rows for e in self.entries)
        for i, e in enumerate(self.entries):
            check_shard_entry(e, i, count, self.num_rows)
        self.starts = np.array([shard_range(self.num_rows, (i, count))[0] for i in range(count)] + [self.num_rows])
        self.meta = self.entries[0]._meta
        self.nbytes = sum(e.nbytes for e in self.entries)
        self._resident: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> its rows, loaded when first read

    def __len__(self) -> int:
        return self.num_rows

    @property
    def content_digest(self) -> str:
        """Hash of every shard's content digest, in index order (what the shards hold, verified as read)."""
        import hashlib

        return hashlib.blake2b("".join(e.content_digest for e in self.entries).encode(), digest_size=16).hexdigest()

    def rows(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(len(indices), *feature_shape)`` (in the stored dtype, as served) and labels of global rows;
        every chunk they come from has its CRC verified (StoreCorruptError names the file and chunk)."""
        m = self.meta
        x = np.empty((len(indices), *m.feature_shape), m.stored_dtype)
        y = np.empty((len(indices), *m.label_shape), m.label_dtype)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            at = np.nonzero(shard_of == s)[0]
            local = indices[at] - self.starts[s]
            if self.nbytes <= self.ram_budget // 2:  # all shards fit half the budget: each loaded (and verified) once
                if s not in self._resident:
                    self._resident[int(s)] = self.entries[int(s)].host_rows()
                fx, fy = self._resident[int(s)]
                x[at], y[at] = fx[local], fy[local]
            else:
                x[at], y[at] = _verified_rows(self.entries[int(s)]._meta, local)
        if m.dtype == torch.bfloat16:  # stored as raw uint16 bits
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16), torch.from_numpy(y)
        return torch.from_numpy(x), torch.from_numpy(y)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.rows(np.asarray(indices, dtype=np.int64))  # one read; the DataLoader's collate stacks the rows
        return list(zip(x, y))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.rows(np.array([i], dtype=np.int64))
        return x[0], y[0]


def _verified_rows(meta: Any, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``local`` of one entry: each chunk holding any of them is read whole and its CRC checked."""
    from pystage.store.scatter import ScatterReader
    from pystage.store.window import Buffers, aligned_empty

    cr = meta.chunk_rows
    x = np.empty((len(local), *meta.feature_shape), meta.stored_dtype)
    y = np.empty((len(local), *meta.label_shape), meta.label_dtype)
    bufs = Buffers(aligned_empty((cr, *meta.feature_shape), meta.stored_dtype),
                   aligned_empty((cr, *meta.label_shape), meta.label_dtype))
    chunk = local // cr
    reader = ScatterReader(meta, check=True)
    try:
        for c in np.unique(chunk):
            a, b = int(c) * cr, min((int(c) + 1) * cr, meta.num_rows)
            reader.read(a, b, bufs)
            sel = np.nonzero(chunk == c)[0]
            x[sel], y[sel] = bufs.x[local[sel] - a], bufs.y[local[sel] - a]
    finally:
        reader.close()
    return x, y
