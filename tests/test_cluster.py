"""End to end over real processes: the launcher, generation through P:D clusters, streaming overlap,
cancellation, and a killed node."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
import subprocess
import time
import urllib.request

import pytest
from conftest import Proc, free_port_base, http_json, mock_reference, pdgrpc_cmd, wait_until

from pdgrpc.client import AsyncClient, Client
from pdgrpc.errors import DeadlineExceeded, Unavailable
from pdgrpc.types import GenerateDelta, GenerateFinal, NodeHealth

pytestmark = pytest.mark.e2e

PROMPTS = ["Hello there", "x", "The quick brown fox jumps over the lazy dog. " * 20, "Ünïcödé ✓ prompt"]


def test_up_1x1_and_generate_cli_as_a_newcomer_would():
    base = free_port_base()
    up = Proc(pdgrpc_cmd("up", "--prefill", "1", "--decode", "1", "--port-base", str(base)))
    try:
        up.wait_for_line("cluster ready", timeout_s=60)
        listening = [line for line in up.lines if " listening on " in line]
        roles = sorted(line.split()[0] for line in listening)
        assert roles == ["coordinator", "decode", "kvstore", "prefill"]
        assert all(" metrics 127.0.0.1:" in line for line in listening)
        out = subprocess.run(pdgrpc_cmd("generate", "--coordinator", f"127.0.0.1:{base}", "--max-tokens", "24",
                                        "--json", "Hello there"), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        text, final_line = out.stdout.rsplit("\n", 2)[0], out.stdout.strip().splitlines()[-1]
        assert text == mock_reference("Hello there", 24)[1]
        final = json.loads(final_line)
        assert final["finish_reason"] == "length" and final["completion_tokens"] == 24
        assert final["timings"]["first_token_seconds"] > 0 and final["timings"]["kv_groups"] == 5
    finally:
        up.signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0
    assert "cluster stopped" in up.lines[-1]


def test_up_from_config_file_2x3_serves_concurrent_requests(tmp_path):
    base = free_port_base()
    config = tmp_path / "cluster.toml"
    config.write_text(f"""
