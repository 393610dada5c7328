"""The ``mooncake`` KV transfer path: host to host through Mooncake Transfer Engine (P2P handshake,
no metadata server; TCP here, RDMA in production; PyPI ``mooncake-transfer-engine-non-cuda`` on CPU
hosts, ``mooncake-transfer-engine`` on CUDA hosts; optional: without it decode uses ``http``).

Protocol, in call order:
  1. store    ``pdgrpc kvstore --transfer-engine mooncake``: ``ArenaExporter`` starts one engine and
              registers each shm arena the store creates (its whole mapping, nothing else); the arena's
              creation answer carries ``{"transfer": {"endpoint": "ip:rpc_port", "address": base}}``
  2. prefill  puts KV into its arena as on one host; each descriptor names the endpoint and the
              region's address (base + offset) besides the store, key, size and CRC-32
  3. decode   ``MooncakeTransfer.read_into``: its own engine (started at the first such descriptor)
              reads the region with one ``transfer_sync_read`` into a staging buffer registered with
              it, then copies it into the KV cache checking the CRC in the same pass
  4. decode   releases the key in the owning store (HTTP), which frees the region for the writer
  5. store    an arena dropped is unregistered at once (later reads fail) and unmapped a little later,
              so a read in flight never touches unmapped memory

Which process owns the engine on the prefill host: the store. It creates every arena, so it registers
exactly those and for their whole life; it outlives prefill nodes (KV of a prefill node that died stays
readable until released or expired); it is the process that releases the entry after the read; and one
engine per host is one port range to firewall, not one per prefill node. Prefill nodes run no engine.

Failures: the engine reports every failure as ``rc == -1`` (peer gone, timeout, unregistered range).
The owning store is then asked whether the key still exists: gone -> NotFound; store unreachable or key
still there -> Unavailable. A CRC mismatch with the key gone is NotFound (the region was reused), else
DataLoss. ``MC_TCP_PROGRESS_TIMEOUT_SEC`` / ``MC_TCP_STATUS_TIMEOUT_SEC`` default to 5 here (the
engine's own default is 30 s on a frozen peer). A staging buffer a failed or cancelled read used is
quarantined (``QUARANTINE_S``): the engine was seen writing into it for up to 2 s after rc -1.

Security: the engine's listeners bind every interface with no authentication; ports are bounded by
``MC_MIN_RPC_PORT`` / ``MC_MAX_RPC_PORT`` (defaults below) and belong on a private network
(deploy/README.md, "Several hosts"). Nothing starts an engine unless a store is told to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import importlib.util
import logging
import mmap
import os
import socket
import threading
import time

import numpy as np

from pdgrpc.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound, PdgrpcError, Unavailable
from pdgrpc.kvstore import arena as arenas
from pdgrpc.transfer.base import KVTransfer, register
from pdgrpc.types import KVDescriptor

log = logging.getLogger(__name__)

ENV_DEFAULTS = {
    "MC_TCP_PROGRESS_TIMEOUT_SEC": "5",  # a frozen peer costs seconds, not the engine's 30 s
    "MC_TCP_STATUS_TIMEOUT_SEC": "5",
    "MC_MIN_RPC_PORT": "15000",  # both listeners' ports come from this range: firewall it
    "MC_MAX_RPC_PORT": "15099",
    "MC_LOG_LEVEL": "ERROR",
}
QUARANTINE_S = 5.0  # a staging buffer is not reused this long after a failed or cancelled read
UNMAP_DELAY_S = 15.0  # a dropped arena stays mapped this long after it is unregistered
_MIN_STAGING = 1 << 20
_KEEP_PER_SIZE = 4  # free staging buffers kept per size class


def _set_env_defaults() -> None:
    """Before the library is first imported: it reads some of these when it loads."""
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def available() -> bool:
    _set_env_defaults()
    try:
        import mooncake.engine  # noqa: F401
    except ImportError:  # not installed, or libibverbs1 missing
        return False
    return True


def start_engine(local_ip: str, protocol: str = "tcp", device: str = ""):
    """A TransferEngine on ``local_ip`` with P2P handshake; Unavailable if it does not start."""
    _set_env_defaults()
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        raise FailedPrecondition(f"Mooncake Transfer Engine is not installed: {exc}") from None
    engine = TransferEngine()
    rc = engine.initialize(local_ip, "P2PHANDSHAKE", protocol, device)
    if rc != 0:
        raise Unavailable(f"Mooncake Transfer Engine did not start on {local_ip} ({protocol}): rc {rc}")
    return engine


def settings_from_env() -> tuple[str, str]:
    """(protocol, device) of this process's engine: $PDGRPC_TRANSFER_PROTOCOL (tcp or rdma) and
    $PDGRPC_TRANSFER_DEVICE (RDMA NICs, e.g. mlx5_0,mlx5_1; empty for tcp)."""
    return os.environ.get("PDGRPC_TRANSFER_PROTOCOL", "tcp"), os.environ.get("PDGRPC_TRANSFER_DEVICE", "")


def _address(buf) -> tuple[np.ndarray, int]:
    arr = np.frombuffer(buf, dtype=np.uint8)
    return arr, arr.ctypes.data


class ArenaExporter:
    """The store's side: one engine, each arena mapped and registered while the store holds it."""

    def __init__(self, local_ip: str, protocol: str = "tcp", device: str = "") -> None:
        self.engine = start_engine(local_ip, protocol, device)
        self.endpoint = f"{local_ip}:{self.engine.get_rpc_port()}"
        self._maps: dict[str, tuple[mmap.mmap, np.ndarray, int]] = {}
        self._lock = threading.Lock()

    def register(self, name: str) -> dict:
        """Map and register arena ``name``; the ``transfer`` field of its creation answer."""
        mapping = arenas.map_arena(name, writable=True)
        arr, addr = _address(mapping)
        rc = self.engine.register_memory(addr, len(mapping))
        if rc != 0:
            del arr
            mapping.close()
            raise Unavailable(f"transfer engine refused to register arena {name}: rc {rc}")
        with self._lock:
            self._maps[name] = (mapping, arr, addr)
        return {"engine": "mooncake", "endpoint": self.endpoint, "address": addr}

    def unregister(self, name: str, *, delay_s: float = UNMAP_DELAY_S) -> None:
        with self._lock:
            held = self._maps.pop(name, None)
        if held is None:
            return
        mapping, arr, addr = held
        self.engine.unregister_memory(addr)  # reads from now on fail; one in flight still finds the pages
        timer = threading.Timer(delay_s, _unmap, (mapping, arr))
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        for name in list(self._maps):
            self.unregister(name, delay_s=0.0)


