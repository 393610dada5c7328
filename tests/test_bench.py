"""`pdgrpc bench`: workloads, statistics, SLO scale, and short real runs of `kv`, `serve` and `coordinator`.

Behaviour only: the runs use tiny sizes and low rates and check what is written, never how fast."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest

from pdgrpc.bench import add_arguments, main, slo_scale
from pdgrpc.bench.stats import RequestResult, max_rate_at_attainment, percentiles, result_dict, summarize
from pdgrpc.bench.workloads import (
    WORKLOADS,
    WorkloadSpec,
    jsonl_requests,
    load_jsonl,
    poisson_arrivals,
    synthetic_requests,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


# ---- workloads -----------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_synthetic_workloads_are_seeded_and_reproducible(name):
    w = WORKLOADS[name]
    a = synthetic_requests(w, 50, seed=7)
    b = synthetic_requests(w, 50, seed=7)
    c = synthetic_requests(w, 50, seed=8)
    assert a == b
    assert a != c
    for r in a:
        part = next(m for m in w.parts if m.kind == r.kind)
        assert part.prompt.lo <= r.prompt_len <= part.prompt.hi
        assert part.output.lo <= r.max_tokens <= part.output.hi
        assert all(3 <= t < 49152 for t in r.token_ids)
        assert r.client_kwargs()["ignore_eos"] is True and r.client_kwargs()["max_tokens"] == r.max_tokens


@pytest.mark.fast
def test_mixed_workload_has_long_prompts_among_short_ones():
    reqs = synthetic_requests(WORKLOADS["mixed"], 200, seed=0)
    kinds = {r.kind for r in reqs}
    assert kinds == {"decode-heavy", "long-prompt"}
    long = [r for r in reqs if r.kind == "long-prompt"]
    assert 0.1 < len(long) / len(reqs) < 0.3
    assert min(r.prompt_len for r in long) > max(r.prompt_len for r in reqs if r.kind == "decode-heavy")


@pytest.mark.fast
def test_scales_and_output_cap():
    spec = WorkloadSpec.parse("chat", prompt_scale=0.25, output_scale=0.5, max_output=10)
    reqs = spec.requests(30, seed=1)
    assert all(r.max_tokens <= 10 for r in reqs)
    assert max(r.prompt_len for r in reqs) <= 128  # 512 * 0.25


@pytest.mark.fast
def test_fixed_length_workload():
    spec = WorkloadSpec.parse("fixed:130,514", max_output=8)
    reqs = spec.requests(4, seed=0)
    assert [r.prompt_len for r in reqs] == [130, 514, 130, 514] and {r.max_tokens for r in reqs} == {8}
    assert reqs == spec.requests(4, seed=0) and [r.kind for r in reqs[:2]] == ["prompt-130", "prompt-514"]
    with pytest.raises(ValueError, match="fixed:N"):
        WorkloadSpec.parse("fixed:abc")


@pytest.mark.fast
def test_poisson_arrivals_seeded():
    a = poisson_arrivals(4.0, 2000, seed=3)
    assert np.array_equal(a, poisson_arrivals(4.0, 2000, seed=3))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert 0.2 < float(np.mean(np.diff(a))) < 0.3  # mean gap 1/rate
    with pytest.raises(ValueError):
        poisson_arrivals(0, 5, seed=0)


@pytest.mark.fast
def test_jsonl_workload(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hello", "max_tokens": 5}\n\n{"token_ids": [5, 6, 7]}\n'
                    '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}\n')
    rows = load_jsonl(str(path))
    reqs = jsonl_requests(rows, 3, seed=0)
    assert sorted(r.max_tokens for r in reqs) == [3, 5, 64]
    assert jsonl_requests(rows, 7, seed=0) == jsonl_requests(rows, 7, seed=0)
    spec = WorkloadSpec.parse(f"jsonl:{path}")
    assert len(spec.requests(10, seed=0)) == 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "token_ids": [1]}\n')
    with pytest.raises(ValueError, match="exactly one"):
        load_jsonl(str(bad))
    with pytest.raises(ValueError, match="unknown workload"):
        WorkloadSpec.parse("nope")


# ---- statistics ----------------------------------------------------------------------------------

def _result(i, ttft, e2e, tokens, error=""):
    r = RequestResult(i, sent_s=float(i), ttft_s=ttft, e2e_s=e2e, output_tokens=tokens, error=error)
    if ttft is not None:
        step = (e2e - ttft) / max(tokens - 1, 1)
        r.token_times_s = [ttft + k * step for k in range(tokens)]
    return r


@pytest.mark.fast
def test_goodput_on_a_hand_made_example():
    results = [
        _result(0, 0.5, 0.5 + 9 * 0.05, 10),  # TTFT 0.5 s, TPOT 50 ms: good
        _result(1, 1.5, 1.5 + 9 * 0.05, 10),  # TTFT over the 1 s SLO
        _result(2, 0.2, 0.2 + 9 * 0.2, 10),  # TPOT 200 ms over the 100 ms SLO
        _result(3, 0.9, 0.9, 1),  # one token: no TPOT, TTFT within: good
        _result(4, None, None, 0, error="Unavailable: down"),  # failed: not good
    ]
    s = summarize(results, offered_rate=1.0, slo_ttft_s=1.0, slo_tpot_s=0.1, duration_s=10.0)
    assert s["requests"] == 5 and s["completed"] == 4 and s["failed"] == 1
    assert s["good"] == 2
    assert s["goodput_rps"] == pytest.approx(0.2)
    assert s["slo_attainment"] == pytest.approx(0.4)
    assert s["throughput_rps"] == pytest.approx(0.4)
    assert s["errors"] == {"Unavailable": 1}
    assert s["tpot_ms"]["p50"] == pytest.approx(50.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(700.0)  # median of 0.5, 1.5, 0.2, 0.9
    assert s["itl_ms"]["p99"] == pytest.approx(200.0)
    # the duration defaults to first send -> last answer
    assert summarize(results[:1], offered_rate=1, slo_ttft_s=1, slo_tpot_s=1)["duration_s"] == pytest.approx(0.95)


@pytest.mark.fast
def test_percentiles_and_distserve_goodput():
    p = percentiles([1, 2, 3, 4, None])
    assert p["p50"] == 2.5 and p["mean"] == 2.5
    assert percentiles([])["p99"] is None
    pairs = ((0, 1.0), (0.5, 1.0), (1, 0.95), (2, 0.8), (3, 0.92))
    runs = [{"offered_rate_rps": r, "slo_attainment": a} for r, a in pairs]
    assert max_rate_at_attainment(runs, 0.9) == 1  # 3 req/s met it again, but 2 did not: stop at the first miss
    assert max_rate_at_attainment(runs, 0.99) == 0.5
    assert max_rate_at_attainment([{"offered_rate_rps": 1, "slo_attainment": 0.5}], 0.9) == 0.0


def _slo_run(tpots_by_setup: dict[str, list[float]], rate: float = 2.0) -> tuple[dict, dict]:
    """A saved `bench serve` run (report, per-request results) where request i of each setup has TTFT
    1 s and TPOT ``tpots_by_setup[setup][i]``, 11 tokens each, over a 10 s run."""
    modes = {"disagg": "disaggregated", "colocated": "colocated", "colocated@chunk256": "colocated"}
    report = {"slo": {"ttft_ms": 4000.0, "tpot_ms": 150.0}, "attainment_goal": 0.9,
              "setups": {n: {"mode": modes[n], "runs": [{"offered_rate_rps": rate, "duration_s": 10.0}]}
                         for n in tpots_by_setup}}
    raw = {n: {str(rate): [result_dict(_result(i, 1.0, 1.0 + 10 * t, 11)) for i, t in enumerate(tpots)]}
           for n, tpots in tpots_by_setup.items()}
    return report, raw


@pytest.mark.fast
def test_slo_scale_counts_good_requests_at_each_scale_against_the_better_colocated_setup():
    report, raw = _slo_run({
        "disagg": [0.04] * 10,  # steady decode: within 75 ms
        "colocated": [0.04] * 5 + [0.12] * 5,  # half stalled by prefills: within 150 ms, not 75
        "colocated@chunk256": [0.04] * 7 + [0.09] * 3,  # chunked: milder stalls
    })
    scan = slo_scale.scan(report, raw, [1.0, 0.5])
    half, one = scan["scales"]  # sorted by scale
    assert (half["scale"], half["slo_ttft_ms"], half["slo_tpot_ms"]) == (0.5, 2000.0, 75.0)
    assert {n: r[0]["good"] for n, r in half["runs"].items()} == {"disagg": 10, "colocated": 5, "colocated@chunk256": 7}
    (row,) = half["comparison"]
    assert row["baseline"] == "colocated@chunk256" and row["goodput_ratio"] == pytest.approx(10 / 7, abs=1e-3)
    assert half["max_rate_at_attainment_rps"] == {"disagg": 2.0, "colocated": 0.0, "colocated@chunk256": 0.0}
    (row,) = one["comparison"]
    assert row["goodput_ratio"] == 1.0 and row["attainment"] == row["baseline_attainment"] == 1.0
    # scaling the TTFT SLO alone leaves TPOT at 150 ms: everything is good until TTFT drops below 1 s
    ttft_only = slo_scale.scan(report, raw, [0.5, 0.2], "ttft")["scales"]
    assert [s["runs"]["colocated"][0]["good"] for s in ttft_only] == [0, 10]
    with pytest.raises(ValueError):
        slo_scale.scan(report, raw, [0.0])


@pytest.mark.fast
def test_bench_slo_scale_reads_a_saved_run_and_writes_json_and_png(tmp_path, capsys):
    report, raw = _slo_run({"disagg": [0.04] * 4, "colocated": [0.2] * 4})
    (tmp_path / "serve.json").write_text(json.dumps(report))
    (tmp_path / "serve_requests.json").write_text(json.dumps(raw))
    assert main(_args("slo-scale", str(tmp_path), "--scales", "0.5", "2")) == 0
    out = json.loads((tmp_path / "slo_scale.json").read_text())
    assert [s["scale"] for s in out["scales"]] == [0.5, 2.0]
    assert out["scales"][1]["comparison"][0]["goodput_ratio"] == 1.0  # TPOT SLO 300 ms: both good
    assert out["scales"][0]["comparison"][0]["goodput_ratio"] is None  # colocated has no good request
    assert (tmp_path / "slo_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "inf" in printed and "DistServe goodput" in printed
    assert main(_args("slo-scale", str(tmp_path / "missing"))) == 2


# ---- short real runs -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_bench_kv_all_paths_1mb(tmp_path, capsys):
    out = tmp_path / "kv"
    assert main(_args("kv", "--sizes-mb", "1", "--reps", "2", "--out", str(out), "--no-progress")) == 0
    report = json.loads((out / "kv.json").read_text())
    (row,) = report["rows"]
    assert row["size_bytes"] == 1 << 20 and row["memcpy_s"] > 0
    assert set(row["paths"]) == {"shm", "binary", "json"}
    for path in row["paths"].values():
        assert path["handoff_s"] > 0 and path["ratio_to_memcpy"] > 0
        assert path["gb_s"] == pytest.approx((1 << 20) / path["handoff_s"] / 1e9)
    assert set(row["components_s"]) == {"checksum", "shm_write", "shm_read", "alloc_copy"}
    text = capsys.readouterr().out
    assert "memcpy" in text and "binary vs json" in text


@pytest.mark.e2e
def test_bench_serve_mock_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "serve"
    args = _args("serve", "--engine", "mock", "--mock-prefill-cost-per-token-s", "0.0005",
                 "--mock-decode-cost-per-step-s", "0.005", "--workload", "chat", "--prompt-scale", "0.1",
                 "--output-scale", "0.2", "--rates", "0", "4", "--duration-s", "1.5", "--min-requests", "4",
                 "--sequential-requests", "3", "--setups", "disagg,colocated", "--warmup", "1", "--cooldown-s", "0.2",
                 "--gap-s", "0.05", "--peer", "vllm", "--out", str(out), "--no-progress")
    assert main(args) == 0
    report = json.loads((out / "serve.json").read_text())
    assert set(report["setups"]) == {"disagg", "colocated"}
    assert report["setups"]["disagg"]["mode"] == "disaggregated"
    for s in report["setups"].values():
        assert [r["offered_rate_rps"] for r in s["runs"]] == [0, 4]
        for run in s["runs"]:
            assert run["completed"] == run["requests"] > 0, run["errors"]
            assert run["ttft_ms"]["p50"] > 0 and run["e2e_ms"]["p99"] >= run["ttft_ms"]["p99"]
            assert 0 <= run["slo_attainment"] <= 1
    rows = report["comparison"]
    assert {r["setup"] for r in rows} == {"disagg"} and {r["rate_rps"] for r in rows} == {0, 4}
    assert "vllm" in report["peers"]  # installed or not, the peer is reported
    assert "--engine vllm" in report["peers"]["vllm"] and report["peer_comparison"] == []  # skipped: mock engine
    raw = json.loads((out / "serve_requests.json").read_text())
    assert len(raw["disagg"]["4.0"]) == report["setups"]["disagg"]["runs"][1]["requests"]
    assert [s["scale"] for s in report["slo_scale"]["scales"]] == [0.5, 0.67, 1.0, 1.5]
    for png in ("serve_latency.png", "serve_goodput.png", "slo_scale.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "disaggregated vs the better colocated" in capsys.readouterr().out


def test_setup_variants_change_only_their_engine_option(capsys):
    """``colocated@chunk256`` is the colocated setup whose nodes prefill in chunks of 256 tokens: its
    config says so (and `pdgrpc up` accepts it), the plain one keeps the run's own option."""
    import tomllib

    from pdgrpc import config as cfgmod
    from pdgrpc.bench import cluster as cl

    known = cl.standard_setups([0, 1])
    plain, chunked, none = (cl.setup_variant(n, known) for n in ("colocated", "colocated@chunk256", "disagg@chunk0"))
    assert plain is known["colocated"]
    assert (chunked.mode, none.mode) == ("colocated", "disaggregated")
    engine = {"engine": "torch", "prefill_chunk_tokens": 512}
    nodes = {s.name: cfgmod.from_dict(tomllib.loads(s.config_text(40000, engine))).nodes
             for s in (plain, chunked, none)}
    assert {n.engine.prefill_chunk_tokens for n in nodes["colocated"]} == {512}
    assert {n.engine.prefill_chunk_tokens for n in nodes["colocated@chunk256"]} == {256}
    assert {n.engine.prefill_chunk_tokens for n in nodes["disagg@chunk0"]} == {0}
    assert "chunks of 256 tokens" in chunked.description
    both = cl.setup_variant("disagg@chunk128@linear-torch", known)
    both_nodes = cfgmod.from_dict(tomllib.loads(both.config_text(40000, engine))).nodes
    assert {(n.engine.prefill_chunk_tokens, n.engine.linear_kernel) for n in both_nodes} == {(128, "torch")}
    assert "torch linear kernel" in both.description
    vendor = cl.setup_variant("colocated@mkl-vendor", known)
    vendor_nodes = cfgmod.from_dict(tomllib.loads(vendor.config_text(40000, engine))).nodes
    assert {n.engine.mkl_dispatch for n in vendor_nodes} == {"vendor"}
    for bad in ("colocated@fast", "nope@chunk1", "colocated@chunk", "disagg@linear-blas", "disagg@linear-",
                "disagg@mkl-intel"):
        with pytest.raises(ValueError):
            cl.setup_variant(bad, known)
    assert main(_args("serve", "--engine", "mock", "--setups", "disagg@chunk64,colocated")) == 2
    assert main(_args("serve", "--setups", "colocated,colocated")) == 2
    assert "need --engine torch" in capsys.readouterr().err


