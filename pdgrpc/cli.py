"""The `pdgrpc` console script: one subcommand per process kind plus tools."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help); each module has add_arguments(parser) and main(args) -> int.
# Modules are imported only when their subcommand runs, so `pdgrpc generate` stays light.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "kvstore": ("pdgrpc.kvstore.server", "run the gswarm-compatible KV data store"),
    "prefill": ("pdgrpc.nodes.prefill_main", "run a prefill node"),
    "decode": ("pdgrpc.nodes.decode_main", "run a decode node"),
    "colocated": ("pdgrpc.nodes.colocated_main", "run a node doing prefill and decode in one process"),
    "coordinator": ("pdgrpc.coordinator.main", "run the coordinator"),
    "up": ("pdgrpc.launcher", "start a whole local cluster as separate processes"),
    "generate": ("pdgrpc.generate_cli", "send a prompt to a coordinator and stream the answer"),
    "status": ("pdgrpc.status_cli", "print the nodes as a coordinator sees them (role, host, health, load, KV)"),
    "model": ("pdgrpc.model_prep", "prepare a model folder (pdgrpc model prepare)"),
    "bench": ("pdgrpc.bench", "benchmarks: serve (goodput under SLO), kv (hand-off paths), coordinator"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdgrpc", description="prefill/decode disaggregated LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily below, only for the chosen subcommand.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from pdgrpc.launcher_env import die_with_parent_from_env

    die_with_parent_from_env()  # only when started by `pdgrpc up`
    parser = build_parser()
    if argv and argv[0] in SUBCOMMANDS:
        module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
        sub = argparse.ArgumentParser(prog=f"pdgrpc {argv[0]}", description=SUBCOMMANDS[argv[0]][1])
        module.add_arguments(sub)
        return int(module.main(sub.parse_args(argv[1:])) or 0)
    parser.parse_args(argv)  # prints usage / errors for unknown commands
    return 2


if __name__ == "__main__":
    sys.exit(main())
