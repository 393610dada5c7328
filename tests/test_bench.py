"""`pdgrpc bench`: workloads, statistics, and short real runs of `kv`, `serve` and `coordinator`.

Behaviour only: the runs use tiny sizes and low rates and check what is written, never how fast."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pdgrpc.bench import add_arguments, main
from pdgrpc.bench.stats import RequestResult, max_rate_at_attainment, percentiles, summarize
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
    raw = json.loads((out / "serve_requests.json").read_text())
    assert len(raw["disagg"]["4.0"]) == report["setups"]["disagg"]["runs"][1]["requests"]
    for png in ("serve_latency.png", "serve_goodput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "disaggregated vs the better colocated" in capsys.readouterr().out


@pytest.mark.e2e
def test_bench_coordinator_short_sweep(tmp_path):
    out = tmp_path / "coord"
    assert main(_args("coordinator", "--rates", "10", "--duration-s", "1", "--out", str(out), "--no-progress")) == 0
    report = json.loads((out / "coordinator.json").read_text())
    (run,) = report["runs"]
    assert run["completed"] == run["requests"] >= 10
    assert {"coordinator", "prefill-0", "decode-0", "store", "client"} <= set(run["cpu_ms_per_request"])
    assert run["ttft_minus_prefill_ms"]["p50"] is not None
    assert isinstance(report["max_sustained_rps"], float)


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