@pytest.mark.e2e
def test_bench_coordinator_short_sweep(tmp_path):
    out = tmp_path / "coord"
    assert main(_args("coordinator", "--rates", "10", "--duration-s", "1", "--out", str(out), "--no-progress")) == 0
    report = json.loads((out / "coordinator.json").read_text())
    (run,) = report["runs"]
    assert run["completed"] == run["requests"] >= 10
    assert {"coordinator", "prefill-0", "decode-0", "store", "client"} <= set(run["cpu_ms_per_request"])
    assert run["ttft_minus_prefill_ms"]["p50"] is not None
    ceiling, ms = run["cpu_ceiling_rps"], run["cpu_ms_per_request"]
    assert ceiling["coordinator"] == round(1000 / ms["coordinator"]) and ceiling["cluster"] < min(
        v for k, v in ceiling.items() if k != "cluster") * len(os.sched_getaffinity(0))
    assert isinstance(report["max_sustained_rps"], float)
    share_ok = run["ttft_minus_prefill_ms"]["p99"] <= 10.0 and run["throughput_rps"] >= 9.0
    assert run["coordinator_share_sustained"] is share_ok
    assert report["max_rps_coordinator_share_within_limit"] == (10.0 if share_ok else 0.0)
    assert report["stream_interval"] == 1
    assert (out / "coordinator.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_bench_coordinator_scaled_out(tmp_path):
    """2 coordinator processes, 2 decode nodes and 2 client processes sharing one arrival schedule."""
    out = tmp_path / "coord"
    assert main(_args("coordinator", "--rates", "20", "--duration-s", "1", "--coordinators", "2", "--decode", "2",
                      "--clients", "2", "--out", str(out), "--no-progress")) == 0
    report = json.loads((out / "coordinator.json").read_text())
    (run,) = report["runs"]
    assert run["completed"] == run["requests"] >= 20
    assert {"coordinator", "coordinator-1", "prefill-0", "decode-0", "decode-1", "client"} <= set(
        run["cpu_ms_per_request"])
    assert run["cpu_ms_per_request"]["client"] > 0  # the client processes' CPU, not the parent's


# ---- vLLM peer: the disaggregated-prefill proxy (no vLLM needed) ----------------------------------

@pytest.mark.fast
async def test_vllm_peer_proxy_prefills_with_one_token_then_streams_the_consumer():
    import asyncio

    from aiohttp import web

    from pdgrpc.bench.vllm_peer import make_proxy_app, time_request

    calls: list[tuple[str, dict]] = []
    chunks = [b'data: {"choices": [{"text": "a"}]}\n\n', b'data: {"choices": [{"text": "b"}]}\n\n',
              b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n',
              b"data: [DONE]\n\n"]

    async def producer(request: web.Request) -> web.Response:
        calls.append(("producer", await request.json()))
        return web.json_response({"choices": [{"text": "a"}]})

    async def consumer(request: web.Request) -> web.StreamResponse:
        calls.append(("consumer", await request.json()))
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for c in chunks:
            await out.write(c)
        await out.write_eof()
        return out

    async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"

    runners = []
    try:
        for handler in (producer, consumer):
            app = web.Application()
            app.router.add_post("/v1/completions", handler)
            runners.append(await serve(app))
        runners.append(await serve(make_proxy_app(runners[0][1], runners[1][1])))
        ttft, total, n = await asyncio.to_thread(time_request, runners[2][1], [5, 6, 7], 2)
    finally:
        for runner, _ in runners:
            await runner.cleanup()
    assert n == 2 and 0 < ttft <= total
    assert [who for who, _ in calls] == ["producer", "consumer"]
    prefill, decode = calls[0][1], calls[1][1]
    assert prefill["max_tokens"] == 1 and "stream" not in prefill and "stream_options" not in prefill
    assert prefill["prompt"] == decode["prompt"] == [5, 6, 7]
    assert decode["max_tokens"] == 2 and decode["stream"] is True and decode["ignore_eos"] is True


@pytest.mark.fast
def test_vllm_peer_servers_match_pdgrpc_settings_and_producer_never_chunks(tmp_path):
    from pdgrpc.bench.vllm_peer import server_command

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8192}')
    producer = server_command(str(tmp_path), 8100, "kv_producer", "/dev/shm/kv", "float32")
    consumer = server_command(str(tmp_path), 8200, "kv_consumer", "/dev/shm/kv", "float32")
    for cmd in (producer, consumer):
        assert cmd[cmd.index("--max-model-len") + 1] == "2048" and cmd[cmd.index("--block-size") + 1] == "32"
        assert "--enforce-eager" in cmd and "--no-enable-prefix-caching" in cmd
    transfer = json.loads(consumer[consumer.index("--kv-transfer-config") + 1])
    assert transfer == {"kv_connector": "ExampleConnector", "kv_role": "kv_consumer",
                        "kv_connector_extra_config": {"shared_storage_path": "/dev/shm/kv"}}
    # ExampleConnector would store a chunked prompt's first chunk under the whole prompt's key
    assert "--no-enable-chunked-prefill" in producer and "--no-enable-chunked-prefill" not in consumer


