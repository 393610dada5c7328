"""`python -m pdgrpc.bench serve|kv|coordinator ...` (the same as `pdgrpc bench ...`)."""

import argparse
import sys

from pdgrpc.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pdgrpc bench", description="benchmarks of pdgrpc")
    add_arguments(parser)
    sys.exit(int(main(parser.parse_args()) or 0))