port_base = {base}
[store]
max_memory = "512MB"
[defaults]
engine = "mock"
mock_decode_cost_per_step_s = 0.01
[[prefill]]
name = "p0"
[[prefill]]
name = "p1"
[[decode]]
name = "d0"
[[decode]]
name = "d1"
[[decode]]
name = "d2"
""")
    up = Proc(pdgrpc_cmd("up", "--config", str(config)))
    try:
        up.wait_for_line("cluster ready", timeout_s=60)
        with Client(f"127.0.0.1:{base}") as client:
            status = client.cluster_status()
            assert sorted(n.name for n in status.nodes) == ["d0", "d1", "d2", "p0", "p1"]
            assert all(n.health is NodeHealth.SERVING for n in status.nodes)
            jobs = [(p, 16 + i) for i, p in enumerate(PROMPTS * 3)]
            with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
                results = list(pool.map(lambda j: client.complete(j[0], max_tokens=j[1]), jobs))
        for (prompt, n), res in zip(jobs, results):
            ids, text = mock_reference(prompt, n)
            assert list(res.token_ids) == ids and res.text == text
        assert len({r.final.decode_node for r in results}) >= 2
        assert len({r.final.prefill_node for r in results}) == 2
        # Decode releases loaded KV in the background: the store is empty soon after, not at once.
        assert wait_until(lambda: http_json(f"http://127.0.0.1:{base + 1}/stats")["stats"]["total_keys"] == 0, 10)
    finally:
        up.stop(timeout_s=60)


async def test_coordinator_processes_share_one_port():
    """[coordinator] processes = 2: both serve the one port (the kernel spreads connections), each has
    its own metrics port, and every request is answered by exactly one of them."""
    base = free_port_base()
    up = Proc(pdgrpc_cmd("up", "--engine", "mock", "--coordinators", "2", "--port-base", str(base)))
    try:
        await asyncio.to_thread(up.wait_for_line, "cluster ready", 60)
        assert sorted(line.split()[1] for line in up.lines if line.startswith("coordinator ")) == [
            "coordinator-0", "coordinator-1"], up.lines
        # 16 connections: all of them on one process would be a 2**-15 chance.
        clients = [AsyncClient(f"127.0.0.1:{base}", connection_id=k) for k in range(16)]
        try:
            results = await asyncio.gather(*(c.complete(PROMPTS[0], max_tokens=8) for c in clients))
        finally:
            for c in clients:
                await c.close()
        assert all(r.text == mock_reference(PROMPTS[0], 8)[1] for r in results)
        served = [_requests_ok(base + 1000 + k) for k in range(2)]
        assert sum(served) == 16 and min(served) > 0, served
    finally:
        up.signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.proc.wait, 60) == 0, up.lines[-20:]


def _requests_ok(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pdgrpc_requests_total{") and 'outcome="ok"' in line)


def test_descriptors_reach_decode_before_prefill_finishes(local_cluster):
    # 300 prompt tokens at 2 ms each: about 120 ms per layer group, 5 groups.
    lc = local_cluster(prefill_args=("--mock-prefill-cost-per-token-s", "0.002"))
    prompt = "overlap " * 37
    with Client(lc.coordinator) as client:
        res = client.complete(prompt, max_tokens=8)
    assert res.final.timings.kv_groups == 5
    assert res.final.timings.kv_groups_loaded_before_prefill_done >= 3
    assert res.text == mock_reference(prompt, 8)[1]


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_cancelled_stream_leaves_the_store_empty(local_cluster, phase):
    lc = local_cluster(prefill_args=("--mock-prefill-cost-per-token-s", "0.004"),
                       decode_args=("--mock-decode-cost-per-step-s", "0.05"))
    if phase == "decode":
        with Client(lc.coordinator) as client:
            stream = client.generate("cancel me " * 30, max_tokens=500)
            for i, _ in enumerate(stream):
                if i == 3:
                    break
            stream.close()  # cancels the call
    else:
        import grpc

        from pdgrpc import convert
        from pdgrpc.client import build_request
        from pdgrpc.v1 import coordinator_pb2_grpc

        with grpc.insecure_channel(lc.coordinator) as ch:
            call = coordinator_pb2_grpc.CoordinatorStub(ch).Generate(
                convert.generate_request_to_pb(build_request("cancel me " * 30, max_tokens=500)), timeout=30)
            # Leave while prefill is still publishing groups.
            assert wait_until(lambda: lc.store_stats()["total_keys"] > 0, 10, 0.01)
            call.cancel()
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)
    # Nothing died, and the cluster still answers.
    with Client(lc.coordinator) as client:
        assert client.complete("still alive", max_tokens=4).final.completion_tokens == 4
    assert all(p.alive() for p in lc.procs.values())


def test_deadline_reaches_the_client_and_frees_kv(local_cluster):
    lc = local_cluster(decode_args=("--mock-decode-cost-per-step-s", "0.05"))
    with Client(lc.coordinator) as client:
        with pytest.raises(DeadlineExceeded):
            client.complete("slow", max_tokens=200, timeout_s=0.6)
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)


def test_killed_decode_node_gives_unavailable_within_seconds(local_cluster):
    lc = local_cluster()
    with Client(lc.coordinator) as client:
        assert client.complete("before", max_tokens=4).final.completion_tokens == 4
        lc.procs["decode-0"].signal(signal.SIGKILL)
        lc.procs["decode-0"].proc.wait(timeout=5)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.complete("after", max_tokens=4, timeout_s=30)
        assert time.monotonic() - t0 < 5
        # The coordinator notices on its own too.
        assert wait_until(lambda: any(n.name == "decode-0" and n.health is NodeHealth.UNREACHABLE
                                      for n in client.cluster_status().nodes), 5)
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)


def test_killed_prefill_node_gives_unavailable(local_cluster):
    lc = local_cluster()
    lc.procs["prefill-0"].signal(signal.SIGKILL)
    lc.procs["prefill-0"].proc.wait(timeout=5)
    with Client(lc.coordinator) as client:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.complete("x", max_tokens=4, timeout_s=30)
        assert time.monotonic() - t0 < 5


def test_async_client_streams_deltas_then_final(local_cluster):
    import asyncio

    from pdgrpc.client import AsyncClient

    lc = local_cluster()

    async def run():
        async with AsyncClient(lc.coordinator) as client:
            events = [e async for e in client.generate("async", max_tokens=10)]
            return events

    events = asyncio.run(run())
    assert all(isinstance(e, GenerateDelta) for e in events[:-1]) and isinstance(events[-1], GenerateFinal)
    assert "".join(e.text for e in events[:-1]) == mock_reference("async", 10)[1]


def test_stream_interval_sends_tokens_in_groups_with_the_same_text(local_cluster):
    """--stream-interval 4: decode's tokens reach the client four to a message (the first token is
    prefill's and goes at once; the last message has what is left); nothing else changes."""
    lc = local_cluster(decode_args=("--stream-interval", "4", "--mock-decode-cost-per-step-s", "0.002"))

    async def run():
        async with AsyncClient(lc.coordinator) as client:
            return [e async for e in client.generate("grouped", max_tokens=11)]

    events = asyncio.run(run())
    deltas = [e for e in events if isinstance(e, GenerateDelta)]
    assert [len(d.token_ids) for d in deltas] == [1, 4, 4, 2]
    assert "".join(d.text for d in deltas) == mock_reference("grouped", 11)[1]
    assert isinstance(events[-1], GenerateFinal) and events[-1].completion_tokens == 11
    with Client(lc.coordinator) as client:  # a stop inside a group ends it there
        stopped = client.complete("grouped", max_tokens=11, stop=[mock_reference("grouped", 11)[1][5:7]])
    assert stopped.final.finish_reason.name == "STOP" and len(stopped.token_ids) < 11
    # A colocated node groups the same way; logprobs stay one per token.
    coloc = local_cluster(colocated=1, node_args=("--stream-interval", "4", "--mock-decode-cost-per-step-s", "0.002"))
    with Client(coloc.coordinator) as client:
        events = list(client.generate("grouped", max_tokens=11, logprobs=True))
    deltas = [e for e in events if isinstance(e, GenerateDelta)]
    assert [len(d.token_ids) for d in deltas] == [1, 4, 4, 2]
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert "".join(d.text for d in deltas) == mock_reference("grouped", 11)[1]


