"""`pdgrpc bench serve`: latency and goodput of disaggregated vs colocated serving on the same cores.

Starts one cluster per setup (``pdgrpc up --config``, all at once, on the same cores), then for each
request rate sends the same seeded requests at the same Poisson arrival times to each setup in turn
(the order alternates from rate to rate), and reports TTFT, TPOT, ITL and end-to-end latency
(p50/p90/p99), throughput and goodput (requests meeting both the TTFT and the TPOT SLO). Rate 0
means one request at a time, each setup in turn for every request (the low-load TTFT comparison).
Writes ``<out>/serve.json``, ``<out>/serve_requests.json`` and the PNG plots.

With ``--peer vllm``, vLLM's own disaggregated serving (pdgrpc.bench.vllm_peer: two vLLM OpenAI
servers with ExampleConnector, pinned like the ``disagg`` setup, and a proxy) runs as one more setup,
``vllm-native-disagg`` (``--peer vllm-shared``: both servers on every core, like ``disagg-shared``),
driven over HTTP but measured like the others: same requests, arrival times and interleaving, same
statistics; a second table compares pdgrpc's disaggregated setups with it.
With ``--engine vllm`` that compares the serving systems on one engine; with ``--engine torch`` it
compares pdgrpc as a user would run it (its own engine) with vLLM as a user would run it.

    pdgrpc bench serve --engine torch --workload mixed --rates 0.3 0.6 --duration-s 40
    pdgrpc bench serve --engine vllm --workload fixed:130,514 --max-output 32 --rates 0 0.5 --peer vllm
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time

from pdgrpc import event_loop
from pdgrpc.bench import cluster as cl
from pdgrpc.bench import slo_scale
from pdgrpc.bench.driver import open_sender, progress_bar, run_open_loop
from pdgrpc.bench.stats import RequestResult, by_kind, max_rate_at_attainment, result_dict, summarize
from pdgrpc.bench.vllm_peer import PEER_NAME, VllmNativeDisagg
from pdgrpc.bench.workloads import WORKLOADS, WorkloadSpec, poisson_arrivals
from pdgrpc.engine import mkl_dispatch

AnySetup = cl.Setup | VllmNativeDisagg  # both: name, address, pids(), stop()

VLLM_NOTE = ("vLLM peer skipped: the 'vllm' package is not installed here (pip install -e '.[vllm]'; see "
             "/work/shared/engine-notes.md for how it runs on CPU).")
# The peer is vLLM's whole system, engine included: against pdgrpc on the vLLM engine the comparison
# isolates the serving system; against pdgrpc on its torch engine it compares what a user would run
# (the engines' kernels included). Against the mock engine it would mean nothing.
VLLM_ENGINE_NOTE = ("vLLM peer skipped: it runs with --engine vllm (pdgrpc on vLLM's engine) or --engine torch "
                    "(pdgrpc's own engine against vLLM's), not with --engine {engine}")
VLLM_PEER_NOTE = ("vLLM peer: setup {name}, vLLM's own disaggregated serving (two vLLM OpenAI servers with "
                  "ExampleConnector, producer on cores {prefill}, consumer on cores {decode}, and a proxy), driven "
                  "over HTTP /v1/completions with the same requests and arrival times")
# vLLM's worker busy-polls for ~1 s after each step (engine notes): at rate 0 the next setup's request
# must not start while the previous setup's engines still spin on the same cores
VLLM_GAP_S = 1.5
# Every setup runs at once: with --engine vllm each node (and each peer server) is a vLLM engine of
# ~3.4 GiB (SmolLM2 fp32, 1 GiB KV cache; 5 engines peaked at 17.4 GiB used on the 24 GiB test machine)
VLLM_ENGINE_GIB = 3.5


def add_arguments(p) -> None:
    p.add_argument("--engine", default="torch", help="torch (SmolLM2), vllm or mock")
    p.add_argument("--model", default="", help="model folder (engine default when empty)")
    p.add_argument("--dtype", default="", help="engine dtype (default float32)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=0,
                   help="torch engine, every setup: prefill prompts longer than this in chunks of it (0: off)")
    p.add_argument("--mock-prefill-cost-per-token-s", type=float, default=0.0)
    p.add_argument("--mock-decode-cost-per-step-s", type=float, default=0.0)
    p.add_argument("--workload", default="chat", help=f"{', '.join(WORKLOADS)} or jsonl:PATH")
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="request rates to sweep (req/s, Poisson); 0 = one request at a time")
    p.add_argument("--duration-s", type=float, default=30.0, help="arrival window per rate")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per rate")
    p.add_argument("--max-requests", type=int, default=400, help="at most this many requests per rate")
    p.add_argument("--sequential-requests", type=int, default=8, help="requests at rate 0 (one at a time)")
    p.add_argument("--setups", default="disagg,colocated",
                   help="comma-separated: disagg, disagg-shared, colocated, colocated-split; NAME@chunkN for "
                        "one with prefill in chunks of N tokens (torch; overrides --prefill-chunk-tokens), "
                        "NAME@linear-torch / NAME@linear-onednn for the torch engine's linear kernel; "
                        "options combine (colocated@chunk256@linear-torch)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO (default: the workload's)")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO (default: the workload's)")
    p.add_argument("--attainment-goal", type=float, default=0.9, help="DistServe attainment goal")
    p.add_argument("--slo-scales", type=float, nargs="*", default=list(slo_scale.DEFAULT_SCALES),
                   help="also report goodput with both SLOs multiplied by each of these (pdgrpc.bench.slo_scale; "
                        "none: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-scale", type=float, default=1.0, help="multiply the workload's prompt lengths")
    p.add_argument("--output-scale", type=float, default=1.0, help="multiply the workload's output lengths")
    p.add_argument("--max-output", type=int, default=0, help="cap output tokens (0: none)")
    p.add_argument("--vocab", type=int, default=49152, help="synthetic token ids are drawn below this")
    p.add_argument("--warmup", type=int, default=2, help="requests per setup before measuring")
    p.add_argument("--cooldown-s", type=float, default=2.0, help="idle time between runs")
    p.add_argument("--gap-s", type=float, default=None,
                   help=f"idle time before each request at rate 0 (default 0.3 s; {VLLM_GAP_S:g} s with vllm "
                        "or the vllm peer)")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--drain-timeout-s", type=float, default=180.0, help="wait at most this after the last arrival")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--peer", choices=["vllm", "vllm-shared", "vllm-mkl"], action="append", default=[],
                   help=f"also drive another system on the same cores, with --engine vllm or torch (vllm: vLLM's own "
                        f"disaggregated serving pinned as the disagg setup, setup {PEER_NAME}; vllm-shared: its two "
                        f"servers both on every core, as disagg-shared, setup {PEER_NAME}-shared; vllm-mkl: pinned, "
                        f"its servers with the MKL shim of pdgrpc's torch engine, setup {PEER_NAME}-mkl); repeatable")
    p.add_argument("--out", default="bench-results/serve", help="output folder")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _engine(args) -> dict:
    e: dict = {"engine": args.engine}
    if args.model:
        e["model"] = args.model
    if args.dtype:
        e["dtype"] = args.dtype
    if args.prefill_chunk_tokens:
        e["prefill_chunk_tokens"] = args.prefill_chunk_tokens
    if args.engine == "mock":
        e["mock_prefill_cost_per_token_s"] = args.mock_prefill_cost_per_token_s
        e["mock_decode_cost_per_step_s"] = args.mock_decode_cost_per_step_s
    return e


def _n_requests(rate: float, args) -> int:
    if rate <= 0:
        return args.sequential_requests
    return max(args.min_requests, min(args.max_requests, round(rate * args.duration_s)))


def _cpu(s: AnySetup) -> dict[str, float]:
    """CPU seconds per process of a setup, each with the processes below it (vLLM's engine core runs
    in a child of the node or server: without it a vLLM setup would seem to cost next to nothing)."""
    return {role: cl.tree_cpu_seconds(pid) for role, pid in s.pids().items()}


def _idle_busy_cores(seconds: float) -> float:
    """Cores busy on the whole machine over ``seconds`` (from /proc/stat): with every setup started
    and idle, near 0 unless an idle engine spins (or other work runs on the machine)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all ticks, idle + iowait ticks

    (t0, i0) = sample()
    time.sleep(seconds)
    (t1, i1) = sample()
    return round(len(os.sched_getaffinity(0)) * (1 - (i1 - i0) / max(t1 - t0, 1)), 2)


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / (1 << 20)
    except (OSError, StopIteration):
        return float("inf")


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in sorted(after)}


