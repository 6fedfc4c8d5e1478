"""``pystage-bench repro NAME``: one paper reproduction per module (sine, lookahead, pathways).

Each module defines ``add_arguments(parser)`` and ``run(args) -> dict`` returning ``{"rows": [...], ...}``;
every row has ``variant``, ``metric``, ``mean``, ``std`` and ``seeds``.
"""
from __future__ import annotations

import argparse
import importlib

from pystage.bench.repro.common import finish

NAMES = {
    "sine": "dynamic capacity on sine regression: fixed 100 vs fixed 500 vs adaptive (thesis Table 5.2)",
    "lookahead": "incremental training: look-ahead vs random init vs end-to-end (Istrate et al., Table 2)",
    "pathways": "skip pathways: concat / sum vs baseline on a deep plain CNN (Gil, Table 1)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(NAMES), help="; ".join(f"{k}: {v}" for k, v in NAMES.items()))
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (mean and std over them)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the module's)")
    parser.add_argument("--path", default=None, help="CIFAR-10 folder (lookahead/pathways); synthetic data without")
    parser.add_argument("--md", default=None, help="markdown table path (default: bench/results/repro_<name>.md)")
    parser.add_argument("--json", default=None, help="write rows and environment as JSON to this path")
    parser.add_argument("--threads", type=int, default=1, 
                        help="torch intra-op threads (1: tiny ops on a shared machine)")
    for name in NAMES:  # each reproduction's own options (named after it in their help)
        importlib.import_module(f"pystage.bench.repro.{name}").add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    result = importlib.import_module(f"pystage.bench.repro.{args.name}").run(args)
    finish(args, result)
    return 0
