"""End-to-end tests of the KV store: a real `pdgrpc kvstore` process, its HTTP API and KVStoreClient.

Every test releases what it wrote, so the shared store is empty between tests (release_owner's test
checks total_keys == 0). Timing is only ever used as a generous upper bound.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdgrpc.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from pdgrpc.kvstore import KVStoreClient, PutResult, arena, shm

pytestmark = pytest.mark.e2e

MAX_MEMORY = 8 * 1024 * 1024  # "8MB": K/M/G are powers of 1024
TOKEN = "s3cret-token"


# ---- helpers -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreProcess:
    def __init__(self, tmp_dir, *extra: str, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("PDGRPC_STORE_TOKEN", None)
        self.stderr_path = tmp_dir / f"kvstore-{self.port}-{time.monotonic_ns()}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdgrpc", "kvstore", "--port", str(self.port), "--max-memory", "8MB", *extra],
            stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstore exited with {self.proc.returncode}: {self.stderr()}")
            try:
                if http_call(self.address, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvstore did not become healthy: {self.stderr()}")
            time.sleep(0.05)
        self.start_line = self.proc.stdout.readline().decode().strip()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode


def http_call(address: str, method: str, path: str, body: object = None,
              headers: dict | None = None) -> tuple[int, object]:
    """One request; the answer body parsed as JSON when it is JSON, else raw bytes."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(data)
        return resp.status, data
    finally:
        conn.close()


def _stats(address: str, headers: dict | None = None) -> dict:
    status, body = http_call(address, "GET", "/stats", headers=headers)
    assert status == 200, body
    return body["stats"]


def _metric(address: str, line_prefix: str) -> float:
    status, text = http_call(address, "GET", "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{line_prefix} not in /metrics")


@pytest.fixture(scope="module")
def store_proc(tmp_path_factory):
    proc = StoreProcess(tmp_path_factory.mktemp("kvstore"))
    yield proc
    assert proc.stop() == 0, proc.stderr()


@pytest.fixture(scope="module")
def store(store_proc) -> str:
    return store_proc.address


@pytest.fixture
def payload() -> bytes:
    return os.urandom(256 * 1024)


# ---- process and JSON API ------------------------------------------------------------------------

def test_start_line_and_health(store_proc, store):
    assert store_proc.start_line == f"kvstore store listening on {store} metrics {store}"
    assert http_call(store, "GET", "/health") == (200, {"status": "ok"})


def test_json_round_trip(store):
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "é"}}
    status, body = http_call(store, "POST", "/write", {"key": "j1", "value": value, "location": "dram"})
    assert (status, body) == (200, {"status": "success", "key": "j1", "location": "dram"})
    assert http_call(store, "GET", "/read/j1") == (200, {"key": "j1", "value": value, "found": True})

    status, loc = http_call(store, "GET", "/location/j1")
    assert status == 200 and loc["key"] == "j1" and loc["location"] == "dram"
    info = loc["locations"][0]
    assert set(info) == {"location", "size", "last_accessed", "copy_status", "copy_progress", "read_pointer"}
    assert info["copy_status"] == "complete" and info["size"] > 0
    status, all_locs = http_call(store, "GET", "/locations")
    assert status == 200 and all_locs["locations"]["j1"][0]["location"] == "dram"

    status, moved = http_call(store, "POST", "/move", {"key": "j1", "destination": "pinned_dram"})
    assert status == 200
    assert moved["source"] == "dram" and moved["destination"] == "pinned_dram" and moved["status"] == "success"
    assert http_call(store, "GET", "/location/j1")[1]["location"] == "pinned_dram"

    stats = _stats(store)
    for field in ("max_dram_size", "current_dram_size", "current_pinned_size", "dram_usage_percent",
                  "total_keys", "location_counts", "dram_keys", "pinned_keys", "disk_usage", "disk_keys",
                  "gpu_stats", "active_moves", "memory_info"):
        assert field in stats
    assert stats["max_dram_size"] == MAX_MEMORY
    assert stats["total_keys"] == 1 and stats["pinned_keys"] == 1 and stats["current_pinned_size"] == info["size"]

    assert http_call(store, "DELETE", "/release/j1") == (200, {"status": "success", "key": "j1"})
    status, body = http_call(store, "GET", "/read/j1")
    assert status == 404 and body["found"] is False and body["value"] is None and "j1" in body["error"]
    assert http_call(store, "DELETE", "/release/j1")[0] == 404
    assert _stats(store)["total_keys"] == 0


def test_json_write_overwrites_like_gswarm(store):
    assert http_call(store, "POST", "/write", {"key": "ow", "value": 1})[0] == 200
    assert http_call(store, "POST", "/write", {"key": "ow", "value": [2]})[0] == 200
    assert http_call(store, "GET", "/read/ow")[1]["value"] == [2]
    assert _stats(store)["total_keys"] == 1
    assert http_call(store, "DELETE", "/release/ow")[0] == 200


async def test_write_extended_json_and_base64(store):
    sv = {"type": "json", "data": {"tokens": [1, 2, 3]}}
    assert http_call(store, "POST", "/write_extended", {"key": "x1", "serialized_value": sv})[0] == 200
    assert http_call(store, "GET", "/read_extended/x1") == (
        200, {"key": "x1", "serialized_value": sv, "found": True})

    raw = bytes(range(256)) * 4
    sv = {"type": "base64", "data": base64.b64encode(raw).decode()}
    assert http_call(store, "POST", "/write_extended", {"key": "x2", "serialized_value": sv,
                                                         "location": "disk"})[0] == 200
    assert http_call(store, "GET", "/read_extended/x2")[1]["serialized_value"] == sv
    status, body = http_call(store, "GET", "/read/x2")
    assert status == 200 and body["value"] == {"encoding": "base64", "data": sv["data"]}
    async with KVStoreClient(store, use_shm=False) as client:
        assert await client.get("x2", size=len(raw), crc32=zlib.crc32(raw)) == raw
        stats = await client.stats()
        assert stats["disk_keys"] == 1 and stats["disk_usage"] == len(raw) and stats["total_keys"] == 2
        assert await client.release("x1") and await client.release("x2")
    status, body = http_call(store, "GET", "/read_extended/x2")
    assert status == 404 and body["found"] is False


