"""The KV transfer paths' registry and choice (pdgrpc.transfer), and the Mooncake path's staging
buffers and failure statuses without an engine (a fake one): no processes, no network."""

from __future__ import annotations

import asyncio

import pytest

from pdgrpc.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from pdgrpc.kvstore import shm
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.transfer import base, mooncake
from pdgrpc.types import KVDescriptor, KVLayout

pytestmark = pytest.mark.fast
OWN, PEER = "127.0.0.1:9015", "198.18.0.1:9015"


def desc(store: str = OWN, **kw) -> KVDescriptor:
    fields = dict(request_id="r", store_address=store, key="r.g0", location="dram",
                  layout=KVLayout("m", "float32", 0, 1, 0, 1, 1, 1), size_bytes=4096, crc32=0, lease_expiry_unix=0)
    return KVDescriptor(**{**fields, **kw})


def transfers(peers=(), paths=None) -> base.Transfers:
    return base.Transfers(base.TransferContext(KVStoreClient(OWN), peer_stores=peers), paths)


def test_registry_names_every_path_and_refuses_unknown_ones():
    assert base.names() == ["cuda_ipc", "http", "mooncake", "shm"]
    with pytest.raises(InvalidArgument, match="unknown KV transfer path"):
        base.create("rdma-magic", base.TransferContext(KVStoreClient(OWN)))


def test_each_descriptor_gets_its_path():
    t = transfers(peers=[PEER])
    assert t.select(desc(shm_name="pdgrpc-9015-arena0")).name == "shm"
    assert t.select(desc()).name == "http"  # own store, no shm: its HTTP path
    assert t.select(desc(location="device")).name == "cuda_ipc"
    assert t.select(desc(PEER, shm_name="pdgrpc-9015-arena0")).name == "http"  # another host's file: never shm
    with_engine = desc(PEER, shm_name="pdgrpc-9015-arena0", transfer_endpoint="198.18.0.1:15001",
                       transfer_address=1 << 40)
    assert t.select(with_engine).name == ("mooncake" if mooncake.available() else "http")
    assert transfers(peers=[PEER], paths=["shm", "http"]).select(with_engine).name == "http"
    with pytest.raises(FailedPrecondition, match="no KV transfer path"):
        t.select(desc(PEER, location="device"))  # GPU handles open on their own host only


def test_stores_of_other_hosts_only_when_allowed():
    with pytest.raises(FailedPrecondition, match="names store"):
        transfers().select(desc(PEER))
    assert transfers(peers=["*"]).select(desc("198.18.0.9:1")).name == "http"
    ctx = base.TransferContext(KVStoreClient(OWN, token="t"), peer_stores=[PEER])
    assert ctx.store_for(OWN) is ctx.store and ctx.store_for(PEER) is ctx.store_for(PEER)
    assert ctx.store_for(PEER).token == "t"


def test_peer_stores_from_the_environment(monkeypatch):
    monkeypatch.setenv("PDGRPC_PEER_STORES", f" {PEER} ,198.18.0.2:9015")
    ctx = base.TransferContext(KVStoreClient(OWN))
    assert ctx.allowed(PEER) and ctx.allowed("198.18.0.2:9015") and not ctx.allowed("198.18.0.3:9015")


class FakeEngine:
    """transfer_sync_read copies from a dict of 'remote' buffers; rc -1 when told to fail."""

    def __init__(self, remote: bytes) -> None:
        self.remote, self.fail, self.registered = remote, False, set()

    def register_memory(self, addr: int, size: int) -> int:
        self.registered.add(addr)
        return 0

    def unregister_memory(self, addr: int) -> int:
        self.registered.discard(addr)
        return 0

    def transfer_sync_read(self, target: str, local: int, remote: int, n: int) -> int:
        import ctypes

        if self.fail:
            return -1
        ctypes.memmove(local, self.remote, n)
        return 0


class FakeStore:
    address = PEER

    def __init__(self, exists: bool | Exception) -> None:
        self._exists = exists

    async def exists(self, key: str) -> bool:
        if isinstance(self._exists, Exception):
            raise self._exists
        return self._exists