async def _warm(setups: list[AnySetup], wl: WorkloadSpec, n: int, timeout_s: float) -> None:
    reqs = wl.requests(max(n, 1), seed=10_000)
    for s in setups:
        c = open_sender(s.address, timeout_s)
        try:
            for r in reqs[:n]:
                res = await c.send(r, RequestResult(r.index), time.perf_counter(), timeout_s)
                if res.error:
                    raise RuntimeError(f"warm-up on {s.name} failed: {res.error}")
        finally:
            await c.close()


async def _sequential(setups: list[AnySetup], reqs, args, bar) -> dict[str, tuple[list[RequestResult], float]]:
    """Rate 0: each request to every setup in turn (order alternating), idle gap before each."""
    out: dict[str, list[RequestResult]] = {s.name: [] for s in setups}
    clients = {s.name: open_sender(s.address, args.request_timeout_s) for s in setups}
    busy = {s.name: 0.0 for s in setups}
    try:
        for i, r in enumerate(reqs):
            for s in (setups if i % 2 == 0 else setups[::-1]):
                await asyncio.sleep(args.gap_s)
                res = await clients[s.name].send(r, RequestResult(r.index, r.kind), time.perf_counter(),
                                                 args.request_timeout_s)
                out[s.name].append(res)
                busy[s.name] += res.e2e_s or 0.0
                bar.update(1)
    finally:
        for c in clients.values():
            await c.close()
    return {name: (res, busy[name]) for name, res in out.items()}