def test_pickle_refused(store):
    body = {"key": "p", "serialized_value": {"type": "pickle", "data": base64.b64encode(b"\x80\x04N.").decode()}}
    status, answer = http_call(store, "POST", "/write_extended", body)
    assert status == 400
    assert "pickle" in answer["error"] and "refused" in answer["error"]
    assert http_call(store, "GET", "/read/p")[0] == 404


@pytest.mark.parametrize("raw, fragment", [
    (b'{"key": "a", "value": ', "malformed JSON"),
    (b"\xff\xfe not json", "malformed JSON"),
    (b'{"key": "a", "value": NaN}', "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (b"", "malformed JSON"),
])
def test_malformed_json_400(store, raw, fragment):
    status, body = http_call(store, "POST", "/write", raw, {"Content-Type": "application/json"})
    assert status == 400 and fragment in body["error"]


@pytest.mark.parametrize("body, fragment", [
    ({"value": 1}, "key"),
    ({"key": "k"}, "value"),
    ({"key": 5, "value": 1}, "key must be a string"),
    ({"key": "k", "value": 1, "location": "gpu"}, "location"),
    ({"key": "k", "value": 1, "lease_s": "soon"}, "lease_s"),
    ({"key": "k", "value": 1, "lease_s": -1}, "lease_s"),
    ({"key": "k", "value": 1, "owner": 7}, "owner"),
])
def test_missing_or_wrong_fields_400(store, body, fragment):
    status, answer = http_call(store, "POST", "/write", body)
    assert status == 400 and fragment in answer["error"]


@pytest.mark.parametrize("key", ["", "k" * 257, "a/b", "a\nb", "nul\x00", "del\x7f", ".."])
def test_bad_keys_400(store, key):
    status, body = http_call(store, "POST", "/write", {"key": key, "value": 1})
    assert status == 400 and "key" in body["error"]


def test_longest_key_accepted(store):
    key = "k" * 256
    assert http_call(store, "POST", "/write", {"key": key, "value": 1})[0] == 200
    assert http_call(store, "DELETE", f"/release/{key}")[0] == 200


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/read/nope", None),
    ("GET", "/read_extended/nope", None),
    ("GET", "/location/nope", None),
    ("DELETE", "/release/nope", None),
    ("POST", "/move", {"key": "nope", "destination": "dram"}),
    ("GET", "/v1/kv/nope", None),
    ("POST", "/send", {"key": "nope", "url": "127.0.0.1:1"}),
])
def test_unknown_key_404(store, method, path, body):
    status, answer = http_call(store, method, path, body)
    assert status == 404 and "nope" in answer["error"]


async def test_write_over_capacity_507_changes_nothing(store, monkeypatch):
    refused_segment = shm.new_segment_name()
    monkeypatch.setattr(shm, "new_segment_name", lambda *_: refused_segment)
    async with (KVStoreClient(store, use_shm=False) as client,
                KVStoreClient(store, use_shm=True, shm_min_bytes=0, shm_arena_bytes=0) as local):
        await client.put("big", os.urandom(6 * 1024 * 1024), owner="cap", lease_s=60)
        before = _stats(store)
        status, body = http_call(store, "POST", "/write", {"key": "too-big", "value": "x" * (3 * 1024 * 1024)})
        assert status == 507
        assert "bytes requested" in body["error"] and f"free of {MAX_MEMORY}" in body["error"]
        with pytest.raises(ResourceExhausted, match="bytes requested"):
            await client.put("too-big", b"y" * (3 * 1024 * 1024), owner="cap", lease_s=60)
        with pytest.raises(ResourceExhausted):
            await local.put("too-big-shm", b"z" * (3 * 1024 * 1024), owner="cap", lease_s=60)
        after = _stats(store)
        assert after["total_keys"] == before["total_keys"] and after["memory_info"] == before["memory_info"]
        assert not os.path.exists(os.path.join(shm.SHM_DIR, refused_segment)), "refused segment leaked"
        assert _metric(store, 'pdgrpc_store_rejected_writes_total{reason="full"}') >= 3
        assert await client.release_owner("cap") == 1


def test_oversize_body_413(store):
    status, body = http_call(store, "POST", "/write", b"x" * (MAX_MEMORY + 1024))
    assert status == 413 and "error" in body


# ---- binary and shared-memory paths ------------------------------------------------------------

async def test_binary_put_get_round_trip(store, payload):
    async with KVStoreClient(store, use_shm=False) as client:
        assert await client.health()
        result = await client.put("bin1", payload, owner="req-bin", lease_s=60, location="device:0")
        assert isinstance(result, PutResult)
        assert result.key == "bin1" and result.size == len(payload) and result.shm_name == ""
        assert result.crc32 == zlib.crc32(payload) and result.location == "device:0"
        assert result.lease_expiry_unix > time.time()
        got = await client.get("bin1", size=len(payload), crc32=result.crc32)
        assert isinstance(got, bytearray) and got == payload
        assert await client.get("bin1") == payload  # verified against the X-Checksum-Crc32 header
        assert (await client.stats())["gpu_stats"]["device:0"] == {"used": len(payload), "keys": 1}
        with pytest.raises(InvalidArgument, match="already exists"):
            await client.put("bin1", b"again", owner="req-bin", lease_s=60)
        assert await client.release("bin1") is True
        assert await client.release("bin1") is False
        with pytest.raises(NotFound):
            await client.get("bin1")


async def test_binary_put_odd_keys_and_views(store):
    async with KVStoreClient(store, use_shm=False) as client:
        key = "req?1#a %2F b:é"
        data = memoryview(bytearray(b"abc" * 1000))
        await client.put(key, data, owner="odd", lease_s=60)
        assert await client.get(key) == b"abc" * 1000
        assert await client.put("empty", b"", owner="odd", lease_s=60)
        assert await client.get("empty", size=0, crc32=0) == b""
        assert await client.release_owner("odd") == 2