def mooncake_path(engine, store) -> mooncake.MooncakeTransfer:
    ctx = base.TransferContext(KVStoreClient(OWN), peer_stores=[PEER])
    ctx._peers[PEER] = store
    path = mooncake.MooncakeTransfer(ctx)
    path._engine, path._pool = engine, mooncake._StagingPool(engine)
    return path


async def test_mooncake_read_checks_the_crc_and_reuses_its_staging_buffer():
    data = bytes(range(256)) * 64
    path = mooncake_path(FakeEngine(data), FakeStore(True))
    d = desc(PEER, size_bytes=len(data), crc32=shm.checksum(data), transfer_endpoint="198.18.0.1:15001",
             transfer_address=1)
    dst = bytearray(len(data))
    await path.read_into(d, dst)
    await path.read_into(d, dst)
    assert dst == data and sum(len(v) for v in path._pool._free.values()) == 1 and not path._pool._quarantined
    with pytest.raises(DataLoss):
        await path.read_into(d.replace(crc32=d.crc32 ^ 1), dst)
    with pytest.raises(InvalidArgument):
        await path.read_into(d, bytearray(10))


@pytest.mark.parametrize("exists, status", [(True, Unavailable), (False, NotFound), (Unavailable("down"), Unavailable)])
async def test_mooncake_failure_is_a_status_and_quarantines_the_buffer(exists, status):
    engine = FakeEngine(b"")
    engine.fail = True
    path = mooncake_path(engine, FakeStore(exists))
    d = desc(PEER, size_bytes=4096, transfer_endpoint="198.18.0.1:15001", transfer_address=1)
    with pytest.raises(status):
        await path.read_into(d, bytearray(4096))
    assert len(path._pool._quarantined) == 1
    bad = path._pool._quarantined[0]
    assert bad.state is mooncake.BufferState.QUARANTINED
    assert path._pool.take(4096) is not bad  # not handed out again while quarantined
    bad.until = 0
    assert path._pool.take(4096) is bad  # and back once its time is up


async def test_mooncake_cancelled_read_quarantines_its_buffer_once_the_engine_lets_go():
    import threading

    release = threading.Event()

    class SlowEngine(FakeEngine):
        def transfer_sync_read(self, *args) -> int:
            release.wait(10)
            return 0

    path = mooncake_path(SlowEngine(b""), FakeStore(True))
    d = desc(PEER, size_bytes=4096, transfer_endpoint="198.18.0.1:15001", transfer_address=1)
    task = asyncio.ensure_future(path.read_into(d, bytearray(4096)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not path._pool._quarantined  # the engine still writes into it: neither free nor quarantined yet
    release.set()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if path._pool._quarantined:
            break
    assert len(path._pool._quarantined) == 1


async def test_coordinator_releases_and_renews_in_every_store_a_request_published_to(monkeypatch):
    """A store per host: the KV of a failed request is released in the store its descriptors named,
    not only in the coordinator's own."""
    from pdgrpc.coordinator import router as router_mod

    calls: list[tuple[str, str, str]] = []

    class Recorder:
        def __init__(self, address: str, **_kw) -> None:
            self.address, self.token = address, None

        async def release_owner(self, owner: str) -> int:
            calls.append(("release", self.address, owner))
            return 1

        async def renew(self, owner: str, lease_s: float) -> int:
            calls.append(("renew", self.address, owner))
            return 1

        async def close(self) -> None:
            pass

    monkeypatch.setattr(router_mod, "KVStoreClient", Recorder)
    monkeypatch.setattr(router_mod, "LATE_RELEASE_DELAY_S", 0.01)
    r = router_mod.Router(None, Recorder(OWN), 8, kv_lease_s=0.06)
    r._owner_stores["req-1"] = {PEER}
    r._live_owners.add("req-1")
    r.start()
    await asyncio.sleep(0.05)
    await r.close()
    assert ("renew", OWN, "req-1") in calls and ("renew", PEER, "req-1") in calls
    r._release_later("req-1")
    await asyncio.gather(*r._background)
    assert calls.count(("release", PEER, "req-1")) == 2 and calls.count(("release", OWN, "req-1")) == 2
    assert "req-1" not in r._owner_stores