async def _sweep(setups: list[AnySetup], wl: WorkloadSpec, args, slo_ttft_s: float, slo_tpot_s: float,
                 report: dict, raw: dict) -> None:
    await _warm(setups, wl, args.warmup, args.request_timeout_s)
    for k, rate in enumerate(args.rates):
        n = _n_requests(rate, args)
        reqs = wl.requests(n, seed=args.seed)
        kw = {"offered_rate": rate, "slo_ttft_s": slo_ttft_s, "slo_tpot_s": slo_tpot_s}
        for s in setups:  # every rate resends the same prompts: none may find KV kept from before
            if isinstance(s, VllmNativeDisagg):
                s.clear_kv()
        if rate <= 0:
            bar = progress_bar(n * len(setups), "one at a time", not args.no_progress)
            before = {s.name: _cpu(s) for s in setups}
            seq = await _sequential(setups, reqs, args, bar)
            bar.close()
            for s in setups:
                results, busy = seq[s.name]
                _record(report, raw, s, rate, results, kw, busy, _cpu_delta(before[s.name], _cpu(s)))
            continue
        arrivals = poisson_arrivals(rate, n, args.seed + k)
        for s in (setups if k % 2 == 0 else setups[::-1]):
            await asyncio.sleep(args.cooldown_s)
            bar = progress_bar(n, f"{s.name} @ {rate:g} req/s", not args.no_progress)
            before = _cpu(s)
            results, duration = await run_open_loop(
                s.address, reqs, list(arrivals), timeout_s=args.request_timeout_s,
                drain_timeout_s=float(arrivals[-1]) + args.drain_timeout_s, on_done=lambda _r, bar=bar: bar.update(1))
            bar.close()
            _record(report, raw, s, rate, results, kw, duration, _cpu_delta(before, _cpu(s)))


def _record(report, raw, s: AnySetup, rate, results, kw, duration, cpu) -> None:
    summary = summarize(results, duration_s=duration, **kw)
    summary["by_kind"] = by_kind(results, duration_s=duration, **kw)
    summary["cpu_seconds"] = cpu
    summary["loadavg_after"] = os.getloadavg()[0]  # other work on the machine shows here
    report["setups"][s.name]["runs"].append(summary)
    raw.setdefault(s.name, {})[str(rate)] = [result_dict(r) for r in results]
    _print_run(s.name, summary)