def test_nodes_serve_health_and_reflection(local_cluster):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    lc = local_cluster()
    for port, service in ((lc.base, "pdgrpc.v1.Coordinator"), (lc.base + 10, "pdgrpc.v1.Prefill"),
                          (lc.base + 40, "pdgrpc.v1.Decode")):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = [s.name for a in answers for s in a.list_services_response.service]
            assert service in names and "grpc.health.v1.Health" in names


def test_colocated_mode_matches_disaggregated(local_cluster):
    disagg = local_cluster(decode_args=("--mock-decode-cost-per-step-s", "0.002"))
    coloc = local_cluster(colocated=1, node_args=("--mock-decode-cost-per-step-s", "0.002"))
    jobs = [(p, 12 + i) for i, p in enumerate(PROMPTS)]
    with Client(disagg.coordinator) as a, Client(coloc.coordinator) as b:
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            ra = list(pool.map(lambda j: a.complete(j[0], max_tokens=j[1]), jobs))
            rb = list(pool.map(lambda j: b.complete(j[0], max_tokens=j[1]), jobs))
        assert [r.token_ids for r in ra] == [r.token_ids for r in rb]
        assert [r.text for r in ra] == [r.text for r in rb]
        assert all(r.final.prefill_node == r.final.decode_node == "colocated-0" for r in rb)
        assert rb[0].final.timings.kv_groups == 0  # nothing went through the store
        assert [n.name for n in b.cluster_status().nodes] == ["colocated-0"]


def test_prefill_runs_a_batch_shortest_prompt_first():
    """Prompts queued together run shortest first: a short prompt that arrived behind a long one
    does not wait for the long one's whole prefill (the engine prefills a batch one prompt after
    another). The scheduler starts only once all three are queued, so they form one batch whatever
    the machine's load."""
    from pdgrpc.engine.mock import MockEngine, MockEngineConfig
    from pdgrpc.kvstore import KVStoreClient
    from pdgrpc.nodes.engine_thread import EngineThread
    from pdgrpc.nodes.prefill_service import PrefillLimits, PrefillService
    from pdgrpc.types import PrefillDone, PrefillRequest, Prompt, SamplingParams

    port = free_port_base()
    store_proc = Proc(pdgrpc_cmd("kvstore", "--port", str(port), "--max-memory", "256MB"))
    try:
        store_proc.wait_for_line("kvstore ")
        ran: list[str] = []  # the order the engine was given the prompts (finish order also hangs on the store)

        class RecordingEngine(MockEngine):
            def prefill(self, works, more=None):
                ran.extend(w.request_id for w in works)
                yield from super().prefill(works, more)

        engine = RecordingEngine(MockEngineConfig(prefill_cost_per_token_s=0.001))

        async def run() -> list[str]:
            finished: list[str] = []
            async with KVStoreClient(f"127.0.0.1:{port}") as store:
                service = PrefillService("p", engine, EngineThread("t"), store, PrefillLimits())

                async def one(rid: str, tokens: int) -> None:
                    req = PrefillRequest(rid, Prompt(token_ids=tuple([5] * tokens)), SamplingParams(max_tokens=1))
                    async for ev in service.prefill(req):
                        if isinstance(ev, PrefillDone):
                            finished.append(rid)
                    await store.release_owner(rid)

                tasks = []
                try:
                    for rid, tokens in [("long", 400), ("short-a", 10), ("short-b", 20)]:  # arrival order
                        tasks.append(asyncio.ensure_future(one(rid, tokens)))
                        assert await _until(lambda n=len(tasks): service.queued == n)
                    service.start()
                    await asyncio.gather(*tasks)
                finally:
                    await service.stop()
            return finished

        finished = asyncio.run(run())
        assert ran == ["short-a", "short-b", "long"]
        assert finished[-1] == "long"
    finally:
        store_proc.proc.terminate()
        store_proc.proc.wait(timeout=10)


