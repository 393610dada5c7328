"""Disaggregated vLLM against colocated vLLM on the same cores: TTFT and throughput from one run.

    python tools/bench_vllm.py [--lengths 130 514] [--reps 5] [--requests 16] [--concurrency 8]

Runs two clusters one after the other (each vLLM engine needs ~4 GiB and the cores to itself):
  colocated  one vLLM node doing prefill and decode, on every core              (the baseline)
  disagg     a vLLM prefill node on the first half of the cores and a vLLM decode node on the rest,
             KV handed over by the GswarmConnector through the store
Each gets the same seeded token-id prompts (no downloads):
  1. low load: one request at a time (idle gap before each), per prompt length: median TTFT and
     time per output token, measured at the client (through the coordinator);
  2. load: ``--requests`` requests of the given lengths, ``--concurrency`` in flight: output tokens
     per second, requests per second, median and p90 TTFT, median time per output token.
Prints both tables and one summary line per setup.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from pdgrpc.bench.cluster import free_base
from pdgrpc.client import Client
from pdgrpc.types import GenerateDelta, GenerateFinal

_TAKEN: set[int] = set()


class Cluster:
    def __init__(self, name: str, mode: str, cores: list[int], dtype: str) -> None:
        half = max(len(cores) // 2, 1)
        self.name, self.base = name, free_base(_TAKEN)
        text = f'port_base = {self.base}\nmode = "{mode}"\n[defaults]\nengine = "vllm"\ndtype = "{dtype}"\n'
        if mode == "colocated":
            text += f"[[colocated]]\ncpus = {cores}\n"
        else:
            text += f"[[prefill]]\ncpus = {cores[:half]}\n[[decode]]\ncpus = {cores[half:] or cores}\n"
        self.file = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        self.file.write(text)
        self.file.close()
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pdgrpc", "up", "--config", self.file.name],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        if not self.ready.wait(600):
            self.stop()
            raise SystemExit(f"{name}: the cluster did not start")
        self.start_s = time.monotonic() - t0
        self.client = Client(f"127.0.0.1:{self.base}")

    def _watch(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("cluster ready"):
                self.ready.set()

    def request(self, ids: list[int], max_tokens: int) -> tuple[float, float, int]:
        """(TTFT, total seconds, completion tokens) of one request, read to the end."""
        t0 = time.perf_counter()
        ttft, n = None, 0
        for ev in self.client.generate(token_ids=ids, max_tokens=max_tokens, ignore_eos=True):
            if isinstance(ev, GenerateDelta) and ttft is None:
                ttft = time.perf_counter() - t0
            elif isinstance(ev, GenerateFinal):
                n = ev.completion_tokens
        if ttft is None:
            raise RuntimeError("no token")
        return ttft, time.perf_counter() - t0, n

    def stop(self) -> None:
        if getattr(self, "client", None):
            self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.file.name)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run(cluster: Cluster, args, rng_seed: int = 0) -> dict:
    rng = random.Random(rng_seed)
    prompt = lambda n: [rng.randrange(3, args.vocab) for _ in range(n)]  # noqa: E731
    cluster.request(prompt(8), 4)  # warm every path once
    low: dict[int, tuple[float, float]] = {}
    for n in args.lengths:
        ttfts, tpots = [], []
        for _ in range(args.reps):
            time.sleep(args.gap_s)
            ttft, total, k = cluster.request(prompt(n), args.max_tokens)
            ttfts.append(ttft)
            tpots.append((total - ttft) / max(k - 1, 1))
        low[n] = (statistics.median(ttfts), statistics.median(tpots))
    prompts = [prompt(args.lengths[i % len(args.lengths)]) for i in range(args.requests)]
    time.sleep(args.gap_s)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda ids: cluster.request(ids, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tpots = [(r[1] - r[0]) / max(r[2] - 1, 1) for r in results]
    return {"low": low, "tok_s": sum(r[2] for r in results) / wall, "req_s": len(results) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": _pct(ttfts, 0.9),
            "tpot_p50": statistics.median(tpots), "wall": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[130, 514])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this")
    parser.add_argument("--gap-s", type=float, default=1.5, help="idle time before each low-load request")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    subprocess.run([sys.executable, "-m", "pdgrpc", "model", "prepare", "--dtype", args.dtype], check=True,
                   stdout=subprocess.DEVNULL)
    out: dict[str, dict] = {}
    for name, mode in (("colocated", "colocated"), ("disagg", "disaggregated")):
        print(f"starting {name} ({mode}, vLLM, {args.dtype}, cores {cores}) ...", flush=True)
        cluster = Cluster(name, mode, cores, args.dtype)
        try:
            print(f"  ready in {cluster.start_s:.0f} s; measuring", flush=True)
            out[name] = run(cluster, args)
        finally:
            cluster.stop()
    c, d = out["colocated"], out["disagg"]
    print(f"\nvLLM {args.dtype}, SmolLM2-135M-Instruct, {len(cores)} cores; disagg = prefill on "
          f"{cores[:max(len(cores) // 2, 1)]}, decode on {cores[max(len(cores) // 2, 1):] or cores}; "
          f"{args.max_tokens} output tokens per request")
    print(f"\n1. one request at a time, median of {args.reps}")
    print(f"{'prompt tokens':>13} | {'TTFT colocated':>14} | {'TTFT disagg':>11} | {'ratio':>5} | "
          f"{'TPOT colocated':>14} | {'TPOT disagg':>11}")
    for n in args.lengths:
        (tc, pc), (td, pd) = c["low"][n], d["low"][n]
        print(f"{n:>13} | {tc * 1000:>11.0f} ms | {td * 1000:>8.0f} ms | {td / tc:>5.2f} | "
              f"{pc * 1000:>11.1f} ms | {pd * 1000:>8.1f} ms")
    print(f"\n2. {args.requests} requests ({'/'.join(map(str, args.lengths))} prompt tokens), "
          f"{args.concurrency} in flight")
    print(f"{'setup':>10} | {'output tok/s':>12} | {'req/s':>6} | {'TTFT p50':>9} | {'TTFT p90':>9} | "
          f"{'TPOT p50':>9}")
    for name, r in out.items():
        print(f"{name:>10} | {r['tok_s']:>12.1f} | {r['req_s']:>6.2f} | {r['ttft_p50'] * 1000:>6.0f} ms | "
              f"{r['ttft_p90'] * 1000:>6.0f} ms | {r['tpot_p50'] * 1000:>6.1f} ms")
    print(f"\nsummary: throughput disagg/colocated {d['tok_s'] / c['tok_s']:.2f}x; TTFT at low load disagg/colocated "
          + ", ".join(f"{d['low'][n][0] / c['low'][n][0]:.2f}x ({n} tokens)" for n in args.lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