def _fmt(v, digits=0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _print_run(name: str, r: dict) -> None:
    rate = "1-at-a-time" if r["offered_rate_rps"] <= 0 else f"{r['offered_rate_rps']:g}/s"
    print(f"{name:>16} {rate:>11} | ok {r['completed']}/{r['requests']} | TTFT p50 {_fmt(r['ttft_ms']['p50'])} "
          f"p99 {_fmt(r['ttft_ms']['p99'])} ms | TPOT p50 {_fmt(r['tpot_ms']['p50'])} "
          f"p99 {_fmt(r['tpot_ms']['p99'])} ms | ITL p50 {_fmt(r['itl_ms']['p50'])} "
          f"p99 {_fmt(r['itl_ms']['p99'])} max {_fmt(r['itl_ms']['max'])} ms | E2E p99 {_fmt(r['e2e_ms']['p99'])}"
          f" ms | goodput {r['goodput_rps']:.3f}/s ({100 * r['slo_attainment']:.0f}% in SLO)", flush=True)
    for kind, k in r.get("by_kind", {}).items():
        print(f"{'':>16} {kind:>22} | ok {k['completed']}/{k['requests']} | TTFT p50 {_fmt(k['ttft_ms']['p50'])} "
              f"p99 {_fmt(k['ttft_ms']['p99'])} ms | TPOT p99 {_fmt(k['tpot_ms']['p99'])} ms", flush=True)


def _paired_ttft_ratio(raw: dict, a: str, b: str, rate: str) -> float | None:
    """Median over requests of TTFT(a) / TTFT(b), the same request sent to both."""
    ra = {r["index"]: r for r in raw.get(a, {}).get(rate, [])}
    rb = {r["index"]: r for r in raw.get(b, {}).get(rate, [])}
    ratios = [ra[i]["ttft_s"] / rb[i]["ttft_s"] for i in ra if i in rb and ra[i]["ttft_s"] and rb[i]["ttft_s"]]
    return statistics.median(ratios) if ratios else None


def _ratio_row(raw: dict, rate: float, name: str, r: dict, base: str, b: dict) -> dict:
    """Setup ``name``'s run ``r`` against ``base``'s run ``b`` at one rate: ratios < 1 mean ``name`` lower."""

    def rat(metric, q):
        x, y = r[metric][q], b[metric][q]
        return None if x is None or not y else round(x / y, 3)

    return {
        "rate_rps": rate, "setup": name, "baseline": base,
        "ttft_p50_ratio": rat("ttft_ms", "p50"), "ttft_p99_ratio": rat("ttft_ms", "p99"),
        "ttft_paired_median_ratio": _paired_ttft_ratio(raw, name, base, str(rate)),
        "itl_p99_ratio": rat("itl_ms", "p99"), "itl_p99.9_ratio": rat("itl_ms", "p99.9"),
        "itl_max_ratio": rat("itl_ms", "max"), "tpot_p99_ratio": rat("tpot_ms", "p99"),
        "goodput_ratio": round(r["goodput_rps"] / b["goodput_rps"], 3) if b["goodput_rps"] else None,
        "goodput_rps": round(r["goodput_rps"], 4), "baseline_goodput_rps": round(b["goodput_rps"], 4),
    }


def _runs_by_rate(setups: dict) -> list[tuple[float, dict[str, dict | None]]]:
    rates = sorted({r["offered_rate_rps"] for s in setups.values() for r in s["runs"]})
    return [(rate, {n: next((r for r in s["runs"] if r["offered_rate_rps"] == rate), None)
                    for n, s in setups.items()}) for rate in rates]


def compare(report: dict, raw: dict) -> list[dict]:
    """Each disaggregated setup against the better colocated one at every rate (lower TTFT p50)."""
    setups = report["setups"]
    colo = [n for n, s in setups.items() if s["mode"] == "colocated"]
    disagg = [n for n, s in setups.items() if s["mode"] == "disaggregated"]
    rows = []
    for rate, runs in _runs_by_rate(setups):
        cands = [n for n in colo if runs[n] and runs[n]["ttft_ms"]["p50"] is not None]
        if not cands:
            continue
        base = min(cands, key=lambda n: runs[n]["ttft_ms"]["p50"])
        rows += [_ratio_row(raw, rate, d, runs[d], base, runs[base]) for d in disagg if runs[d]]
    return rows


def compare_peer(report: dict, raw: dict) -> list[dict]:
    """Each pdgrpc disaggregated setup against each peer (vllm-native-disagg) at every rate."""
    setups = report["setups"]
    peers = [n for n, s in setups.items() if s["mode"] == "peer"]
    disagg = [n for n, s in setups.items() if s["mode"] == "disaggregated"]
    return [_ratio_row(raw, rate, d, runs[d], p, runs[p]) for rate, runs in _runs_by_rate(setups)
            for p in peers if runs[p] for d in disagg if runs[d]]


def main(args) -> int:
    try:
        wl = WorkloadSpec.parse(args.workload, vocab=args.vocab, prompt_scale=args.prompt_scale,
                                output_scale=args.output_scale, max_output=args.max_output)
    except (ValueError, OSError) as exc:
        print(f"pdgrpc bench serve: {exc}", file=sys.stderr)
        return 2
    preset = wl.preset
    slo_ttft_ms = args.slo_ttft_ms or (preset.slo_ttft_ms if preset else 2000.0)
    slo_tpot_ms = args.slo_tpot_ms or (preset.slo_tpot_ms if preset else 150.0)
    cores = sorted(os.sched_getaffinity(0))
    known = cl.standard_setups(cores)
    names = [n.strip() for n in args.setups.split(",") if n.strip()]
    try:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"name each setup once; choose from {sorted(known)}")
        specs = [cl.setup_variant(n, known) for n in names]
    except ValueError as exc:
        print(f"pdgrpc bench serve: {exc}", file=sys.stderr)
        return 2
    if any(s.engine_overrides for s in specs) and args.engine != "torch":
        print("pdgrpc bench serve: @chunkN, @linear-KERNEL and @mkl-HOW setups need --engine torch", file=sys.stderr)
        return 2
    if args.gap_s is None:
        args.gap_s = VLLM_GAP_S if args.engine == "vllm" or args.peer else 0.3
    peers: dict[str, str] = {}
    peer_list: list[VllmNativeDisagg] = []
    for kind in dict.fromkeys(args.peer):
        if args.engine not in ("vllm", "torch"):
            peers[kind] = VLLM_ENGINE_NOTE.format(engine=args.engine)
        elif importlib.util.find_spec("vllm") is None:
            peers[kind] = VLLM_NOTE
        else:
            # vllm: pinned as the disagg setup; vllm-shared: both servers on every core, as disagg-shared;
            # vllm-mkl: pinned, with the MKL shim pdgrpc's torch engine loads (pdgrpc.engine.mkl_dispatch)
            prefill_cores, decode_cores = cl.split_cores(cores) if kind != "vllm-shared" else (cores, cores)
            name = PEER_NAME if kind == "vllm" else f"{PEER_NAME}{kind[4:]}"
            preload = mkl_dispatch.shim_path() if kind == "vllm-mkl" else ""
            if kind == "vllm-mkl" and not preload:
                peers[kind] = "vLLM peer vllm-mkl skipped: the MKL shim was not built (no C compiler at install?)"
                print(peers[kind], file=sys.stderr)
                continue
            peers[kind] = VLLM_PEER_NOTE.format(name=name, prefill=prefill_cores, decode=decode_cores)
            peer_list.append(VllmNativeDisagg(prefill_cores, decode_cores, model=args.model, name=name,
                                              dtype=args.dtype or "float32", start_timeout_s=args.start_timeout_s,
                                              preload=preload))
        print(peers[kind], file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    engine = _engine(args)
    report: dict = {
        "command": "pdgrpc bench serve " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("serve") + 1:])
        if "serve" in sys.argv else "",
        "machine": cl.machine_info(), "engine": args.engine, "engine_options": engine, "workload": args.workload,
        "workload_description": preset.description if preset else "prompts from a JSONL file",
        "seed": args.seed, "rates": args.rates, "duration_s": args.duration_s,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}, "attainment_goal": args.attainment_goal,
        "peers": peers, "setups": {}, "started_unix": time.time(),
    }
    for s in specs:
        report["setups"][s.name] = {"description": s.description, "mode": s.mode,
                                    "config": s.config_text(0, engine).split("\n", 1)[1], "runs": []}
    if args.engine == "vllm":
        engines = sum(len(s.nodes) for s in specs) + 2 * len(peer_list)
        need, avail = engines * VLLM_ENGINE_GIB, _mem_available_gib()
        if need > avail:
            print(f"warning: {engines} vLLM engines (~{need:.0f} GiB) start at once with {avail:.1f} GiB available; "
                  "if they do not fit, run fewer setups per invocation (--setups)", file=sys.stderr)
    raw: dict = {}
    print(f"starting {len(specs)} clusters ({', '.join(names)}) with engine {args.engine}"
          f"{''.join(f' and {p.name}' for p in peer_list)} ...", flush=True)
    setups: list[AnySetup] = []
    try:
        for peer in peer_list:  # launched first, waited for last: their engines start beside the clusters
            peer.start(wait=False)
        setups += cl.start_setups(specs, engine, args.start_timeout_s)
        for peer in peer_list:
            setups.append(peer.wait(args.start_timeout_s))
            report["setups"][peer.name] = {"description": peer.description, "mode": peer.mode,
                                           "config": peer.config_text(), "runs": []}
    except BaseException:
        for s in setups:
            s.stop()
        for peer in peer_list:
            peer.stop()
        raise
    # idle setups should cost nothing (vLLM's workers stop polling ~1 s after their last step)
    report["idle_busy_cores"] = _idle_busy_cores(3.0)
    try:
        event_loop.run(_sweep(setups, wl, args, slo_ttft_ms / 1000, slo_tpot_ms / 1000, report, raw))
    except KeyboardInterrupt:
        print("interrupted: writing what was measured", file=sys.stderr)
    except Exception:
        for peer in peer_list:
            peer.print_logs()  # the logs go with the peer's temporary folder: show them first
        raise
    finally:
        for peer in peer_list:
            if peer.name in report["setups"]:
                # the consumer logs each prompt it loaded from the producer's files: 0 would mean recompute
                report["setups"][peer.name]["kv_loads"] = peer.kv_loads()
        for s in setups:
            s.stop()
    for s in report["setups"].values():
        s["max_rate_at_attainment_rps"] = max_rate_at_attainment(s["runs"], args.attainment_goal)
    report["comparison"] = compare(report, raw)
    report["peer_comparison"] = compare_peer(report, raw)
    if args.slo_scales:
        report["slo_scale"] = slo_scale.scan(report, raw, args.slo_scales)
    report["finished_unix"] = time.time()
    path = os.path.join(args.out, "serve.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "serve_requests.json"), "w") as f:
        json.dump(raw, f)
    written = [path]
    if not args.no_plots:
        from pdgrpc.bench.plots import plot_slo_scale, plot_sweep, run_title

        written += plot_sweep(report, args.out)
        if "slo_scale" in report:
            written += plot_slo_scale(report["slo_scale"], args.out, run_title(report))
    print_comparison(report)
    if "slo_scale" in report:
        slo_scale.print_scan(report["slo_scale"])
    print("wrote " + ", ".join(written))
    return 0


def print_comparison(report: dict) -> None:
    rows = report.get("comparison", [])
    if rows:
        print("\ndisaggregated vs the better colocated setup at each rate (ratio < 1: disaggregated lower)")
        _print_rows(rows)
    peer_rows = report.get("peer_comparison", [])
    if peer_rows:
        print(f"\npdgrpc disaggregated vs {', '.join(sorted({r['baseline'] for r in peer_rows}))} at each rate "
              "(ratio < 1: pdgrpc lower)")
        _print_rows(peer_rows)
    for name, s in report["setups"].items():
        print(f"{name}: DistServe goodput (highest rate with >= {100 * report['attainment_goal']:.0f}% in SLO) "
              f"{s['max_rate_at_attainment_rps']:g} req/s")


def _print_rows(rows: list[dict]) -> None:
    w = max(16, *(len(r["baseline"]) for r in rows))
    print(f"{'rate':>11} {'setup':>14} {'baseline':>{w}} | TTFT p50 | paired TTFT | ITL p99 | ITL p99.9 | "
          "TPOT p99 | goodput")
    for r in rows:
        rate = "1-at-a-time" if r["rate_rps"] <= 0 else f"{r['rate_rps']:g}/s"
        print(f"{rate:>11} {r['setup']:>14} {r['baseline']:>{w}} | {_fmt(r['ttft_p50_ratio'], 3):>8} | "
              f"{_fmt(r['ttft_paired_median_ratio'], 3):>11} | {_fmt(r['itl_p99_ratio'], 3):>7} | "
              f"{_fmt(r['itl_p99.9_ratio'], 3):>9} | "
              f"{_fmt(r['tpot_p99_ratio'], 3):>8} | "
              f"{'inf' if r['goodput_ratio'] is None and r['goodput_rps'] else _fmt(r['goodput_ratio'], 2)}x "
              f"({r['goodput_rps']:.3f} vs {r['baseline_goodput_rps']:.3f}/s)")
