"""``python -m pystage.store ls|verify|rm|prune``: manage a feature store from the shell."""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from typing import Optional, Sequence

from pystage.store.errors import StoreError
from pystage.store.sizes import format_size
from pystage.store.store import FeatureStore, default_root


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pystage.store", description="Manage a pystage feature store.")
    p.add_argument("--root", default=None, help=f"store root (default: $PYSTAGE_CACHE or {default_root()})")
    p.add_argument("-v", "--verbose", action="store_true", help="log to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list entries: key, size, rows, shape, dtype, created, last used")
    v = sub.add_parser("verify", help="check every entry's metadata and checksums (exit 1 on a problem)")
    v.add_argument("keys", nargs="*", help="entries to check (default: all)")
    v.add_argument("--remove", action="store_true", help="remove the entries that fail, so the next build redoes them")
    r = sub.add_parser("rm", help="remove entries by key")
    r.add_argument("keys", nargs="+")
    pr = sub.add_parser("prune", help="remove leftovers of killed builds; evict least-recently-used entries")
    pr.add_argument("--disk-budget", default=None, help="e.g. 20GiB (default: keep every complete entry)")
    return p


def _ls(store: FeatureStore) -> int:
    rows = store.ls()
    print(f"{store.directory}: {len(rows)} entries, {format_size(sum(r.size_bytes for r in rows))}")
    for r in rows:
        used = datetime.fromtimestamp(r.last_used).isoformat(sep=" ", timespec="seconds")
        if r.problem:
            print(f"{r.key}  {format_size(r.size_bytes):>9}  CORRUPT: {r.problem}")
        else:
            print(f"{r.key}  {format_size(r.size_bytes):>9}  {r.num_rows:>9} rows  {str(r.feature_shape):<16} "
                  f"{r.dtype:<9} created {r.created}  used {used}")
    return 0


def _verify(store: FeatureStore, keys: Sequence[str], remove: bool) -> int:
    problems = [p for k in keys for p in store.verify(k)] if keys else store.verify()
    for p in problems:
        print(f"BAD {p.path}: {p.what}")
    if remove:
        for key in sorted({p.key for p in problems}):
            store.remove(key)
            print(f"removed {key}")
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        store = FeatureStore(args.root)
        if args.command == "ls":
            return _ls(store)
        if args.command == "verify":
            return _verify(store, args.keys, args.remove)
        if args.command == "rm":
            missing = [k for k in args.keys if not store.remove(k)]
            for k in missing:
                print(f"no entry {k}", file=sys.stderr)
            return 1 if missing else 0
        removed = store.prune(args.disk_budget)
        print(f"removed {len(removed)} entries" + "".join(f"\n  {k}" for k in removed))
        return 0
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