def test_vllm_mkl_peer_preloads_the_shim_into_both_servers(tmp_path, monkeypatch):
    """``--peer vllm-mkl``: vLLM gets the MKL kernels pdgrpc's engine gets (LD_PRELOAD of the same shim)."""
    from pdgrpc.bench.vllm_peer import VllmNativeDisagg

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 8192}')
    spawned: list[tuple[list, dict]] = []
    for preload in ("/opt/shim.so", ""):
        peer = VllmNativeDisagg([0], [1], preload=preload)
        monkeypatch.setattr(peer, "_spawn", lambda name, cmd, env, url: spawned.append((cmd, env)))
        peer._server("producer", str(tmp_path), "kv_producer", "/dev/shm/kv", [0])
        assert ("MKL kernels by CPU features" in peer.description) == bool(preload)
    (_, with_shim), (_, without) = spawned
    assert with_shim["LD_PRELOAD"].split()[0] == "/opt/shim.so"
    assert without.get("LD_PRELOAD", "") == os.environ.get("LD_PRELOAD", "")


# ---- the OpenAI HTTP sender (vLLM's own serving as a bench serve setup; no vLLM needed) -----------

async def _fake_openai(chunks_by_prompt: dict, gap_s: float = 0.05):
    """A fake /v1/completions: the request whose prompt starts with key k gets chunks_by_prompt[k]
    (bytes written with ``gap_s`` between them; an int: that HTTP status)."""
    import asyncio

    from aiohttp import web

    bodies: list[dict] = []

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        chunks = chunks_by_prompt[body["prompt"][0]]
        if isinstance(chunks, int):
            return web.json_response({"error": {"message": "bad"}}, status=chunks)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for c in chunks:
            await asyncio.sleep(gap_s)
            await out.write(c)
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", bodies


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