def test_binary_put_checks_header_and_args(store):
    status, body = http_call(store, "PUT", "/v1/kv/h1?owner=o&lease_s=10", b"data",
                             {"X-Checksum-Crc32": str((zlib.crc32(b"data") + 1) % 2**32)})
    assert status == 400 and "checksum mismatch" in body["error"]
    for bad in ("\u00b2", "12a", "4294967296", "9" * 5000):
        status, body = http_call(store, "PUT", "/v1/kv/h1", b"data", {"X-Checksum-Crc32": bad})
        assert status == 400 and "X-Checksum-Crc32" in body["error"]
    status, body = http_call(store, "PUT", "/v1/kv/h1?owner=o&lease_s=nan", b"data")
    assert status == 400 and "lease_s" in body["error"]
    status, body = http_call(store, "PUT", "/v1/kv/h1?location=tape", b"data")
    assert status == 400 and "location" in body["error"]
    status, body = http_call(store, "PUT", "/v1/kv/h1", b"data", {"X-Checksum-Crc32": str(zlib.crc32(b"data"))})
    assert status == 201 and body["crc32"] == zlib.crc32(b"data") and body["lease_expiry_unix"] > time.time()
    status, data = http_call(store, "GET", "/v1/kv/h1")
    assert status == 200 and data == b"data"
    assert http_call(store, "PUT", "/v1/kv/h1", b"data")[0] == 409
    assert http_call(store, "DELETE", "/release/h1")[0] == 200


async def test_shm_put_get_release(store, payload):
    async with KVStoreClient(store, use_shm=True, shm_min_bytes=0, shm_arena_bytes=0) as client:
        result = await client.put("shm1", payload, owner="req-shm", lease_s=60)
        assert result.shm_name and shm.SHM_NAME_RE.fullmatch(result.shm_name)
        path = os.path.join(shm.SHM_DIR, result.shm_name)
        assert os.path.getsize(path) == len(payload)
        got = await client.get("shm1", shm_name=result.shm_name, size=result.size, crc32=result.crc32)
        assert got == payload
        assert await client.get("shm1") == payload  # over HTTP the store reads the segment itself
        status, loc = http_call(store, "GET", "/location/shm1")
        assert loc["locations"][0]["read_pointer"] == result.shm_name
        assert (await client.stats())["shm_keys"] == 1
        assert _metric(store, 'pdgrpc_store_writes_total{path="shm"}') >= 1
        assert await client.release("shm1")
        assert not os.path.exists(path)
        with pytest.raises(NotFound):
            await client.get("shm1", shm_name=result.shm_name, size=result.size)


async def test_auto_shm_for_loopback(store):
    client = KVStoreClient(store)
    assert await client.shm_enabled() is True
    await client.close()


@pytest.mark.parametrize("name", ["../etc/passwd", "pdgrpc-a/b", "x", "pdgrpc-", "/dev/shm/pdgrpc-a",
                                  "pdgrpc-" + "a" * 65, "pdgrpc-a.b", 12, None])
def test_shm_adopt_rejects_bad_names(store, name):
    status, body = http_call(store, "POST", "/v1/kv/adopt1/shm", {"shm_name": name, "size": 4, "crc32": 0})
    assert status == 400 and "shm" in body["error"]


def test_shm_adopt_checks_segment(store):
    name = shm.new_segment_name()
    status, body = http_call(store, "POST", "/v1/kv/adopt2/shm", {"shm_name": name, "size": 4, "crc32": 0})
    assert status == 400 and "does not exist" in body["error"]
    shm.create_segment(name, b"abcd")
    try:
        status, body = http_call(store, "POST", "/v1/kv/adopt2/shm", {"shm_name": name, "size": 5, "crc32": 0})
        assert status == 400 and "4 bytes" in body["error"]
        status, body = http_call(store, "POST", "/v1/kv/adopt2/shm", {"shm_name": name, "size": -1, "crc32": 0})
        assert status == 400 and "size" in body["error"]
        status, body = http_call(store, "POST", "/v1/kv/adopt2/shm", {"shm_name": name, "size": 4, "crc32": 2**32})
        assert status == 400 and "crc32" in body["error"]
        assert os.path.exists(os.path.join(shm.SHM_DIR, name)), "a refused adopt must not unlink"
    finally:
        shm.unlink_segment(name)


def test_shm_helpers_validate_names():
    for bad in ("../x", "pdgrpc-a/b", "x"):
        with pytest.raises(InvalidArgument):
            shm.create_segment(bad, b"")
        with pytest.raises(InvalidArgument):
            shm.read_segment(bad, 0)
        with pytest.raises(InvalidArgument):
            shm.unlink_segment(bad)
    name = shm.new_segment_name()
    with pytest.raises(NotFound):
        shm.read_segment(name, 1)
    assert shm.unlink_segment(name) is False


async def test_release_owner_frees_everything(store):
    async with (KVStoreClient(store, use_shm=False) as client,
                KVStoreClient(store, use_shm=True, shm_min_bytes=0, shm_arena_bytes=0) as local):
        for i in range(3):
            await client.put(f"a{i}", b"x" * 100, owner="req-A", lease_s=60)
        shm_result = await local.put("a-shm", b"y" * 100, owner="req-A", lease_s=60)
        await client.put("b0", b"z", owner="req-B", lease_s=60)
        assert (await client.stats())["total_keys"] == 5
        assert await client.release_owner("req-A") == 4
        assert not os.path.exists(os.path.join(shm.SHM_DIR, shm_result.shm_name))
        assert await client.release_owner("req-A") == 0  # idempotent
        assert await client.release_owner("req-B") == 1
        stats = await client.stats()
        assert stats["total_keys"] == 0 and stats["memory_info"]["used"] == 0
        assert _metric(store, "pdgrpc_store_released_total") >= 5


async def test_renew(store):
    async with KVStoreClient(store, use_shm=False) as client:
        await client.put("r1", b"x", owner="req-R", lease_s=3600)
        await client.put("r2", b"x", owner="req-R", lease_s=3600)
        assert await client.renew("nobody", 10) == 0
        with pytest.raises(InvalidArgument, match="lease_s"):
            await client.renew("req-R", 0)
        # Renewing sets the lease from now: a short renewal makes both entries expire soon.
        assert await client.renew("req-R", 0.2) == 2
        deadline = time.monotonic() + 10
        while (await client.stats())["total_keys"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await client.stats())["total_keys"] == 0
        assert await client.release_owner("req-R") == 0


