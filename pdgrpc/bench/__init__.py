"""`pdgrpc bench`: benchmarks with their numbers written to JSON (and PNG plots for `serve`).

  serve        latency (TTFT, TPOT, ITL, end-to-end) and goodput vs request rate, disaggregated vs
               colocated on the same cores (pdgrpc.bench.serve)
  kv           KV hand-off time and bandwidth per store path beside memcpy (pdgrpc.bench.kv)
  coordinator  the highest request rate the coordinator sustains with zero-cost mock engines
               (pdgrpc.bench.coordinator)
  slo-scale    goodput as the SLOs tighten, recomputed from a saved `serve` run (pdgrpc.bench.slo_scale)
  openai       `vllm bench serve` against pdgrpc's OpenAI front and vLLM's own disaggregated serving, and
               the HTTP front's TTFT overhead against gRPC (pdgrpc.bench.openai_front)
"""

from __future__ import annotations

import importlib

# sub-subcommand -> (module, help); modules load only when their benchmark runs.
BENCHMARKS = {
    "serve": ("pdgrpc.bench.serve", "latency and goodput vs request rate, disaggregated vs colocated"),
    "kv": ("pdgrpc.bench.kv", "KV hand-off bandwidth per store path vs memcpy"),
    "coordinator": ("pdgrpc.bench.coordinator", "coordinator overhead with zero-cost mock engines"),
    "slo-scale": ("pdgrpc.bench.slo_scale", "goodput as the SLOs tighten, from a saved serve run"),
    "openai": ("pdgrpc.bench.openai_front", "vllm bench serve: pdgrpc's OpenAI front vs vLLM's split; HTTP vs gRPC"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="{serve,kv,coordinator,slo-scale,openai}")
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=importlib.import_module(module).__doc__,
                           formatter_class=_formatter())
        importlib.import_module(module).add_arguments(p)


def _formatter():
    import argparse

    return argparse.RawDescriptionHelpFormatter


def main(args) -> int:
    return int(importlib.import_module(BENCHMARKS[args.bench][0]).main(args) or 0)
