"""`pdgrpc bench coordinator`: the request rate the cluster's control plane sustains on its own.

Starts a cluster of 1 prefill + 1 decode node with mock engines of zero cost (so every millisecond a
request takes is overhead: coordinator, nodes, store, gRPC), then sends open-loop Poisson traffic of
short prompts with ``--output-tokens`` tokens each at rising rates. For each rate it reports the
achieved throughput, the added latency (end-to-end and TTFT, p50/p99) and the CPU milliseconds per
request each process spent (coordinator, prefill, decode, store, and this client), which says what
limits the rate. The answer: the highest rate with p99 end-to-end latency <= ``--p99-limit-ms``, at
least 99% of requests served and throughput within 10% of the offered rate.
With ``--profile DIR`` py-spy samples the coordinator during the sweep (flame graph + top functions).

    pdgrpc bench coordinator --rates 50 100 200 300 500 --duration-s 6
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time

from pdgrpc import event_loop
from pdgrpc.bench import cluster as cl
from pdgrpc.bench.driver import progress_bar, run_open_loop
from pdgrpc.bench.stats import percentiles, summarize
from pdgrpc.bench.workloads import BenchRequest, poisson_arrivals


def add_arguments(p) -> None:
    p.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 300, 400, 500], help="req/s to try")
    p.add_argument("--duration-s", type=float, default=6.0, help="arrival window per rate")
    p.add_argument("--output-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--p99-limit-ms", type=float, default=10.0, help="added-latency limit (p99 end-to-end)")
    p.add_argument("--mock-layers-per-group", type=int, default=30,
                   help="30 = one KV group per request (what a short prompt gives with the torch engine)")
    p.add_argument("--stop-after-ms", type=float, default=1000.0,
                   help="stop the sweep once p99 end-to-end passes this (the rates above would only be worse)")
    p.add_argument("--coordinators", type=int, default=1, help="coordinator processes on the one port")
    p.add_argument("--prefill", type=int, default=1, help="prefill nodes (mock, zero cost)")
    p.add_argument("--decode", type=int, default=1, help="decode nodes (mock, zero cost)")
    p.add_argument("--clients", type=int, default=1,
                   help="benchmark client processes sharing the arrival schedule (one Python client "
                        "saturates near ~500 req/s)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="decode nodes' tokens per message (1: every token in a message of its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="", help="folder for a py-spy profile of the coordinator (needs py-spy)")
    p.add_argument("--out", default="bench-results/coordinator", help="output folder for coordinator.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true", help="skip coordinator.png")


def _requests(n: int, args) -> list[BenchRequest]:
    ids = tuple(3 + (7 * i) % 200 for i in range(args.prompt_tokens))
    return [BenchRequest(i, args.output_tokens, token_ids=ids, kind="short") for i in range(n)]


def _sustained(run: dict, limit_ms: float, metric: str = "e2e_ms") -> bool:
    p99 = run[metric]["p99"]
    return (p99 is not None and p99 <= limit_ms and run["completed"] >= 0.99 * run["requests"]
            and run["throughput_rps"] >= 0.9 * run["offered_rate_rps"])


def _client_slice(address: str, connections: int, reqs: list[BenchRequest], arrivals: list[float],
                  start_at: float | None, drain_timeout_s: float) -> tuple[list, float, float]:
    """One client process's share of a run: (results, duration, CPU seconds this process spent)."""
    cpu0 = time.process_time()
    results, duration = event_loop.run(run_open_loop(address, reqs, arrivals, timeout_s=60, connections=connections,
                                                  drain_timeout_s=drain_timeout_s, start_at=start_at))
    return results, duration, time.process_time() - cpu0


