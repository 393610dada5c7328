"""`pdgrpc colocated`: run a node that does prefill and decode in one process (the baseline)."""

from pdgrpc.nodes.server import add_node_arguments, run_node
from pdgrpc.types import Role


def add_arguments(parser) -> None:
    add_node_arguments(parser, Role.COLOCATED)


def main(args) -> int:
    return run_node(args, Role.COLOCATED)
