"""The ``pystage-bench`` command: one sub-command per benchmark module.

Each module in ``JOBS`` defines ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

# sub-command -> (module, one-line help); the first entry is the default job.
JOBS = {
    "train": ("pystage.bench.train", "the methods side by side: wall time, peak memory, accuracy (default job)"),
    "layers": ("pystage.bench.layers", "masked vs dense vs hook vs composed backward of conv/linear layers"),
    "store": ("pystage.bench.store", "feature store: shuffled streaming read vs raw read, write speed, RAM"),
    "plan": ("pystage.bench.plan", "memory planner: split points under a budget; --verify measures each stage's peak"),
    "paper": ("pystage.bench.paper", "the partial-learning paper's CNN1-CNN8 sweep, shared vs independent prefixes"),
    "repro": ("pystage.bench.repro", "growing-network reproductions: sine (capacity), lookahead, pathways"),
}
DEFAULT_JOB = "train"


def build_parser(job: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the selected job's module is imported (each job may pull in heavy dependencies)."""
    parser = argparse.ArgumentParser(prog="pystage-bench", description="pystage benchmarks; each prints a table "
                                     "and writes JSON with --json PATH. Default job: " + DEFAULT_JOB)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="job")
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == job:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = next((a for a in argv if a in JOBS), None)
    if job is None and not any(a in ("-h", "--help") for a in argv):
        job = DEFAULT_JOB
        flags = [a for a in argv if a in ("-v", "--verbose")]
        argv = flags + [job] + [a for a in argv if a not in flags]
    args = build_parser(job).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    module = importlib.import_module(JOBS[args.job][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
