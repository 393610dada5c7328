"""Nothing lost: node deaths, store and coordinator restarts, overload, leases and cancellation,
each with its own test over real processes (mock engine, costs set so phases take real time)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import pytest
from conftest import http_json, mock_reference, wait_until

from pdgrpc import convert
from pdgrpc import types as t
from pdgrpc.client import Client
from pdgrpc.errors import NotFound, PdgrpcError, ResourceExhausted, Unavailable
from pdgrpc.types import GenerateDelta, GenerateFinal, NodeHealth
from pdgrpc.v1 import prefill_pb2_grpc

pytestmark = pytest.mark.e2e

SLOW_PREFILL = ("--mock-prefill-cost-per-token-s", "0.004")
SLOW_DECODE = ("--mock-decode-cost-per-step-s", "0.04")


def _busy_node(client: Client, role: str) -> str:
    """The node of a role that the coordinator has a request on now."""
    for _ in range(200):
        for n in client.cluster_status().nodes:
            if n.role.value == role and n.inflight_requests > 0:
                return n.name
        time.sleep(0.01)
    raise AssertionError(f"no busy {role} node")


def test_prefill_node_killed_mid_request_retries_elsewhere(local_cluster):
    lc = local_cluster(prefill=2, decode=1, prefill_args=SLOW_PREFILL)
    prompt = "retry me " * 40   # ~1.4 s of prefill
    with Client(lc.coordinator) as client:
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=client.complete(prompt, max_tokens=12)))
        worker.start()
        victim = _busy_node(client, "prefill")
        time.sleep(0.3)
        lc.kill(victim)
        worker.join(timeout=30)
    res = result["r"]
    assert res.text == mock_reference(prompt, 12)[1]  # the client saw a normal stream
    assert res.final.prefill_node != victim
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)


def test_decode_node_killed_mid_stream_continues_on_another(local_cluster):
    lc = local_cluster(prefill=1, decode=2, decode_args=SLOW_DECODE)
    prompt = "keep going"
    with Client(lc.coordinator) as client:
        events = client.generate(prompt, max_tokens=40)
        got: list[int] = []
        text = ""
        victim = None
        for ev in events:
            if isinstance(ev, GenerateDelta):
                got.extend(ev.token_ids)
                text += ev.text
                if len(got) == 8:
                    victim = _busy_node(client, "decode")
                    lc.kill(victim)
            elif isinstance(ev, GenerateFinal):
                final = ev
    ids, ref_text = mock_reference(prompt, 40)
    assert got == ids and text == ref_text   # identical to an undisturbed greedy run
    assert final.completion_tokens == 40 and final.decode_node != victim
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)


def test_no_node_left_is_unavailable_within_two_seconds(local_cluster):
    lc = local_cluster(prefill=1, decode=1, decode_args=SLOW_DECODE)
    with Client(lc.coordinator) as client:
        stream = client.generate("doomed", max_tokens=200)
        next(stream)
        lc.kill("decode-0")
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            client.complete("next one", max_tokens=4)
        assert time.monotonic() - t0 < 2.0


def test_store_restart_nodes_reconnect(local_cluster):
    lc = local_cluster()
    with Client(lc.coordinator) as client:
        assert client.complete("before", max_tokens=4).final.completion_tokens == 4
        lc.kill("store")
        # While the store is down requests fail with a clear status, and no process dies.
        with pytest.raises(PdgrpcError) as info:
            client.complete("store down", max_tokens=4)
        assert isinstance(info.value, (Unavailable, NotFound)), info.value
        lc.restart("store", "kvstore ")
        assert wait_until(lambda: _works(client), 10)
        long_prompt = "a long prompt for the shared-memory path " * 20
        assert client.complete(long_prompt, max_tokens=4).text == mock_reference(long_prompt, 4)[1]
    assert all(p.alive() for p in lc.procs.values())


def _works(client: Client) -> bool:
    try:
        return client.complete("after", max_tokens=4).final.completion_tokens == 4
    except PdgrpcError:
        return False


def test_coordinator_restart_finds_running_nodes(local_cluster):
    lc = local_cluster()
    lc.kill("coordinator")
    lc.restart("coordinator", "coordinator coordinator listening")
    with Client(lc.coordinator) as client:
        assert all(n.health is NodeHealth.SERVING for n in client.cluster_status().nodes)
        assert client.complete("found again", max_tokens=5).text == mock_reference("found again", 5)[1]


def test_overload_gets_resource_exhausted_with_a_retry_hint(local_cluster):
    lc = local_cluster(decode_args=(*SLOW_DECODE, "--max-requests", "2"))
    outcomes: list = []

    def one(i: int):
        try:
            with Client(lc.coordinator) as c:
                return c.complete(f"load {i}", max_tokens=20)
        except PdgrpcError as exc:
            return exc

    with Client(lc.coordinator) as client:  # let the coordinator learn the node's limit
        client.complete("warm", max_tokens=2)
    time.sleep(1.2)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(one, range(8)))
    rejected = [o for o in outcomes if isinstance(o, ResourceExhausted)]
    served = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(served) >= 2 and rejected, outcomes
    assert all(r.retry_after_s and r.retry_after_s > 0 for r in rejected)
    assert all(not isinstance(o, Exception) or isinstance(o, ResourceExhausted) for o in outcomes)
    assert all(p.alive() for p in lc.procs.values())


def test_full_store_fails_cleanly_and_drops_nothing(local_cluster):
    lc = local_cluster(store_memory="2MB")
    long_prompt = "x" * 2000   # ~460 KB of KV per layer group, ~92 MB in all: cannot fit
    with Client(lc.coordinator) as client:
        with pytest.raises(ResourceExhausted, match="store full"):
            client.complete(long_prompt, max_tokens=4)
        assert client.complete("small", max_tokens=3).final.completion_tokens == 3
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)
    metrics = _metrics_text(f"http://{lc.store}/metrics")
    assert 'pdgrpc_store_rejected_writes_total{reason="full"}' in metrics


def _metrics_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_unclaimed_kv_expires_by_lease(local_cluster):
    lc = local_cluster()
    with grpc.insecure_channel(f"127.0.0.1:{lc.base + 10}") as ch:
        req = t.PrefillRequest("orphan-1", t.Prompt(text="nobody decodes this"), t.SamplingParams(max_tokens=4), 1.0)
        events = [convert.prefill_event_from_pb(m) for m in
                  prefill_pb2_grpc.PrefillStub(ch).Prefill(convert.prefill_request_to_pb(req), timeout=10)]
    assert any(isinstance(e, t.KVDescriptor) for e in events)
    assert lc.store_stats()["total_keys"] > 0
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 5)
    published = sum(isinstance(e, t.KVDescriptor) for e in events)
    line = next(x for x in _metrics_text(f"http://{lc.store}/metrics").splitlines()
                if x.startswith("pdgrpc_store_lease_expiries_total "))
    assert float(line.split()[1]) == published


def test_cancel_stops_work_on_both_nodes(local_cluster):
    lc = local_cluster(prefill_args=SLOW_PREFILL, decode_args=SLOW_DECODE)

    def running(port: int) -> int:
        from pdgrpc.v1 import decode_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = (prefill_pb2_grpc.PrefillStub if port == lc.base + 10 else decode_pb2_grpc.DecodeStub)(ch)
            info = convert.node_info_from_pb(stub.GetNodeInfo(convert.node_info_request_pb(), timeout=5))
        return info.running_requests + info.queued_requests

    with Client(lc.coordinator) as client:
        stream = client.generate("stop me " * 10, max_tokens=500)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert running(lc.base + 40) == 1
        stream.close()
        assert wait_until(lambda: running(lc.base + 40) == 0, 5)
        # Cancelled during prefill: the prefill node stops too.
        import grpc as _grpc

        from pdgrpc.client import build_request
        from pdgrpc.v1 import coordinator_pb2_grpc

        with _grpc.insecure_channel(lc.coordinator) as ch:
            call = coordinator_pb2_grpc.CoordinatorStub(ch).Generate(
                convert.generate_request_to_pb(build_request("long prefill " * 60, max_tokens=5)), timeout=30)
            assert wait_until(lambda: running(lc.base + 10) == 1, 5, 0.01)
            call.cancel()
        assert wait_until(lambda: running(lc.base + 10) == 0, 5)
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)
    assert http_json(f"http://{lc.store}/stats")["stats"]["total_keys"] == 0
