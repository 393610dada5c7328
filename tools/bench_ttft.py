"""TTFT of disaggregated serving against colocated serving, measured side by side in one run.

Starts three clusters on the same cores at once and interleaves single requests between them, so
machine noise hits all three alike:
  colocated      one node doing prefill and decode, on every core        (the baseline)
  disagg-shared  1 prefill + 1 decode node, both allowed on every core
  disagg-pinned  1 prefill node on the first half of the cores, 1 decode node on the rest
For each prompt length it sends token-id prompts of exactly that length (seeded, no downloads),
one at a time (low load), and prints median TTFT per setup and the ratio to colocated.

    python tools/bench_ttft.py --engine torch --lengths 16 128 512 --reps 7
"""

from __future__ import annotations

import argparse
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
from pdgrpc.types import GenerateDelta


def _config(mode: str, base: int, engine: str, model: str, dtype: str, device: str, cpus_p: list[int],
            cpus_d: list[int]) -> str:
    defaults = f'engine = "{engine}"\n' + (f'model = "{model}"\n' if model else "") + (
        f'dtype = "{dtype}"\n' if dtype else "") + (f'device = "{device}"\n' if device else "")
    text = f'port_base = {base}\nmode = "{mode}"\n[defaults]\n{defaults}'
    if mode == "colocated":
        return text + f"[[colocated]]\ncpus = {cpus_p}\n"
    return text + f"[[prefill]]\ncpus = {cpus_p}\n[[decode]]\ncpus = {cpus_d}\n"


class Setup:
    def __init__(self, name: str, config_text: str, base: int) -> None:
        self.name = name
        self.base = base
        self.file = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        self.file.write(config_text)
        self.file.close()
        self.proc = subprocess.Popen([sys.executable, "-m", "pdgrpc", "up", "--config", self.file.name],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        self.ttft: dict[int, list[float]] = {}

    def _watch(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("cluster ready"):
                self.ready.set()

    def wait(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s):
            raise SystemExit(f"{self.name} did not start")

    def measure(self, client: Client, ids: list[int], gap_s: float) -> float:
        """TTFT of one request; the whole request is read so no work spills into the next one."""
        time.sleep(gap_s)  # low load: requests arrive spaced out, every process idle in between
        t0 = time.perf_counter()
        ttft = None
        for ev in client.generate(token_ids=ids, max_tokens=2, ignore_eos=True):
            if isinstance(ev, GenerateDelta) and ttft is None:
                ttft = time.perf_counter() - t0
        if ttft is None:
            raise RuntimeError("no token")
        return ttft

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        os.unlink(self.file.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="torch")
    parser.add_argument("--model", default="")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--device", default="", help="cpu (default) or cuda:N for every node")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=49152, help="token ids are drawn below this")
    parser.add_argument("--gap-s", type=float, default=0.5, help="idle time before each request")
    args = parser.parse_args()

    cores = sorted(os.sched_getaffinity(0))
    half = max(len(cores) // 2, 1)
    taken: set[int] = set()
    specs = [
        ("colocated", "colocated", cores, cores),
        ("disagg-shared", "disaggregated", cores, cores),
        ("disagg-pinned", "disaggregated", cores[:half], cores[half:] or cores),
    ]
    setups = []
    for name, mode, cp, cd in specs:
        base = free_base(taken)
        setups.append(Setup(name, _config(mode, base, args.engine, args.model, args.dtype, args.device, cp, cd), base))
    try:
        for s in setups:
            s.wait(600)
        clients = {s.name: Client(f"127.0.0.1:{s.base}") for s in setups}
        rng = random.Random(0)
        for s in setups:  # warm every path once
            s.measure(clients[s.name], [rng.randrange(3, args.vocab) for _ in range(8)], args.gap_s)
        for n in args.lengths:
            for rep in range(args.reps):
                ids = [rng.randrange(3, args.vocab) for _ in range(n)]
                order = setups if rep % 2 == 0 else setups[::-1]
                for s in order:
                    s.ttft.setdefault(n, []).append(s.measure(clients[s.name], ids, args.gap_s))
        where = f"{args.device or 'cpu'}, {len(cores)} cores"
        print(f"\nTTFT, median of {args.reps} (engine {args.engine}, {where}, one request at a time)")
        print(f"{'prompt tokens':>13} | " + " | ".join(f"{s.name:>14}" for s in setups) + " | "
              + " | ".join(f"{s.name + '/colocated':>24}" for s in setups[1:]))
        base_s = setups[0]
        for n in args.lengths:
            med = {s.name: statistics.median(s.ttft[n]) for s in setups}
            print(f"{n:>13} | " + " | ".join(f"{med[s.name] * 1000:>11.1f} ms" for s in setups) + " | "
                  + " | ".join(f"{med[s.name] / med[base_s.name]:>24.3f}" for s in setups[1:]))
        for c in clients.values():
            c.close()
    finally:
        for s in setups:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