class _Clients:
    """Sends a run from ``n`` processes: request i goes to process i mod n, each at its own arrival
    time on one shared clock, so together they send exactly the one Poisson schedule."""

    def __init__(self, address: str, n: int, connections: int) -> None:
        self.address = address
        self.n = n
        self.connections = connections
        self.pool = (concurrent.futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
                     if n > 1 else None)

    def run(self, reqs: list[BenchRequest], arrivals: list[float], drain_timeout_s: float,
            on_done=None) -> tuple[list, float, float]:
        if self.pool is None:
            cpu0 = time.process_time()
            results, duration = event_loop.run(run_open_loop(self.address, reqs, arrivals, timeout_s=60,
                                                          connections=self.connections,
                                                          drain_timeout_s=drain_timeout_s, on_done=on_done))
            return results, duration, time.process_time() - cpu0
        start_at = time.perf_counter() + 0.5  # every process is up and waiting by then
        futures = [self.pool.submit(_client_slice, self.address, self.connections, reqs[k::self.n],
                                    arrivals[k::self.n], start_at, drain_timeout_s) for k in range(self.n)]
        parts = [f.result() for f in futures]
        results = sorted((r for part in parts for r in part[0]), key=lambda r: r.index)
        return results, max(p[1] for p in parts), sum(p[2] for p in parts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _sweep(setup: cl.Setup, args, report: dict) -> None:
    # Several connections per client when several coordinators share the port: the kernel hands each
    # connection to one of them, so a handful of connections would load them unevenly.
    clients = _Clients(setup.address, args.clients, 1 if args.coordinators == 1 else 4 * args.coordinators)
    try:
        _sweep_rates(setup, clients, args, report)
    finally:
        clients.close()


def _sweep_rates(setup: cl.Setup, clients: _Clients, args, report: dict) -> None:
    warm = _requests(50 * args.clients, args)
    clients.run(warm, [i * 0.01 / args.clients for i in range(len(warm))], 60)
    for k, rate in enumerate(args.rates):
        n = max(20, round(rate * args.duration_s))
        reqs = _requests(n, args)
        arrivals = list(poisson_arrivals(rate, n, args.seed + k))
        bar = progress_bar(n, f"coordinator @ {rate:g} req/s", not args.no_progress and args.clients == 1)
        before = setup.cpu_by_process()
        time.sleep(0.5)
        results, duration, client_cpu = clients.run(reqs, arrivals, arrivals[-1] + 60,
                                                    on_done=lambda _r, bar=bar: bar.update(1))
        bar.close()
        after = {**setup.cpu_by_process(), "client": client_cpu}
        run = summarize(results, offered_rate=rate, slo_ttft_s=args.p99_limit_ms / 1000, slo_tpot_s=1e9,
                        duration_s=duration)
        # What the client and the coordinator add to the first token beyond the prefill node's own time
        # as the coordinator sees it (queue, admission, the client hop, the coordinator's own work).
        run["ttft_minus_prefill_ms"] = {k: (None if v is None else round(v * 1000, 3)) for k, v in percentiles(
            r.ttft_s - r.server_prefill_s for r in results if r.ok and r.server_prefill_s is not None).items()}
        lag = sorted(r.sent_s - r.scheduled_s for r in results)
        run["client_send_lag_ms_p99"] = round(1000 * lag[int(0.99 * (len(lag) - 1))], 3) if lag else None
        ok = max(run["completed"], 1)
        run["cpu_ms_per_request"] = {p: round(1000 * (after[p] - before.get(p, 0.0)) / ok, 3) for p in sorted(after)}
        run["cpu_busy_fraction"] = {p: round((after[p] - before.get(p, 0.0)) / duration, 3) for p in sorted(after)}
        # The rate at which each process would saturate a core of its own, and the whole cluster the
        # cores it has here: what sizing a deployment needs (coordinator processes for R req/s = R / its
        # ceiling), and what limits the rate achieved on a small machine.
        ms, cores = run["cpu_ms_per_request"], len(os.sched_getaffinity(0))
        run["cpu_ceiling_rps"] = {p: round(1000 / v) for p, v in ms.items() if v > 0}
        run["cpu_ceiling_rps"]["cluster"] = round(1000 * cores / max(sum(ms.values()), 1e-9))
        run["sustained"] = _sustained(run, args.p99_limit_ms)
        # The same test on the coordinator's own share of the first token only (the client hop,
        # admission, its work), the nodes' time left out: how far one coordinator goes before it is
        # what adds the latency.
        run["coordinator_share_sustained"] = _sustained(run, args.p99_limit_ms, "ttft_minus_prefill_ms")
        run["loadavg_after"] = os.getloadavg()[0]
        report["runs"].append(run)
        cpu = ", ".join(f"{p} {v:.2f}" for p, v in run["cpu_ms_per_request"].items())
        ceiling = ", ".join(f"{p} {v}" for p, v in run["cpu_ceiling_rps"].items() if p != "cluster")
        ceiling += f" (one core each); the whole cluster on these {cores} cores " \
                   f"{run['cpu_ceiling_rps']['cluster']}"
        print(f"{rate:>6g} req/s offered | {run['throughput_rps']:7.1f} served | ok {run['completed']}/{n} | "
              f"e2e p50 {run['e2e_ms']['p50']} p99 {run['e2e_ms']['p99']} ms | TTFT p50 {run['ttft_ms']['p50']} "
              f"p99 {run['ttft_ms']['p99']} ms | TTFT-prefill p99 {run['ttft_minus_prefill_ms']['p99']} ms"
              f" | send lag p99 {run['client_send_lag_ms_p99']} ms | "
              f"{'OK' if run['sustained'] else 'over the limit'}\n        CPU ms/request: {cpu}\n"
              f"        CPU ceiling, req/s: {ceiling}", flush=True)
        p99 = run["e2e_ms"]["p99"]
        if p99 is None or p99 > args.stop_after_ms:
            print(f"stopping the sweep: p99 {p99} ms is past {args.stop_after_ms:g} ms", flush=True)
            break


def _start_profile(pid: int, folder: str) -> subprocess.Popen | None:
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):  # py-spy is a separate install: pip install py-spy
        print("--profile: py-spy is not installed (pip install py-spy); not profiling", file=sys.stderr)
        return None
    os.makedirs(folder, exist_ok=True)
    return subprocess.Popen([exe, "record", "-p", str(pid), "-r", "200", "--format", "raw", "-o",
                             os.path.join(folder, "coordinator.pyspy.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def top_functions(raw_path: str, n: int = 15) -> list[dict]:
    """Functions by share of samples (own time and inclusive) from a py-spy raw (collapsed) file."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            c = int(count)
            total += c
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    if not total:
        return []
    return ([{"function": f, "own": round(c / total, 4)} for f, c in own.most_common(n)]
            + [{"function": f, "inclusive": round(c / total, 4)} for f, c in incl.most_common(3 * n)
               if "asyncio" not in f and "runpy" not in f][:n])


def _setup_spec(args) -> cl.SetupSpec:
    """1 prefill + 1 decode pinned as in every benchmark; more nodes share the same two halves of the cores."""
    if min(args.prefill, args.decode, args.coordinators, args.clients) < 1:
        raise SystemExit("--prefill, --decode, --coordinators and --clients must be >= 1")
    first, rest = map(tuple, cl.split_cores(sorted(os.sched_getaffinity(0))))
    nodes = (*(cl.NodeSpec("prefill", first) for _ in range(args.prefill)),
             *(cl.NodeSpec("decode", rest) for _ in range(args.decode)))
    return cl.SetupSpec("disagg", nodes, f"{args.prefill} prefill on cores {list(first)}, {args.decode} decode on "
                        f"cores {list(rest)}, {args.coordinators} coordinator process(es) and "
                        f"{args.clients} client process(es) unpinned", coordinators=args.coordinators)


def main(args) -> int:
    # Nodes admit far more than the default 64 requests, so a latency spike shows as latency, not as
    # RESOURCE_EXHAUSTED from a node (the coordinator's own limit is 4096, see cluster.SetupSpec).
    engine = {"engine": "mock", "mock_layers_per_group": args.mock_layers_per_group,
              "mock_prefill_cost_per_token_s": 0.0, "mock_decode_cost_per_step_s": 0.0,
              "max_requests": 1024, "max_batch": 256, "stream_interval": args.stream_interval}
    spec = _setup_spec(args)
    report: dict = {"command": "pdgrpc bench coordinator " + " ".join(sys.argv[sys.argv.index("coordinator") + 1:])
                    if "coordinator" in sys.argv else "", "machine": cl.machine_info(),
                    "setup": spec.description, "output_tokens": args.output_tokens, "prompt_tokens": args.prompt_tokens,
                    "p99_limit_ms": args.p99_limit_ms, "stream_interval": args.stream_interval, "runs": []}
    print(f"starting a mock cluster ({spec.description}, zero-cost engines, {args.stream_interval} token(s) per "
          "message at most) ...", flush=True)
    setup = cl.start_setups([spec], engine)[0]
    prof = None
    try:
        if args.profile:
            prof = _start_profile(setup.pids()["coordinator"], args.profile)
        _sweep(setup, args, report)
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    finally:
        if prof is not None:
            prof.send_signal(signal.SIGINT)
            try:
                prof.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prof.kill()
        setup.stop()
    if prof is not None and os.path.exists(os.path.join(args.profile, "coordinator.pyspy.txt")):
        report["coordinator_profile"] = top_functions(os.path.join(args.profile, "coordinator.pyspy.txt"))
    ok = [r["offered_rate_rps"] for r in report["runs"] if r["sustained"]]
    report["max_sustained_rps"] = max(ok) if ok else 0.0
    share = [r["offered_rate_rps"] for r in report["runs"] if r["coordinator_share_sustained"]]
    report["max_rps_coordinator_share_within_limit"] = max(share) if share else 0.0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "coordinator.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nhighest rate with p99 added latency <= {args.p99_limit_ms:g} ms: {report['max_sustained_rps']:g} req/s "
          f"({args.output_tokens} output tokens each)")
    print(f"highest rate with the coordinator's share of the first token (TTFT - prefill) p99 <= {args.p99_limit_ms:g}"
          f" ms: {report['max_rps_coordinator_share_within_limit']:g} req/s")
    for row in report.get("coordinator_profile", [])[:10]:
        print(f"  coordinator {'own' if 'own' in row else 'incl'} {100 * row.get('own', row.get('inclusive')):5.1f}%"
              f"  {row['function'][:110]}")
    written = [path]
    if not args.no_plots:
        try:
            from pdgrpc.bench.plots import plot_coordinator

            written += plot_coordinator(report, args.out)
        except ImportError:  # matplotlib is in the [bench] extra
            print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    print("wrote " + ", ".join(written))
    return 0
