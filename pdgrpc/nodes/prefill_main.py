"""`pdgrpc prefill`: run a prefill node."""

from pdgrpc.nodes.server import add_node_arguments, run_node
from pdgrpc.types import Role


def add_arguments(parser) -> None:
    add_node_arguments(parser, Role.PREFILL)


def main(args) -> int:
    return run_node(args, Role.PREFILL)
