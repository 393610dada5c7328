"""Bad input over the public API and the internal ones: the documented status, a message that says
what is wrong, and every process still alive afterwards."""

from __future__ import annotations

import math
import zlib

import grpc
import pytest
from conftest import http_json, start_local_cluster, wait_until

from pdgrpc import convert
from pdgrpc import types as t
from pdgrpc.client import Client, build_request
from pdgrpc.engine.mock import MockEngine
from pdgrpc.v1 import coordinator_pb2, coordinator_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc

pytestmark = pytest.mark.e2e
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the whole table: it must survive every case."""
    lc = start_local_cluster(tmp_path_factory.mktemp("bad"))
    yield lc
    lc.stop()


def raw_generate(address: str, request: coordinator_pb2.GenerateRequest | bytes, timeout: float = 10):
    with grpc.insecure_channel(address) as ch:
        if isinstance(request, bytes):
            call = ch.unary_stream("/pdgrpc.v1.Coordinator/Generate", request_serializer=lambda b: b,
                                   response_deserializer=coordinator_pb2.GenerateResponse.FromString)
            return list(call(request, timeout=timeout))
        return list(coordinator_pb2_grpc.CoordinatorStub(ch).Generate(request, timeout=timeout))


def req(prompt="hello", **kw):
    return convert.generate_request_to_pb(build_request(prompt, **{"max_tokens": 4, **kw}))


def chat_req(messages, **kw):
    return convert.generate_request_to_pb(build_request(messages=messages, **{"max_tokens": 4, **kw}))


PUBLIC_CASES = [
    ("empty text prompt", req(""), INVALID, "empty"),
    ("no prompt at all", coordinator_pb2.GenerateRequest(sampling=convert.sampling_to_pb(t.SamplingParams())),
     INVALID, "prompt"),
    ("max_tokens 0", req(max_tokens=0), INVALID, "max_tokens"),
    ("max_tokens negative", req(max_tokens=-5), INVALID, "max_tokens"),
    ("max_tokens above the model limit", req(max_tokens=10**6), INVALID, "max_tokens"),
    ("temperature negative", req(temperature=-0.5), INVALID, "temperature"),
    ("temperature NaN", req(temperature=math.nan), INVALID, "temperature"),
    ("temperature inf", req(temperature=math.inf), INVALID, "temperature"),
    ("top_p above 1", req(top_p=1.5), INVALID, "top_p"),
    ("top_p negative", req(top_p=-0.1), INVALID, "top_p"),
    ("top_p NaN", req(top_p=math.nan), INVALID, "top_p"),
    ("top_k negative", req(top_k=-1), INVALID, "top_k"),
    ("unknown chat role", chat_req([{"role": "wizard", "content": "hi"}]), INVALID, "role"),
    ("empty chat", chat_req([]), INVALID, "chat"),
    ("token ids outside the vocabulary", convert.generate_request_to_pb(
        build_request(token_ids=[5, 10**7], max_tokens=4)), INVALID, "vocabulary"),
    ("negative token id", convert.generate_request_to_pb(build_request(token_ids=[-1], max_tokens=4)),
     INVALID, "vocabulary"),
    ("prompt longer than the model", convert.generate_request_to_pb(
        build_request(token_ids=[7] * 5000, max_tokens=4)), INVALID, "model limit"),
    ("bad request id", req(request_id="../../etc"), INVALID, "request_id"),
    ("empty stop string", req(stop=[""]), INVALID, "stop"),
    ("too many stop strings", req(stop=["s"] * 40), INVALID, "stop"),
]


def _chat_with_unknown_field() -> bytes:
    # A ChatMessage with an extra field 7 (a client built against another schema).
    msg = coordinator_pb2.GenerateRequest()
    msg.ParseFromString(chat_req([{"role": "user", "content": "hi"}]).SerializeToString())
    chat = msg.prompt.chat.messages[0].SerializeToString() + b"\x3a\x03abc"  # field 7, bytes "abc"
    prompt = b"\x12" + bytes([len(chat) + 2]) + b"\x0a" + bytes([len(chat)]) + chat
    sampling = convert.sampling_to_pb(t.SamplingParams(max_tokens=4)).SerializeToString()
    return b"\x0a" + bytes([len(prompt)]) + prompt + b"\x12" + bytes([len(sampling)]) + sampling


@pytest.mark.parametrize("name,request_msg,code,needle", PUBLIC_CASES, ids=[c[0] for c in PUBLIC_CASES])
def test_public_api_rejects(cluster, name, request_msg, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, request_msg)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details()


def test_client_names_the_argument_for_a_prompt_of_token_ids():
    with pytest.raises(TypeError, match="token_ids="):
        build_request([5, 6, 7], max_tokens=4)


def test_unknown_fields_in_chat_messages_are_rejected(cluster):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, _chat_with_unknown_field())
    assert info.value.code() == INVALID and "unknown fields" in info.value.details()


def test_garbage_bytes_are_rejected_not_fatal(cluster):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, b"\xff\xff\xff\x07garbage")
    assert info.value.code() == INVALID and "malformed" in info.value.details()


# ---- internal APIs ---------------------------------------------------------------------------

def _decode_call(cluster, messages: list[t.DecodeInput]):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.base + 40}") as ch:
        stub = decode_pb2_grpc.DecodeStub(ch)
        return list(stub.Decode(iter([convert.decode_input_to_pb(m) for m in messages]), timeout=10))


def _good_start(engine: MockEngine, ids, rid="bad-1") -> t.DecodeStart:
    return t.DecodeStart(rid, tuple(ids), t.SamplingParams(max_tokens=4), engine.spec.fingerprint)


def _descriptor(cluster, engine, ids, key="bad-1.g0", **changes) -> t.KVDescriptor:
    spec = engine.spec
    d = t.KVDescriptor(
        request_id="bad-1", store_address=cluster.store, key=key, location="dram",
        layout=t.KVLayout(spec.fingerprint, spec.dtype, 0, 6, 0, len(ids), spec.num_kv_heads, spec.head_dim),
        size_bytes=spec.kv_bytes(6, len(ids)), crc32=0, lease_expiry_unix=0.0)
    return d.replace(**changes)


@pytest.fixture
def engine():
    return MockEngine()


def _expect(cluster, messages, code, needle):
    with pytest.raises(grpc.RpcError) as info:
        _decode_call(cluster, messages)
    assert info.value.code() == code, info.value.details()
    assert needle in info.value.details(), info.value.details()


def test_decode_first_message_must_be_start(cluster, engine):
    _expect(cluster, [t.DecodeKVDone(5, 0)], INVALID, "DecodeStart")


def test_decode_rejects_a_foreign_model_fingerprint(cluster, engine):
    ids = [1, 5, 6]
    start = _good_start(engine, ids)
    _expect(cluster, [t.DecodeStart(start.request_id, start.prompt_token_ids, start.sampling, "other-model")],
            grpc.StatusCode.FAILED_PRECONDITION, "other-model")


def test_decode_missing_key_is_not_found(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, key="bad-1.nope"),
                      t.DecodeKVDone(5, 1)], grpc.StatusCode.NOT_FOUND, "bad-1.nope")


def test_decode_descriptor_from_another_store_is_refused(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, store_address="10.0.0.1:9015")],
            grpc.StatusCode.FAILED_PRECONDITION, "store")


def test_decode_descriptor_with_wrong_size_is_invalid(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, size_bytes=12)],
            INVALID, "size")


def test_decode_descriptor_of_another_request_is_invalid(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, request_id="someone-else")],
            INVALID, "someone-else")


def test_decode_path_like_shm_name_is_invalid(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, shm_name="../../etc/passwd")],
            INVALID, "shared-memory")


@pytest.mark.parametrize("name, offset", [("pdgrpc-123-abc", 4096), ("pdgrpc-123-arenaabc", 100)])
def test_decode_shm_offset_outside_an_arena_is_invalid(cluster, engine, name, offset):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, shm_name=name, shm_offset=offset)],
            INVALID, "shm offset")


def test_decode_checksum_mismatch_is_data_loss(cluster, engine):
    import urllib.request

    ids = [1, 5, 6]
    data = engine.kv_bytes(ids, 0, 6)
    put = urllib.request.Request(f"http://{cluster.store}/v1/kv/bad-1.g0?owner=bad-1&lease_s=30", data=data,
                                 method="PUT")
    urllib.request.urlopen(put, timeout=5).read()
    desc = _descriptor(cluster, engine, ids, crc32=(zlib.crc32(data) + 1) & 0xFFFFFFFF)
    _expect(cluster, [_good_start(engine, ids), desc, t.DecodeKVDone(5, 1)], grpc.StatusCode.DATA_LOSS, "")
    urllib.request.urlopen(urllib.request.Request(f"http://{cluster.store}/v1/owner/bad-1", method="DELETE"))


def test_decode_kv_done_with_missing_groups_is_invalid(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), t.DecodeKVDone(5, 3)], INVALID, "KV groups")


def test_prefill_rejects_bad_request_id(cluster):
    with grpc.insecure_channel(f"127.0.0.1:{cluster.base + 10}") as ch:
        stub = prefill_pb2_grpc.PrefillStub(ch)
        msg = convert.prefill_request_to_pb(t.PrefillRequest("a/b", t.Prompt(text="x"), t.SamplingParams()))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Prefill(msg, timeout=10))
    assert info.value.code() == INVALID and "request_id" in info.value.details()


def test_store_rejects_malformed_requests(cluster):
    import urllib.error
    import urllib.request

    for method, path, body in [("POST", "/write", b"{not json"), ("POST", "/write", b'{"value": 1}'),
                               ("POST", "/write_extended",
                                b'{"key": "k", "serialized_value": {"type": "pickle", "data": "gASV"}}')]:
        r = urllib.request.Request(f"http://{cluster.store}{path}", data=body, method=method,
                                   headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(r, timeout=5)
        assert info.value.code == 400


def test_everything_survived_the_table(cluster):
    assert all(p.alive() for p in cluster.procs.values())
    with Client(cluster.coordinator) as client:
        assert client.complete("still fine", max_tokens=3).final.completion_tokens == 3
    # Decode releases loaded KV in the background: the store is empty soon after, not at once.
    assert wait_until(lambda: http_json(f"http://{cluster.store}/stats")["stats"]["total_keys"] == 0, 10)


def test_invalid_utf8_text_is_rejected(cluster):
    text = b"\xff\xfe\xfd"
    prompt = b"\x0a" + bytes([len(text)]) + text                  # Prompt.text
    sampling = convert.sampling_to_pb(t.SamplingParams(max_tokens=4)).SerializeToString()
    raw = b"\x0a" + bytes([len(prompt)]) + prompt + b"\x12" + bytes([len(sampling)]) + sampling
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, raw)
    assert info.value.code() == INVALID and "malformed" in info.value.details()


def test_oversized_message_is_refused_by_size(cluster):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, req("x" * (17 * 1024 * 1024)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_huge_token_prompt_under_the_size_limit_is_invalid_not_fatal(cluster):
    with pytest.raises(grpc.RpcError) as info:
        raw_generate(cluster.coordinator, convert.generate_request_to_pb(
            build_request(token_ids=[5] * 200_000, max_tokens=4)), timeout=30)
    assert info.value.code() == INVALID and "model limit" in info.value.details()


def test_decode_on_cpu_refuses_gpu_kv(cluster, engine):
    ids = [1, 5, 6]
    _expect(cluster, [_good_start(engine, ids), _descriptor(cluster, engine, ids, location="device")],
            grpc.StatusCode.FAILED_PRECONDITION, "CUDA")