@pytest.mark.fast
async def test_openai_sender_times_tokens_like_the_grpc_sender():
    from pdgrpc.bench.driver import OpenAISender, open_sender, run_open_loop
    from pdgrpc.bench.workloads import BenchRequest

    good = [_sse({"choices": [{"text": "a", "token_ids": [11], "prompt_token_ids": [1, 2, 3]}]}),
            _sse({"choices": [{"text": "bc", "token_ids": [12, 13]}]}),  # two tokens in one chunk
            _sse({"choices": [{"text": "", "token_ids": [], "finish_reason": "length"}]}),  # no token: no ITL
            _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}), _sse(b"[DONE]")]
    chunks = {1: good,
              2: [good[0], _sse({"error": {"message": "EngineDeadError"}}), _sse(b"[DONE]")],
              3: [good[0], good[1]],  # cut off before the usage chunk
              4: 400}
    runner, url, bodies = await _fake_openai(chunks)
    try:
        assert isinstance(open_sender(url, 5), OpenAISender)
        reqs = [BenchRequest(i, 3, token_ids=(k, 2, 3)) for i, k in enumerate((1, 2, 3, 4))]
        results, duration = await run_open_loop(url, reqs, [0.0, 0.0, 0.0, 0.0], timeout_s=5, drain_timeout_s=5)
    finally:
        await runner.cleanup()
    ok, dead, cut, bad = results
    assert ok.ok and ok.output_tokens == 3 and ok.prompt_tokens == 3, ok
    assert len(ok.token_times_s) == 2 and ok.ttft_s == ok.token_times_s[0]
    assert 0.04 < ok.ttft_s < ok.token_times_s[1] < ok.e2e_s < duration + 1e-6
    assert ok.itls_s()[0] > 0.03 and ok.tpot_s == pytest.approx((ok.e2e_s - ok.ttft_s) / 2)
    assert not dead.ok and dead.error.startswith("ServerError") and "EngineDeadError" in dead.error
    assert not cut.ok and cut.error.startswith("NoFinal") and cut.output_tokens == 3
    assert not bad.ok and bad.error.startswith("HTTP400")
    body = bodies[0]
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert body["stream"] is True and body["temperature"] == 0.0 and body["return_token_ids"] is True
    assert body["stream_options"] == {"include_usage": True}
    summary = summarize(results, offered_rate=1.0, slo_ttft_s=1.0, slo_tpot_s=1.0)
    assert summary["completed"] == 1 and summary["errors"] == {"ServerError": 1, "NoFinal": 1, "HTTP400": 1}


