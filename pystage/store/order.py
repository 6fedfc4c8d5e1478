"""The row order of one epoch of ``StoreEntry.stream``, as an array: what a sharded reader must reproduce.

``stream(batch_size=B, shuffle, seed, epoch)`` serves the rows of an entry in an
order that depends only on (entry geometry, ram budget, B, seed, epoch): the
chunk-aligned blocks are permuted by ``default_rng((seed, epoch, 0))``, grouped
into windows (or one resident window), and each window's rows are permuted by
``default_rng((seed, epoch, 1))`` in window order; batches are consecutive runs
of B rows of that sequence. ``epoch_order`` computes the same sequence without
reading the file, so the rows of several shard files can be served in exactly
the order one unsharded entry of the same rows would be (tests/test_distributed.py
checks it against the stream).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from pystage.store.format import EntryMeta
from pystage.store.stream import StreamOptions, _blocks, _windows, plan_stream


def global_meta(shard: EntryMeta, num_rows: int) -> EntryMeta:
    """The geometry of one entry holding ``num_rows`` rows shaped like ``shard``'s (what an unsharded build writes)."""
    return replace(shard, num_rows=num_rows, path="<sharded>", attrs={})


def epoch_order(meta: EntryMeta, ram_budget: int, batch_size: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """Row indices ``(N,)`` in the order one epoch of ``stream(batch_size, shuffle, seed, epoch)`` serves them."""
    opts = StreamOptions(batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch)
    plan = plan_stream(meta, ram_budget, batch_size, 1)
    blocks = _blocks(meta, plan, opts, np.random.default_rng((seed, epoch, 0)))
    rows_rng = np.random.default_rng((seed, epoch, 1))
    groups = [blocks] if plan.resident else _windows(blocks, plan.window_rows)
    parts = []
    for group in groups:
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in group]) if group else np.empty(0, np.int64)
        parts.append(rows[rows_rng.permutation(len(rows))] if shuffle else rows)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)
