"""Property-based fuzzing of what crosses the wire: descriptor decoding and request decoding never
raise anything but a domain error with a status (no crash, no INTERNAL)."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdgrpc import convert
from pdgrpc import types as t
from pdgrpc.engine.mock import MockEngine
from pdgrpc.errors import Code, PdgrpcError
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.nodes.decode_service import DecodeLimits, DecodeService
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.v1 import common_pb2, coordinator_pb2

pytestmark = pytest.mark.fast
ALLOWED = {Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION, Code.NOT_FOUND}


@pytest.fixture(scope="module")
def service():
    engine = MockEngine()
    return DecodeService("fuzz", engine, EngineThread("fuzz"), KVStoreClient("127.0.0.1:9"), DecodeLimits())


def _start(engine: MockEngine) -> t.DecodeStart:
    return t.DecodeStart("fuzz-1", tuple(range(3, 20)), t.SamplingParams(max_tokens=4), engine.spec.fingerprint)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_random_descriptor_bytes(service, data):
    try:
        msg = common_pb2.KVDescriptor.FromString(data)
    except DecodeError:
        return
    try:
        d = convert.descriptor_from_pb(msg)
        service._check_descriptor(d, _start(service.engine), set())
    except PdgrpcError as err:
        assert err.code in ALLOWED and err.message


layouts = st.builds(
    t.KVLayout, model_fingerprint=st.sampled_from(["", "mock-x", MockEngine().spec.fingerprint]),
    dtype=st.sampled_from(["float32", "bfloat16", "", "int8"]), layer_start=st.integers(-5, 40),
    layer_end=st.integers(-5, 40), token_start=st.integers(-5, 40), token_end=st.integers(-5, 40),
    num_kv_heads=st.integers(-1, 8), head_dim=st.integers(-1, 128),
    block_layout=st.sampled_from(["layer,kv,head,token,dim", "", "token,layer"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.builds(
    t.KVDescriptor, request_id=st.sampled_from(["fuzz-1", "other", ""]),
    store_address=st.sampled_from(["127.0.0.1:9", "10.0.0.1:9015", ""]), key=st.text(max_size=20),
    location=st.sampled_from(["dram", "pinned_dram", "device", "disk"]), layout=layouts,
    size_bytes=st.integers(0, 2**40), crc32=st.integers(0, 2**32 - 1), lease_expiry_unix=st.floats(allow_nan=True),
    shm_name=st.sampled_from(["", "pdgrpc-ok", "../../etc/passwd", "pdgrpc-a/b", "x" * 100]),
    device_index=st.integers(0, 8), group_index=st.integers(-3, 2000)))
def test_structured_descriptors(service, d):
    pb = convert.descriptor_to_pb(d)
    try:
        back = convert.descriptor_from_pb(common_pb2.KVDescriptor.FromString(pb.SerializeToString()))
        service._check_descriptor(back, _start(service.engine), set())
    except PdgrpcError as err:
        assert err.code in ALLOWED and err.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_generate_requests(data):
    try:
        msg = coordinator_pb2.GenerateRequest.FromString(data)
    except DecodeError:
        return
    try:
        req = convert.generate_request_from_pb(msg)
        req.prompt.validate()
        req.sampling.validate(4096, 49152)
    except PdgrpcError as err:
        assert err.code is Code.INVALID_ARGUMENT and err.message

