"""Disaggregated vLLM against colocated vLLM on the same cores: TTFT and throughput from one run.

    python tools/bench_vllm.py [--lengths 130 514] [--reps 5] [--requests 16] [--concurrency 8]
                               [--no-peer] [--no-peer-load] [--no-load]

Runs the setups one after the other (each vLLM engine needs ~4 GiB and the cores to itself):
  colocated           one vLLM node doing prefill and decode, on every core     (the baseline)
  disagg              a vLLM prefill node on the first half of the cores and a vLLM decode node on
                      the rest, KV handed over by the GswarmConnector through the store
  vllm-native-disagg  vLLM's own disaggregated serving with the same pinning: a producer
                      `vllm serve` on the first half, a consumer on the rest, vLLM's ExampleConnector
                      and a proxy (pdgrpc.bench.vllm_peer); on by default, ``--no-peer`` skips it
Each gets the same seeded token-id prompts (no downloads):
  1. low load: one request at a time (idle gap before each), per prompt length: median TTFT and
     time per output token, measured at the client (through the coordinator);
  2. load: ``--requests`` requests of the given lengths, ``--concurrency`` in flight: output tokens
     per second, requests per second, median and p90 TTFT, median time per output token.
Prints both tables, then pdgrpc disagg against vLLM's native disaggregated serving per prompt length
(ratio = vLLM native TTFT / pdgrpc TTFT: above 1 pdgrpc is faster), and a summary line.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from pdgrpc.bench.cluster import free_base, split_cores
from pdgrpc.client import Client
from pdgrpc.types import GenerateDelta, GenerateFinal

_TAKEN: set[int] = set()
PEER = "vllm-native-disagg"
Request = Callable[[list[int], int], tuple[float, float, int]]  # (ids, max_tokens) -> (TTFT, total, tokens)


class Cluster:
    def __init__(self, name: str, mode: str, cores: list[int], dtype: str) -> None:
        prefill, decode = split_cores(cores)
        self.name, self.base = name, free_base(_TAKEN)
        text = f'port_base = {self.base}\nmode = "{mode}"\n[defaults]\nengine = "vllm"\ndtype = "{dtype}"\n'
        if mode == "colocated":
            text += f"[[colocated]]\ncpus = {cores}\n"
        else:
            text += f"[[prefill]]\ncpus = {prefill}\n[[decode]]\ncpus = {decode}\n"
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


def run(request: Request, args, load: bool = True, rng_seed: int = 0) -> dict:
    rng = random.Random(rng_seed)
    prompt = lambda n: [rng.randrange(3, args.vocab) for _ in range(n)]  # noqa: E731
    request(prompt(8), 4)  # warm every path once
    low: dict[int, tuple[float, float]] = {}
    for n in args.lengths:
        ttfts, tpots = [], []
        for _ in range(args.reps):
            time.sleep(args.gap_s)
            ttft, total, k = request(prompt(n), args.max_tokens)
            ttfts.append(ttft)
            tpots.append((total - ttft) / max(k - 1, 1))
        low[n] = (statistics.median(ttfts), statistics.median(tpots))
    if not load:
        return {"low": low}
    prompts = [prompt(args.lengths[i % len(args.lengths)]) for i in range(args.requests)]
    time.sleep(args.gap_s)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda ids: request(ids, args.max_tokens), prompts))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tpots = [(r[1] - r[0]) / max(r[2] - 1, 1) for r in results]
    return {"low": low, "tok_s": sum(r[2] for r in results) / wall, "req_s": len(results) / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p90": _pct(ttfts, 0.9),
            "tpot_p50": statistics.median(tpots), "wall": wall}


def run_peer(cores: list[int], args) -> dict:
    """vLLM's own disaggregated serving, pinned as pdgrpc's disagg setup, through the same measurements."""
    from pdgrpc.bench.vllm_peer import VllmNativeDisagg, time_request

    prefill, decode = split_cores(cores)
    print(f"starting {PEER} (vLLM producer on cores {prefill}, consumer on {decode}, ExampleConnector, "
          f"proxy) ...", flush=True)
    with VllmNativeDisagg(prefill, decode, dtype=args.dtype) as peer:
        print(f"  ready in {peer.start_s:.0f} s; measuring", flush=True)
        out = run(lambda ids, k: time_request(peer.url, ids, k), args, load=args.load and args.peer_load)
        out["kv_loads"] = peer.kv_loads()
    return out


def print_low_load(lengths: list[int], a: tuple[str, dict], b: tuple[str, dict]) -> None:
    """Median TTFT and TPOT of two setups per prompt length, and TTFT(b) / TTFT(a)."""
    (na, ra), (nb, rb) = a, b
    wa, wb = len(na) + 5, len(nb) + 5
    print(f"{'prompt tokens':>13} | {'TTFT ' + na:>{wa}} | {'TTFT ' + nb:>{wb}} | {'ratio':>5} | "
          f"{'TPOT ' + na:>{wa}} | {'TPOT ' + nb:>{wb}}")
    for n in lengths:
        (ta, pa), (tb, pb) = ra[n], rb[n]
        print(f"{n:>13} | {ta * 1000:>{wa - 3}.0f} ms | {tb * 1000:>{wb - 3}.0f} ms | {tb / ta:>5.2f} | "
              f"{pa * 1000:>{wa - 3}.1f} ms | {pb * 1000:>{wb - 3}.1f} ms")


def print_peer(out: dict, args) -> None:
    d, v = out["disagg"], out[PEER]
    print(f"\n3. pdgrpc disagg vs {PEER} (vLLM's own P/D split, same pinning), one request at a time, "
          f"median of {args.reps}; ratio = vLLM native / pdgrpc (target >= 1.5)")
    print_low_load(args.lengths, ("pdgrpc", d["low"]), ("vLLM native", v["low"]))
    requests = 1 + len(args.lengths) * args.reps + (args.requests if "tok_s" in v else 0)
    print(f"({PEER}: the consumer loaded the prompt KV from the producer's files for {v['kv_loads']} of "
          f"{requests} requests)")


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
    parser.add_argument("--peer", action=argparse.BooleanOptionalAction,
                        default=importlib.util.find_spec("vllm") is not None,
                        help=f"also run {PEER}: vLLM's own disaggregated serving with the same pinning")
    parser.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                        help="run the load phase (table 2)")
    parser.add_argument("--peer-load", action=argparse.BooleanOptionalAction, default=True,
                        help=f"run the load phase on {PEER} too")
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
            out[name] = run(cluster.request, args, load=args.load)
        finally:
            cluster.stop()
    if args.peer:
        out[PEER] = run_peer(cores, args)
    c, d = out["colocated"], out["disagg"]
    prefill, decode = split_cores(cores)
    print(f"\nvLLM {args.dtype}, SmolLM2-135M-Instruct, {len(cores)} cores; disagg = prefill on "
          f"{prefill}, decode on {decode}; {args.max_tokens} output tokens per request")
    print(f"\n1. one request at a time, median of {args.reps}")
    print_low_load(args.lengths, ("colocated", c["low"]), ("disagg", d["low"]))
    loaded = {name: r for name, r in out.items() if "tok_s" in r}
    if loaded:
        print(f"\n2. {args.requests} requests ({'/'.join(map(str, args.lengths))} prompt tokens), "
              f"{args.concurrency} in flight")
        print(f"{'setup':>18} | {'output tok/s':>12} | {'req/s':>6} | {'TTFT p50':>9} | {'TTFT p90':>9} | "
              f"{'TPOT p50':>9}")
        for name, r in loaded.items():
            print(f"{name:>18} | {r['tok_s']:>12.1f} | {r['req_s']:>6.2f} | {r['ttft_p50'] * 1000:>6.0f} ms | "
                  f"{r['ttft_p90'] * 1000:>6.0f} ms | {r['tpot_p50'] * 1000:>6.1f} ms")
    if PEER in out:
        print_peer(out, args)
    summary = []
    if "tok_s" in c and "tok_s" in d:
        summary.append(f"throughput disagg/colocated {d['tok_s'] / c['tok_s']:.2f}x")
    summary.append("TTFT at low load disagg/colocated "
                   + ", ".join(f"{d['low'][n][0] / c['low'][n][0]:.2f}x ({n} tokens)" for n in args.lengths))
    if PEER in out:
        v = out[PEER]
        summary.append(f"TTFT at low load {PEER}/disagg "
                       + ", ".join(f"{v['low'][n][0] / d['low'][n][0]:.2f}x ({n} tokens)" for n in args.lengths))
    print("\nsummary: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