async def test_lease_expiry_reclaims(store):
    expired_before = _metric(store, "pdgrpc_store_lease_expiries_total")
    async with (KVStoreClient(store, use_shm=False) as client,
                KVStoreClient(store, use_shm=True, shm_min_bytes=0, shm_arena_bytes=0) as local):
        await client.put("lease-bin", b"x" * 1000, owner="req-L", lease_s=0.3)
        result = await local.put("lease-shm", b"y" * 1000, owner="req-L", lease_s=0.3)
        path = os.path.join(shm.SHM_DIR, result.shm_name)
        deadline = time.monotonic() + 10  # generous: the reaper runs every 0.5 s
        while os.path.exists(path) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not os.path.exists(path), "expired shm segment was not unlinked"
        with pytest.raises(NotFound):
            await client.get("lease-bin")
        assert (await client.stats())["total_keys"] == 0
    assert _metric(store, "pdgrpc_store_lease_expiries_total") >= expired_before + 2


async def test_crc_mismatch_is_data_loss(store, payload):
    async with (KVStoreClient(store, use_shm=False) as client,
                KVStoreClient(store, use_shm=True, shm_min_bytes=0, shm_arena_bytes=0) as local):
        result = await client.put("crc1", payload, owner="req-C", lease_s=60)
        with pytest.raises(DataLoss, match="crc32"):
            await client.get("crc1", crc32=(result.crc32 + 1) % 2**32)
        with pytest.raises(DataLoss):
            await client.get("crc1", size=result.size + 1)
        shm_result = await local.put("crc2", payload, owner="req-C", lease_s=60)
        with pytest.raises(DataLoss):
            await local.get("crc2", shm_name=shm_result.shm_name, crc32=(shm_result.crc32 + 1) % 2**32)
        with pytest.raises(DataLoss):
            await local.get("crc2", shm_name=shm_result.shm_name, size=shm_result.size - 1)
        assert await client.release_owner("req-C") == 2


async def test_closed_port_is_unavailable():
    address = f"127.0.0.1:{_free_port()}"
    client = KVStoreClient(address, use_shm=False, timeout_s=5)
    start = time.monotonic()
    with pytest.raises(Unavailable, match=f"kv store {address} unreachable"):
        await client.put("k", b"x", owner="o", lease_s=1)
    with pytest.raises(Unavailable):
        await client.get("k")
    assert await client.health() is False
    assert time.monotonic() - start < 5
    await client.close()


