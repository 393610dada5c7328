"""`pdgrpc decode`: run a decode node."""

from pdgrpc.nodes.server import add_node_arguments, run_node
from pdgrpc.types import Role


def add_arguments(parser) -> None:
    add_node_arguments(parser, Role.DECODE)


def main(args) -> int:
    return run_node(args, Role.DECODE)
