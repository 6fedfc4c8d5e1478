"""Reproduction 'sine' (pystage/bench/repro/sine.py); the same as `pystage-bench repro sine [--json PATH]`."""
import argparse
import sys

from pystage.bench import repro

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/repro_sine.py", description=repro.NAMES["sine"])
    repro.add_arguments(parser)
    sys.exit(repro.run(parser.parse_args(["sine", *sys.argv[1:]])))