class ScriptedStore:
    """A TCP server that answers each request on a connection with the next of ``answers`` (raw
    bytes; None: read the request, answer nothing) and records the requests it read."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.handlers: list[asyncio.Task] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        self.handlers.append(asyncio.current_task())
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _http_answer(status: int, body: dict, *extra: str) -> bytes:
    data = json.dumps(body).encode()
    head = "".join(f"{h}\r\n" for h in extra)
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n{head}\r\n"
    return head.encode() + data


async def test_json_calls_reuse_one_connection(store):
    async with KVStoreClient(store, use_shm=False) as client:
        for i in range(20):
            await client.write_json(f"reuse-{i}", i, owner="reuse")
            assert await client.read_json(f"reuse-{i}") == i
        assert len(client._channel._open) == 1  # 40 calls, one after another: one connection
        calls = [client.read_json(f"reuse-{i}") for i in range(5)]
        assert await asyncio.gather(*calls) == list(range(5))  # at once: one connection each
        assert await client.release_owner("reuse") == 20


async def test_json_call_errors_are_mapped_and_the_connection_kept():
    answers = [_http_answer(507, {"error": "full", "code": "RESOURCE_EXHAUSTED"}),
               _http_answer(404, {"error": "no such key"}),
               b"HTTP/1.1 500 X\r\nContent-Length: 4\r\n\r\noops",
               _http_answer(200, {"stats": {"total_keys": 7}})]
    async with ScriptedStore(answers) as fake, KVStoreClient(fake.address, use_shm=False, token=TOKEN) as client:
        with pytest.raises(ResourceExhausted, match="full"):
            await client.renew("o", 5)
        assert await client.release("gone") is False
        with pytest.raises(Unavailable, match="oops"):
            await client.stats()
        assert (await client.stats())["total_keys"] == 7
        assert fake.connections == 1
    assert fake.requests[0].startswith(b"POST /v1/lease/renew HTTP/1.1\r\n")
    assert f"Authorization: Bearer {TOKEN}\r\n".encode() in fake.requests[0]
    assert fake.requests[0].endswith(b'{"owner": "o", "lease_s": 5}')
    assert fake.requests[1].startswith(b"DELETE /release/gone HTTP/1.1\r\n")


async def test_json_call_without_an_answer_times_out_and_a_closed_connection_is_replaced():
    answers = [_http_answer(200, {"stats": {}}, "Connection: close"), None, _http_answer(200, {"stats": {"n": 1}}),
               b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{", b"garbage\r\n\r\n",
               _http_answer(200, {"stats": {"n": 2}})]
    async with ScriptedStore(answers) as fake, KVStoreClient(fake.address, use_shm=False, timeout_s=1) as client:
        assert await client.stats() == {}  # the store closes this connection after answering
        start = time.monotonic()
        with pytest.raises(Unavailable, match="did not answer within 1 s"):
            await client.stats()
        assert time.monotonic() - start < 5
        assert (await client.stats()) == {"n": 1}  # a new connection, the silent one is closed
        with pytest.raises(Unavailable, match="not JSON"):
            await client.stats()
        with pytest.raises(Unavailable, match="malformed answer"):
            await client.stats()
        assert (await client.stats()) == {"n": 2}
        assert not client._channel._idle or len(client._channel._open) == 1
    assert fake.connections == 4


async def test_cancelled_json_call_closes_its_connection():
    async with ScriptedStore([None, _http_answer(200, {"stats": {"n": 3}})]) as fake, \
            KVStoreClient(fake.address, use_shm=False) as client:
        call = asyncio.ensure_future(client.stats())
        while not fake.requests:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0)
        assert not client._channel._open  # its state was unknown: closed, not pooled
        assert (await client.stats()) == {"n": 3}
    assert fake.connections == 2


async def test_json_calls_survive_a_store_restart(tmp_path):
    first = StoreProcess(tmp_path)
    client = KVStoreClient(first.address, use_shm=False, timeout_s=5)
    try:
        await client.write_json("before", 1)
        port = first.port
        assert first.stop() == 0
        with pytest.raises(Unavailable):
            await client.read_json("before")
        second = StoreProcess(tmp_path, port=port)
        try:
            with pytest.raises(NotFound):  # the pooled connection died with the first store: a new one
                await client.read_json("before")
            await client.write_json("after", 2)
            assert await client.read_json("after") == 2
            assert await client.release("after")
        finally:
            assert second.stop() == 0
    finally:
        await client.close()


def test_metrics_exposed(store):
    status, text = http_call(store, "GET", "/metrics")
    assert status == 200
    text = text.decode()
    for name in ("pdgrpc_store_bytes", "pdgrpc_store_keys", "pdgrpc_store_capacity_bytes",
                 "pdgrpc_store_writes_total", "pdgrpc_store_rejected_writes_total",
                 "pdgrpc_store_lease_expiries_total", "pdgrpc_store_released_total",
                 "pdgrpc_store_read_bytes_total", "pdgrpc_store_written_bytes_total"):
        assert name in text
    assert _metric(store, "pdgrpc_store_capacity_bytes") == MAX_MEMORY


# ---- other processes: token, send, shutdown ----------------------------------------------------

async def test_token_auth(tmp_path):
    guarded = StoreProcess(tmp_path, "--token", TOKEN)
    try:
        addr = guarded.address
        status, body = http_call(addr, "GET", "/stats")
        assert status == 401 and "token" in body["error"]
        assert http_call(addr, "POST", "/write", {"key": "t", "value": 1},
                         {"Authorization": "Bearer wrong"})[0] == 401
        assert http_call(addr, "GET", "/health")[0] == 200
        assert http_call(addr, "GET", "/metrics")[0] == 200
        assert _stats(addr, {"Authorization": f"Bearer {TOKEN}"})["total_keys"] == 0
        async with KVStoreClient(addr, token=TOKEN, use_shm=False) as client:
            await client.put("t1", b"secret", owner="o", lease_s=60)
            assert await client.get("t1") == b"secret"
            assert await client.release("t1")
        async with KVStoreClient(addr, use_shm=False) as anonymous:
            with pytest.raises(FailedPrecondition, match="rejected the token"):
                await anonymous.put("t2", b"x", owner="o", lease_s=60)
    finally:
        assert guarded.stop() == 0


async def test_send_and_clean_shutdown(store, tmp_path):
    other = StoreProcess(tmp_path)
    try:
        assert http_call(store, "POST", "/write", {"key": "s1", "value": {"n": 1}})[0] == 200
        status, body = http_call(store, "POST", "/send", {"key": "s1", "url": other.address})
        assert status == 200 and body["target"] == other.address
        assert http_call(other.address, "GET", "/read/s1")[1]["value"] == {"n": 1}
        status, body = http_call(store, "POST", "/send_extended", {"key": "s1", "target": "node1:device:0"})
        assert status == 501 and "GPU" in body["error"]
        status, body = http_call(store, "POST", "/send", {"key": "s1", "url": "not a url"})
        assert status == 400
        assert http_call(store, "DELETE", "/release/s1")[0] == 200

        async with KVStoreClient(other.address, use_shm=True, shm_min_bytes=0) as client:
            result = await client.put("s2", b"kv" * 100, owner="o", lease_s=60)
        path = os.path.join(shm.SHM_DIR, result.shm_name)
        assert os.path.exists(path)
    finally:
        assert other.stop() == 0, other.stderr()
    assert not os.path.exists(path), "shutdown must unlink the store's segments"


def test_bad_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pdgrpc", "kvstore", "--max-memory", "lots"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "cannot parse size" in proc.stderr


# ---- fuzz ----------------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_keys = st.text(max_size=300) | st.sampled_from(["k", "a/b", "", ".."]) | st.integers() | st.none()
_locations = st.sampled_from(["dram", "pinned_dram", "disk", "device:3", "device:", "gpu"]) | _json
_serialized = _json | st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["json", "pickle", "base64", "raw"]) | _json,
    "data": _json | st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
})
_bodies = (
    st.binary(max_size=300)
    | st.fixed_dictionaries({}, optional={"key": _keys, "value": _json, "location": _locations,
                                          "owner": _json, "lease_s": _json}).map(lambda d: json.dumps(d).encode())
    | st.fixed_dictionaries({}, optional={"key": _keys, "serialized_value": _serialized,
                                          "location": _locations}).map(lambda d: json.dumps(d).encode())
    | _json.map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/write", "/write_extended"]), body=_bodies)
def test_fuzz_writes_never_break_the_store(store, path, body):
    status, answer = http_call(store, "POST", path, body, {"Content-Type": "application/json"})
    assert 200 <= status < 300 or 400 <= status < 500 or status == 507, (status, answer)
    if 200 <= status < 300:
        assert http_call(store, "DELETE", f"/release/{quote(answer['key'], safe='')}")[0] == 200
    else:
        assert isinstance(answer, dict) and answer["error"]
    assert http_call(store, "GET", "/health")[0] == 200


# ---- shm arenas ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def arena_store(tmp_path_factory):
    proc = StoreProcess(tmp_path_factory.mktemp("kvstore-arena"), "--max-memory", "64MB", "--arena-idle-s", "2")
    yield proc
    assert proc.stop() == 0, proc.stderr()


def _arena_client(address: str, arena_bytes: int = 1 << 20, inline_max_bytes: int | None = None) -> KVStoreClient:
    extra = {} if inline_max_bytes is None else {"inline_max_bytes": inline_max_bytes}
    return KVStoreClient(address, use_shm=True, shm_min_bytes=0, shm_arena_bytes=arena_bytes, **extra)


async def _get_put(client: KVStoreClient, key: str, put):
    """What a reader given ``put``'s descriptor fields gets back (a zero-copy view for an arena region)."""
    return await client.get(key, shm_name=put.shm_name, size=put.size, crc32=put.crc32, shm_offset=put.shm_offset)


