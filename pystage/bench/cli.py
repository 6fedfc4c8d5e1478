"""The ``pystage-bench`` command: one sub-command per benchmark module.

Each module in ``JOBS`` defines ``add_arguments(parser)`` and ``run(args) -> int``. A user error (bad data,
unknown model, bad option, impossible budget: see :mod:`pystage.bench.errors`) prints one line,
``pystage-bench <job>: error: <message>``, and exits with status 2; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from typing import NoReturn, Optional, Sequence

# sub-command -> (module, one-line help); DEFAULT_JOB runs when no job is named.
JOBS = {
    "budget": ("pystage.bench.budget", "a net whose end-to-end training needs >= 4x a memory budget, trained within "
               "it: total vs partial vs checkpoint (default job)"),
    "train": ("pystage.bench.train", "the methods side by side: wall time, training memory, accuracy"),
    "layers": ("pystage.bench.layers", "masked vs dense vs hook vs composed backward of conv/linear layers"),
    "store": ("pystage.bench.store", "feature store: shuffled streaming read vs raw read, write speed, RAM"),
    "plan": ("pystage.bench.plan", "memory planner: split points under a budget; --verify measures each stage's peak"),
    "paper": ("pystage.bench.paper", "the partial-learning paper's CNN1-CNN8 sweep, shared vs independent prefixes"),
    "search": ("pystage.bench.search", "a stage's lr/L2 search: every draw at once (population) vs one at a time vs "
               "one draw"),
    "repro": ("pystage.bench.repro", "growing-network reproductions: sine (capacity), lookahead, pathways"),
}
DEFAULT_JOB = "budget"
USER_ERROR_STATUS = 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message>`` and exit status 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(job: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; only the selected job's module is imported (each job may pull in heavy dependencies)."""
    parser = Parser(prog="pystage-bench", description="pystage benchmarks; each prints a table and writes JSON "
                    "with --json PATH. Default job: " + DEFAULT_JOB)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr; errors with traceback")
    sub = parser.add_subparsers(dest="job")
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == job:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = [a for a in argv if a in ("-v", "--verbose")]  # accepted anywhere: "pystage-bench train -v" too
    argv = [a for a in argv if a not in flags]
    job = next((a for a in argv if a in JOBS), None)
    if job is None and not any(a in ("-h", "--help") for a in argv):
        job = DEFAULT_JOB
        argv = [job] + argv
    argv = flags + argv
    args = build_parser(job).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    module = importlib.import_module(JOBS[args.job][0])
    try:
        return int(module.run(args) or 0)
    except Exception as exc:
        from pystage.bench.errors import user_errors

        if not isinstance(exc, user_errors()):
            raise
        return _user_error(args, str(exc))


def _user_error(args: argparse.Namespace, message: str) -> int:
    """Print the one-line error (after the traceback with ``-v``); the exit status."""
    if args.verbose:
        traceback.print_exc()
        child = getattr(sys.exc_info()[1], "child_traceback", "")
        if child:
            print(f"in the worker process:\n{child}", file=sys.stderr, end="")
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"pystage-bench {args.job}: error: {one_line}", file=sys.stderr)
    return USER_ERROR_STATUS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