def test_prefill_node_hands_arrivals_to_a_chunking_engine_between_chunks():
    """With an engine that prefills in chunks, a prompt queued while a long one runs joins the
    running batch at the next chunk boundary (``more``) instead of waiting for the next batch, and
    the two results reach their own callers. The engine here stops at its first boundary until the
    short prompt is queued, so the test does not hang on timing."""
    import threading

    from pdgrpc.engine.base import KVGroup, PrefillWork
    from pdgrpc.engine.mock import MockEngine, MockEngineConfig
    from pdgrpc.kvstore import KVStoreClient
    from pdgrpc.nodes.engine_thread import EngineThread
    from pdgrpc.nodes.prefill_service import PrefillLimits, PrefillService
    from pdgrpc.types import PrefillDone, PrefillRequest, Prompt, SamplingParams

    port = free_port_base()
    store_proc = Proc(pdgrpc_cmd("kvstore", "--port", str(port), "--max-memory", "256MB"))
    try:
        store_proc.wait_for_line("kvstore ")
        at_boundary, short_queued = threading.Event(), threading.Event()
        calls: list[list[str]] = []   # request ids of each prefill() call, joiners included
        first_tokens: list[str] = []  # the order the engine produced first tokens in

        class ChunkingEngine(MockEngine):
            prefill_joins = True

            def prefill(self, works, more=None):
                works = list(works)
                at_boundary.set()  # "one chunk of the long prompt done"
                assert short_queued.wait(30)
                works.extend(more())
                calls.append([w.request_id for w in works])
                for i in sorted(range(len(works)), key=lambda i: len(works[i].prompt_token_ids)):
                    for _, item in super().prefill([works[i]]):
                        if not isinstance(item, KVGroup):
                            first_tokens.append(works[i].request_id)
                        yield i, item

        engine = ChunkingEngine(MockEngineConfig())

        async def run() -> dict[str, int]:
            done: dict[str, int] = {}
            async with KVStoreClient(f"127.0.0.1:{port}") as store:
                service = PrefillService("p", engine, EngineThread("t"), store, PrefillLimits())
                service.start()

                async def one(rid: str, tokens: int) -> None:
                    req = PrefillRequest(rid, Prompt(token_ids=tuple([5 + tokens % 7] * tokens)),
                                         SamplingParams(max_tokens=2))
                    async for ev in service.prefill(req):
                        if isinstance(ev, PrefillDone):
                            done[rid] = ev.first_token_id
                    await store.release_owner(rid)

                try:
                    long_task = asyncio.ensure_future(one("long", 300))
                    assert await _until(at_boundary.is_set)
                    short_task = asyncio.ensure_future(one("short", 12))
                    assert await _until(lambda: service.queued == 1)
                    short_queued.set()
                    await asyncio.gather(long_task, short_task)
                    # The batch runner resets its count once the engine's iterator ends, which can be
                    # just after the last request got its token
                    assert await _until(lambda: service.queued == 0 and service.running == 0)
                finally:
                    await service.stop()
            return done

        from pdgrpc import metrics

        joins = metrics.NODE_PREFILL_JOINS.labels("prefill", "p")
        before = joins._value.get()
        done = asyncio.run(run())
        assert calls == [["long", "short"]]  # one engine call: the short prompt joined it
        assert joins._value.get() == before + 1
        assert first_tokens == ["short", "long"]
        solo = MockEngine(MockEngineConfig())
        for rid, tokens in (("long", 300), ("short", 12)):
            work = PrefillWork(rid, [5 + tokens % 7] * tokens, SamplingParams(max_tokens=2))
            want = [it for _, it in solo.prefill([work])]
            assert done[rid] == want[-1].token_id
    finally:
        store_proc.proc.terminate()
        store_proc.proc.wait(timeout=10)


async def _until(pred, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True