async def test_arena_put_get_and_region_reuse(arena_store):
    store = arena_store.address
    async with _arena_client(store) as client:
        payload = os.urandom(300 * 1024)
        put = await client.put("ar1", payload, owner="req-ar", lease_s=60)
        assert arena.is_arena_name(put.shm_name) and put.crc32 == zlib.crc32(payload)
        view = await _get_put(client, "ar1", put)
        assert isinstance(view, memoryview) and view.readonly and view == payload  # zero-copy
        assert await client.get("ar1") == payload  # over HTTP the store reads the region (and its CRC)
        loc = http_call(store, "GET", "/location/ar1")[1]["locations"][0]
        assert loc["read_pointer"] == put.shm_name and loc["read_offset"] == put.shm_offset
        stats = await client.stats()
        assert stats["shm_arenas"] == 1 and stats["shm_arena_bytes"] == 1 << 20
        assert stats["memory_info"]["used"] == 1 << 20  # the arena is reserved; entries in it cost nothing more
        del view
        assert await client.release("ar1")
        # 1 MiB arena, 300 KiB puts: twenty puts fit only if released regions are reused.
        names = set()
        for i in range(20):
            data = os.urandom(300 * 1024)
            put = await client.put(f"ar-{i}", data, owner="req-ar", lease_s=60)
            names.add(put.shm_name)
            got = await _get_put(client, f"ar-{i}", put)
            assert got == data
            del got
            assert await client.release(f"ar-{i}")
        assert len(names) == 1 and arena.is_arena_name(names.pop())
        assert (await client.stats())["total_keys"] == 0


async def test_arena_full_falls_back_to_a_segment(arena_store):
    async with _arena_client(arena_store.address) as client:
        puts = [await client.put(f"af-{i}", os.urandom(400 * 1024), owner="req-af", lease_s=60) for i in range(3)]
        assert [arena.is_arena_name(p.shm_name) for p in puts] == [True, True, False]
        assert shm.SHM_NAME_RE.fullmatch(puts[2].shm_name)  # a segment of its own
        assert await client.release_owner("req-af") == 3
        # the store's answers told the client its regions are free again
        again = await client.put("af-again", os.urandom(400 * 1024), owner="req-af", lease_s=60)
        assert arena.is_arena_name(again.shm_name)
        await client.release("af-again")


async def test_arena_is_a_share_of_the_store(arena_store):
    async with _arena_client(arena_store.address, arena_bytes=1 << 30) as client:
        put = await client.put("ab1", os.urandom(300 * 1024), owner="req-ab", lease_s=60)
        assert arena.is_arena_name(put.shm_name)
        info = http_call(arena_store.address, "GET", f"/v1/shm/arenas/{put.shm_name}")[1]
        assert info["size"] == 16 << 20  # asked 1 GiB of a 64 MB store: a quarter
        await client.release("ab1")


async def test_arena_overwritten_region_is_data_loss(arena_store):
    async with _arena_client(arena_store.address) as client:
        payload = os.urandom(300 * 1024)
        put = await client.put("ao1", payload, owner="req-ao", lease_s=60)
        with open(os.path.join(shm.SHM_DIR, put.shm_name), "r+b") as f:  # a buggy writer scribbles
            f.seek(put.shm_offset + 1000)
            f.write(b"\x00" * 8 if payload[1000:1008] != b"\x00" * 8 else b"\x01" * 8)
        with pytest.raises(DataLoss):
            await client.get("ao1", shm_name=put.shm_name, size=put.size, crc32=put.crc32, shm_offset=put.shm_offset)
        await client.release("ao1")


def test_arena_regions_are_checked(arena_store):
    store = arena_store.address
    status, body = http_call(store, "POST", "/v1/shm/arenas", {"size": 1 << 20})
    assert status == 201, body
    name = body["arena"]
    try:
        def adopt(key, **fields):
            return http_call(store, "POST", f"/v1/kv/{key}/shm", {"shm_name": name, "size": 4096, **fields})

        assert adopt("rc1", offset=0)[0] == 201
        for fields, fragment in [({"offset": 100}, "multiple"), ({"offset": 1 << 20}, "outside"),
                                 ({"offset": 0}, "overlaps"), ({"offset": -4096}, "offset"),
                                 ({"offset": "0"}, "offset"), ({"crc32": 0}, "arena")]:
            status, body = adopt("rc2", **fields)
            assert status == 400 and fragment in body["error"], (fields, body)
        status, body = http_call(store, "POST", "/v1/kv/rc3/shm", {"shm_name": name[:-4] + "beef", "size": 1,
                                                                   "offset": 0})
        assert status == 404
        for size in (0, -1, 1 << 40, "1", None, True):
            assert http_call(store, "POST", "/v1/shm/arenas", {"size": size})[0] == 400, size
        status, info = http_call(store, "GET", f"/v1/shm/arenas/{name}")
        assert status == 200 and info["live"] == [[0, 4096]] and info["size"] == 1 << 20
    finally:
        status, body = http_call(store, "DELETE", f"/v1/shm/arenas/{name}")
        assert status == 200 and body["released"] == 1  # its entry went with it
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert http_call(store, "GET", "/location/rc1")[0] == 404


def test_arena_grants_are_bounded(arena_store):
    store = arena_store.address
    deadline = time.monotonic() + 15  # earlier tests' arenas go once idle (--arena-idle-s 2)
    while _stats(store)["shm_arenas"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    granted = []
    try:
        for asked, expected in [(1 << 30, 16 << 20), (16 << 20, 16 << 20), (4 << 20, 0)]:
            status, body = http_call(store, "POST", "/v1/shm/arenas", {"size": asked})
            if expected:  # each arena at most a quarter of the 64 MB budget, all together at most half
                assert status == 201 and body["size"] == expected, body
                granted.append(body["arena"])
            else:
                assert status == 507 and "half" in body["error"], body
    finally:
        for name in granted:
            assert http_call(store, "DELETE", f"/v1/shm/arenas/{name}")[0] == 200


def test_idle_arena_is_deleted(arena_store):
    status, body = http_call(arena_store.address, "POST", "/v1/shm/arenas", {"size": 4096})
    assert status == 201
    deadline = time.monotonic() + 10  # --arena-idle-s 2 plus the reaper's interval
    while http_call(arena_store.address, "GET", f"/v1/shm/arenas/{body['arena']}")[0] == 200:
        assert time.monotonic() < deadline, "an idle, empty arena was never deleted"
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, body["arena"]))


