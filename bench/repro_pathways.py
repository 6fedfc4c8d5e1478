"""Reproduction 'pathways' (pystage/bench/repro/pathways.py); the same as `pystage-bench repro pathways [--json PATH]`."""
import argparse
import sys

from pystage.bench import repro

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/repro_pathways.py", description=repro.NAMES["pathways"])
    repro.add_arguments(parser)
    sys.exit(repro.run(parser.parse_args(["pathways", *sys.argv[1:]])))
