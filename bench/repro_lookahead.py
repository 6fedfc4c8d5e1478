"""Reproduction 'lookahead' (pystage/bench/repro/lookahead.py); the same as `pystage-bench repro lookahead [--json PATH]`."""
import argparse
import sys

from pystage.bench import repro

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/repro_lookahead.py", description=repro.NAMES["lookahead"])
    repro.add_arguments(parser)
    sys.exit(repro.run(parser.parse_args(["lookahead", *sys.argv[1:]])))