@pytest.mark.fast
async def test_openai_sender_deadline():
    from pdgrpc.bench.driver import OpenAISender
    from pdgrpc.bench.workloads import BenchRequest

    slow = [_sse({"choices": [{"text": "a", "token_ids": [11]}]})] * 3
    runner, url, _ = await _fake_openai({1: slow}, gap_s=0.3)
    sender = OpenAISender(url, 0.5)
    try:
        res = await sender.send(BenchRequest(0, 3, token_ids=(1,)), RequestResult(0), 0.0, 0.5)
    finally:
        await sender.close()
        await runner.cleanup()
    assert res.error.startswith("DeadlineExceeded") and res.ttft_s is not None and not res.ok


@pytest.mark.fast
def test_peer_comparison_rows(capsys):
    from pdgrpc.bench.serve import compare, compare_peer, print_comparison

    def run(rate, ttft, goodput):
        pct = {"p50": ttft, "p99": ttft * 2, "p99.9": ttft * 2, "max": ttft * 3}
        return {"offered_rate_rps": rate, "ttft_ms": pct, "itl_ms": pct, "tpot_ms": pct, "goodput_rps": goodput}

    report = {"attainment_goal": 0.9, "setups": {
        "disagg": {"mode": "disaggregated", "runs": [run(0, 100, 1.0)], "max_rate_at_attainment_rps": 0},
        "colocated": {"mode": "colocated", "runs": [run(0, 200, 1.0)], "max_rate_at_attainment_rps": 0},
        "vllm-native-disagg": {"mode": "peer", "runs": [run(0, 400, 0.5)], "max_rate_at_attainment_rps": 0}}}
    raw = {"disagg": {"0": [{"index": 0, "ttft_s": 0.1}]}, "vllm-native-disagg": {"0": [{"index": 0, "ttft_s": 0.3}]}}
    report["comparison"] = compare(report, raw)
    report["peer_comparison"] = compare_peer(report, raw)
    assert [(r["setup"], r["baseline"]) for r in report["comparison"]] == [("disagg", "colocated")]  # peer left out
    (row,) = report["peer_comparison"]
    assert (row["setup"], row["baseline"], row["ttft_p50_ratio"], row["goodput_ratio"]) == (
        "disagg", "vllm-native-disagg", 0.25, 2.0)
    assert row["ttft_paired_median_ratio"] == pytest.approx(1 / 3)
    print_comparison(report)
    out = capsys.readouterr().out
    assert "disaggregated vs the better colocated" in out and "pdgrpc disaggregated vs vllm-native-disagg" in out
    # Without a colocated setup in the run, the table against the peer still prints.
    del report["setups"]["colocated"]
    report["comparison"] = compare(report, raw)
    print_comparison(report)
    out = capsys.readouterr().out
    assert "better colocated" not in out and "pdgrpc disaggregated vs vllm-native-disagg" in out