def test_region_allocator_ignores_answers_older_than_a_resync():
    regions = arena.RegionAllocator(4 * arena.ALIGN)
    a, b = regions.alloc(10), regions.alloc(arena.ALIGN + 1)
    assert (a, b) == (0, arena.ALIGN)
    regions.commit(a)
    regions.commit(b)
    assert regions.alloc(2 * arena.ALIGN + 1) is None
    regions.resync([(b, arena.ALIGN + 1)], version=5)  # the store dropped a
    c = regions.alloc(10)
    assert c == 0
    regions.commit(c)
    regions.freed(4, [(0, 10)])  # a late answer that still says "0 is free": 0 is c's now
    assert regions.alloc(arena.ALIGN) == 3 * arena.ALIGN and regions.alloc(1) is None
    regions.freed(6, [(b, arena.ALIGN + 1)])
    assert regions.alloc(2 * arena.ALIGN) == arena.ALIGN


@pytest.mark.parametrize("inline_max_bytes", [64 << 20, 0], ids=["copy-on-loop", "copy-in-thread"])
async def test_arena_put_cancelled_midway_leaves_nothing(arena_store, inline_max_bytes):
    # 11 MB arenas: both runs' arenas and the next tests' fit in the store's 32 MB for arenas until reaped
    async with _arena_client(arena_store.address, arena_bytes=11 << 20, inline_max_bytes=inline_max_bytes) as client:
        data = os.urandom(10 << 20)  # big enough to be in flight when cancelled
        for i in range(4):  # cancelled at once (before the commit is sent), then while it is in flight
            task = asyncio.ensure_future(client.put(f"ac-{i}", data, owner="req-ac", lease_s=60))
            for _ in range(i):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        deadline = time.monotonic() + 10
        while any(http_call(arena_store.address, "GET", f"/location/ac-{i}")[0] == 200 for i in range(4)):
            assert time.monotonic() < deadline, "a cancelled put left its key behind"
            await asyncio.sleep(0.05)
        # the regions come back (resync): the arena still takes a put of that size
        put = await client.put("ac-after", data, owner="req-ac", lease_s=60)
        assert arena.is_arena_name(put.shm_name)
        got = await _get_put(client, "ac-after", put)
        assert got == data
        del got
        await client.release("ac-after")


@pytest.mark.parametrize("inline_max_bytes", [64 << 20, 0], ids=["copy-on-loop", "copy-in-thread"])
async def test_arena_put_of_a_taken_key_is_refused_and_frees_its_region(arena_store, inline_max_bytes):
    """A commit the store refuses (409: another writer holds the key) frees the region at once and
    must not release the key in the background: it is the other writer's."""
    async with _arena_client(arena_store.address) as first, \
            _arena_client(arena_store.address, inline_max_bytes=inline_max_bytes) as second:
        payload = os.urandom(300 * 1024)
        await first.put("taken", payload, owner="req-tk", lease_s=60)
        await second.open_arena()
        free_before = second._arena.regions.free_bytes
        with pytest.raises(InvalidArgument, match="exists"):
            await second.put("taken", os.urandom(300 * 1024), owner="req-other", lease_s=60)
        assert second._arena.regions.free_bytes == free_before
        await asyncio.sleep(0.2)  # a background release, were there one, would have run by now
        got = await first.get("taken")
        assert bytes(got) == payload
        del got
        assert await first.release("taken")


async def test_arena_reservation_is_put_without_a_copy(arena_store):
    async with _arena_client(arena_store.address) as client:
        assert client.reserve(300 * 1024) is None  # no arena before the first put
        await client.put("ar-first", os.urandom(300 * 1024), owner="req-rs", lease_s=60)
        payload = os.urandom(300 * 1024)
        region = client.reserve(len(payload))
        assert region is not None and not region.readonly
        region[:] = payload  # what an engine packing KV does
        put = await client.put("ar-reserved", region, owner="req-rs", lease_s=60)
        assert arena.is_arena_name(put.shm_name) and put.crc32 == zlib.crc32(payload)
        got = await _get_put(client, "ar-reserved", put)
        assert got == payload
        assert await client.get("ar-reserved") == payload  # the store reads the same region
        del got
        # a slice of a reservation is not the reservation: it is copied into a region of its own
        other = client.reserve(8192)
        other[:4096] = payload[:4096]
        sub = await client.put("ar-slice", other[:4096], owner="req-rs", lease_s=60)
        got = await _get_put(client, "ar-slice", sub)
        assert got == payload[:4096]
        del got, other
        assert await client.release_owner("req-rs") == 3


# ---- split copies and checksums, get_into, the arena commit connection ------------------------------

@pytest.mark.parametrize("size", [0, 1, 4095, 4097, 3 * 4096 + 17, 1 << 20])
def test_split_copy_and_checksum_match_zlib(monkeypatch, size):
    monkeypatch.setattr(shm, "SPLIT_MIN_BYTES", 4096)  # small sizes take the two-thread path too
    src = os.urandom(size)
    dst = bytearray(size)
    assert arena.copy_with_crc(memoryview(dst), memoryview(src)) == zlib.crc32(src)
    assert dst == src
    assert shm.checksum_split(src).run() == zlib.crc32(src)
    sent = []
    assert arena.start_copy_with_crc(memoryview(bytearray(size)), memoryview(src)).run(first=lambda: sent.append(1)) \
        == zlib.crc32(src)
    assert sent == [1]


def test_split_does_the_helpers_half_when_it_is_busy(monkeypatch):
    import threading

    monkeypatch.setattr(shm, "SPLIT_MIN_BYTES", 4096)
    gate = threading.Event()
    blocker = shm._helper_pool().submit(gate.wait, 10)  # the helper thread is busy elsewhere
    try:
        data = os.urandom(1 << 16)
        assert shm.checksum_split(data).run() == zlib.crc32(data)  # done here, not queued behind it
    finally:
        gate.set()
        blocker.result()