def _unmap(mapping: mmap.mmap, arr: np.ndarray) -> None:
    del arr
    try:
        mapping.close()
    except BufferError:  # still exported somewhere: the mapping goes with its last reference
        pass


class BufferState(enum.Enum):
    FREE = "free"
    TRANSFERRING = "transferring"
    QUARANTINED = "quarantined"


class _Staging:
    def __init__(self, size: int) -> None:
        self.size = size
        self.mapping = mmap.mmap(-1, size)
        self.arr, self.addr = _address(self.mapping)
        self.state = BufferState.FREE
        self.until = 0.0


class _StagingPool:
    """Registered staging buffers of one decode engine, by power-of-two size."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._free: dict[int, list[_Staging]] = {}
        self._quarantined: list[_Staging] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> _Staging:
        size = max(_MIN_STAGING, 1 << max(0, nbytes - 1).bit_length())
        now = time.monotonic()
        with self._lock:
            back = [b for b in self._quarantined if b.until <= now]
            self._quarantined = [b for b in self._quarantined if b.until > now]
            for b in back:
                b.state = BufferState.FREE
                self._free.setdefault(b.size, []).append(b)
            free = self._free.get(size)
            if free:
                buf = free.pop()
                buf.state = BufferState.TRANSFERRING
                return buf
        buf = _Staging(size)
        if self.engine.register_memory(buf.addr, size) != 0:
            raise Unavailable(f"transfer engine refused to register a {size}-byte staging buffer")
        buf.state = BufferState.TRANSFERRING
        return buf

    def give_back(self, buf: _Staging) -> None:
        with self._lock:
            free = self._free.setdefault(buf.size, [])
            if len(free) < _KEEP_PER_SIZE:
                buf.state = BufferState.FREE
                free.append(buf)
                return
        self.engine.unregister_memory(buf.addr)

    def quarantine(self, buf: _Staging) -> None:
        with self._lock:
            buf.state, buf.until = BufferState.QUARANTINED, time.monotonic() + QUARANTINE_S
            self._quarantined.append(buf)


def _local_ip_towards(peer_ip: str) -> str:
    """The address this host uses to reach ``peer_ip`` (the routing table's choice; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer_ip, 9))
        return s.getsockname()[0]


@register("mooncake")
class MooncakeTransfer(KVTransfer):
    """The decode side: a peer store's registered arena region, read by this process's engine."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self._engine = None
        self._loads: bool | None = None  # whether the library loads here (tried at the first use)
        self._pool: _StagingPool | None = None
        self._start_lock = asyncio.Lock()
        self._threads = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pdgrpc-mooncake")

    @classmethod
    def available(cls) -> bool:
        # Only whether it is installed: the library is loaded at the first descriptor from another
        # host with an endpoint (never on one host), and if it cannot load, ``http`` takes over.
        return importlib.util.find_spec("mooncake") is not None

    def accepts(self, d: KVDescriptor) -> bool:
        remote = not self.ctx.is_own(d.store_address) and d.location != "device"
        if not (remote and d.transfer_endpoint and d.transfer_address):
            return False
        if self._loads is None:
            self._loads = available()
            if not self._loads:
                log.warning("mooncake transfer engine cannot load (libibverbs1 missing?): KV from other hosts "
                            "over HTTP")
        return self._loads

    async def _started(self, endpoint: str) -> _StagingPool:
        async with self._start_lock:
            if self._pool is None:
                peer_ip = endpoint.rsplit(":", 1)[0].strip("[]")
                local_ip = await asyncio.to_thread(_local_ip_towards, peer_ip)
                self._engine = await asyncio.to_thread(start_engine, local_ip, *settings_from_env())
                self._pool = _StagingPool(self._engine)
                log.info("mooncake transfer engine on %s:%s", local_ip, self._engine.get_rpc_port())
        return self._pool

    async def read_into(self, d: KVDescriptor, dst) -> None:
        out = memoryview(dst).cast("B")
        if out.readonly or out.nbytes != d.size_bytes:
            raise InvalidArgument(f"read {d.key!r}: dst must be writable and hold {d.size_bytes} bytes")
        pool = await self._started(d.transfer_endpoint)
        buf = pool.take(d.size_bytes)
        loop = asyncio.get_running_loop()
        read = loop.run_in_executor(self._threads, self._engine.transfer_sync_read, d.transfer_endpoint,
                                    buf.addr, d.transfer_address, d.size_bytes)
        try:
            rc = await asyncio.shield(read)
        except asyncio.CancelledError:  # the engine goes on writing into buf: not reused before it ends
            read.add_done_callback(lambda _f: pool.quarantine(buf))
            raise
        if rc != 0:
            pool.quarantine(buf)
            await self._failed(d, f"transfer engine read from {d.transfer_endpoint} failed (rc {rc}): "
                                  "peer gone or timed out")
        try:
            crc = await loop.run_in_executor(None, arenas.copy_with_crc, out, memoryview(buf.mapping)[:d.size_bytes])
        finally:
            pool.give_back(buf)
        if crc != d.crc32:
            await self._failed(d, f"key {d.key!r}: crc32 {crc} does not match the expected {d.crc32}", crc=True)

    async def _failed(self, d: KVDescriptor, message: str, *, crc: bool = False) -> None:
        """Raise the status of a failed read: NotFound when the owning store no longer has the key."""
        store = self.ctx.store_for(d.store_address)
        try:
            exists = await asyncio.wait_for(store.exists(d.key), 2.0)
        except (PdgrpcError, TimeoutError):
            if crc:
                raise DataLoss(message) from None
            raise Unavailable(f"{message}; store {d.store_address} unreachable too") from None
        if not exists:
            raise NotFound(f"KV key {d.key!r} not found in store {d.store_address} (released or expired)")
        raise DataLoss(message) if crc else Unavailable(message)

    async def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