@pytest.mark.fast
async def test_vllm_peer_proxy_removes_a_prompts_kv_files_once_served(tmp_path):
    import asyncio
    import hashlib
    import os

    from aiohttp import web

    from pdgrpc.bench.vllm_peer import kv_folder, make_proxy_app, time_request

    prompt = list(range(3, 70))  # 67 tokens: ExampleConnector keys the first 64
    folder = kv_folder(str(tmp_path), prompt)
    assert folder == str(tmp_path / hashlib.md5(np.asarray(prompt[:64], dtype=np.int64).tobytes()).hexdigest())
    assert kv_folder(str(tmp_path), "a text prompt") is None
    seen: list[bool] = []

    async def producer(request: web.Request) -> web.Response:
        os.makedirs(folder)  # what ExampleConnector writes while the producer prefills
        (tmp_path / folder / "layer.0.safetensors").write_bytes(b"kv")
        return web.json_response({"choices": [{"text": "a"}]})

    async def consumer(request: web.Request) -> web.Response:
        seen.append(os.path.isdir(folder))  # still there while the consumer loads it
        return web.Response(text='data: {"choices": [{"text": "a", "token_ids": [7]}]}\n\n'
                                 'data: {"choices": [], "usage": {"prompt_tokens": 67, "completion_tokens": 1}}\n\n'
                                 "data: [DONE]\n\n", content_type="text/event-stream")

    runners = []
    try:
        for handler in (producer, consumer):
            app = web.Application()
            app.router.add_post("/v1/completions", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            runners.append((runner, f"http://127.0.0.1:{runner.addresses[0][1]}"))
        proxy = web.AppRunner(make_proxy_app(runners[0][1], runners[1][1], storage=str(tmp_path)))
        await proxy.setup()
        await web.TCPSite(proxy, "127.0.0.1", 0).start()
        runners.append((proxy, f"http://127.0.0.1:{proxy.addresses[0][1]}"))
        _, _, n = await asyncio.to_thread(time_request, runners[2][1], prompt, 1)
    finally:
        for runner, _ in runners:
            await runner.cleanup()
    assert n == 1 and seen == [True] and not os.path.exists(folder)


def test_grpc_calls_tool_runs_both_modes_against_its_own_server():
    """tools/bench_grpc_calls.py: a server process, a call per request and one multiplexed stream."""
    import pathlib
    import subprocess
    import sys

    tool = pathlib.Path(__file__).resolve().parent.parent / "tools" / "bench_grpc_calls.py"
    proc = subprocess.run([sys.executable, str(tool), "--rate", "200", "--requests", "40", "--rounds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.strip().startswith("call  client") for line in lines)
    assert any(line.strip().startswith("mux   client") for line in lines)
    assert "mux / call: client" in proc.stdout