def test_split_lets_the_thread_that_starts_first_take_more_pieces(monkeypatch):
    """A caller that starts late (building a request) finds the helper has taken pieces meanwhile;
    the pieces' CRCs still join into the CRC of the whole buffer."""
    import threading

    monkeypatch.setattr(shm, "SPLIT_MIN_BYTES", 4096)
    data = os.urandom(32 * 4096 + 123)
    helper_pieces = []
    three_done = threading.Event()

    def work(start, end):
        if threading.current_thread() is not threading.main_thread():
            helper_pieces.append(start)
            if len(helper_pieces) == 3:
                three_done.set()
        return zlib.crc32(data[start:end])

    split = shm.SplitCrc(len(data), work, align=4096)
    assert split.run(first=lambda: three_done.wait(5)) == zlib.crc32(data)
    assert len(helper_pieces) >= 3 and helper_pieces[:3] == sorted(helper_pieces[:3])


def test_split_waits_for_the_helper_when_its_own_half_fails(monkeypatch):
    import threading

    monkeypatch.setattr(shm, "SPLIT_MIN_BYTES", 2)
    started, done = threading.Event(), threading.Event()

    def work(start, end):
        if start == 0:
            assert started.wait(5)  # fail only once the helper is at work on its half
            raise OSError("first half failed")
        started.set()
        time.sleep(0.05)
        done.set()
        return 0

    with pytest.raises(OSError, match="first half"):
        shm.SplitCrc(8, work).run()
    assert done.is_set()  # the caller's buffers were in use until the helper finished


async def test_get_into_copies_and_verifies_in_one_pass(arena_store, monkeypatch):
    monkeypatch.setattr(shm, "SPLIT_MIN_BYTES", 1 << 20)  # the 3 MB put below is split too
    async with _arena_client(arena_store.address, arena_bytes=8 << 20) as client:
        for key, size in [("gi-small", 300 * 1024), ("gi-big", 3 << 20)]:
            payload = os.urandom(size)
            put = await client.put(key, payload, owner="req-gi", lease_s=60)
            assert arena.is_arena_name(put.shm_name) and put.crc32 == zlib.crc32(payload)
            desc = {"shm_name": put.shm_name, "size": put.size, "crc32": put.crc32, "shm_offset": put.shm_offset}
            dst = bytearray(size)
            assert await client.get_into(key, dst, **desc) == size and dst == payload
            with pytest.raises(InvalidArgument, match="holds"):
                await client.get_into(key, bytearray(size - 1), **desc)
            with pytest.raises(InvalidArgument, match="read-only"):
                await client.get_into(key, bytes(size), **desc)
            with pytest.raises(InvalidArgument, match="contiguous"):
                await client.get_into(key, "not a buffer", **desc)
            with pytest.raises(DataLoss):
                await client.get_into(key, bytearray(size), **{**desc, "crc32": put.crc32 ^ 1})
            with open(os.path.join(shm.SHM_DIR, put.shm_name), "r+b") as f:  # a buggy writer scribbles
                f.seek(put.shm_offset + size - 8)
                f.write(bytes(b ^ 0xFF for b in payload[-8:]))
            with pytest.raises(DataLoss):
                await client.get_into(key, bytearray(size), **desc)
        # other paths: fetched as by get, then copied into dst
        payload = os.urandom(5000)
        await client.put("gi-http", payload, owner="req-gi", lease_s=60)
        dst = bytearray(5000)
        assert await client.get_into("gi-http", dst, size=5000, crc32=zlib.crc32(payload)) == 5000
        assert dst == payload
        assert await client.release_owner("req-gi") == 3


@pytest.mark.parametrize("inline_max_bytes", [64 << 20, 0], ids=["commit-on-loop", "commit-from-thread"])
async def test_arena_commits_carry_the_token(tmp_path, inline_max_bytes):
    guarded = StoreProcess(tmp_path, "--token", TOKEN)
    try:
        async with KVStoreClient(guarded.address, token=TOKEN, use_shm=True, shm_min_bytes=0,
                                 shm_arena_bytes=2 << 20, inline_max_bytes=inline_max_bytes) as client:
            payload = os.urandom(3 << 19)  # 1.5 MB; from a thread, the commit goes on a connection of its own
            put = await client.put("tk1", payload, owner="o", lease_s=60)
            assert arena.is_arena_name(put.shm_name)
            got = await _get_put(client, "tk1", put)
            assert got == payload
            del got
            assert await client.release("tk1")
    finally:
        assert guarded.stop() == 0
    with pytest.raises(InvalidArgument, match="control characters"):
        KVStoreClient(guarded.address, token="abc\r\nX-Injected: 1")


def test_sync_client_fills_reserved_arena_regions_in_place(store):
    """SyncStore (vLLM's worker processes): a reserved region filled in place is committed without a
    copy and read back zero-copy with its CRC; an abandoned reservation goes back to the allocator."""
    from pdgrpc.kvstore.sync_client import SHM_MIN_BYTES, SyncStore

    writer, reader = SyncStore(store, None, use_shm=True), SyncStore(store, None, use_shm=True)
    assert writer.reserve(SHM_MIN_BYTES) is None  # no arena yet: the caller uses a buffer of its own
    assert writer.open_arena()
    assert writer.reserve(SHM_MIN_BYTES - 1) is None  # too small to be worth a region
    data = os.urandom(SHM_MIN_BYTES + 12345)
    r = writer.reserve(len(data))
    r.view[:] = data
    answer = writer.put_reserved("sync-reserved", r, "sync-owner", 30.0)
    assert answer["shm_offset"] == r.offset and answer["crc32"] == zlib.crc32(data)
    got = reader.get("sync-reserved", answer["shm_name"], len(data), answer["crc32"], answer["shm_offset"])
    assert isinstance(got, memoryview) and bytes(got) == data
    del got
    free_before = r.arena[2].free_bytes
    spare = writer.reserve(len(data))
    assert r.arena[2].free_bytes < free_before
    writer.abandon(spare)
    assert r.arena[2].free_bytes == free_before
    writer.release("sync-reserved")
