"""KV transfer paths: how a decode node gets a published KV group's bytes into its own buffer.

One small interface (``KVTransfer``) and a registry by name (``register`` / ``create``, as vLLM's
kv_transfer factory), with one implementation per path:
  ``shm``       same host: a region of a shm arena of this node's own store, zero-copy view
  ``http``      another host's store: its binary HTTP path (GET /v1/kv/{key}); the fallback
  ``cuda_ipc``  same host, GPU to GPU: the producer's CUDA IPC handle (location ``device``)
  ``mooncake``  another host's store that registered its arenas with a Mooncake TransferEngine:
                one network read from that store's memory into this node's registered buffer

Protocol for one KV group, in call order:
  1. store     (``--transfer-engine mooncake`` only) registers each shm arena it creates with its
               TransferEngine; its answer to the arena's creation names the endpoint ``ip:rpc_port``
               and the arena's address in the store's memory
  2. prefill   puts the group in its own host's store (``KVStoreClient.put``: an arena region) and
               sends the descriptor: store address, key, shm name and offset, size, CRC-32, and the
               transfer endpoint and address of the region when the arena is registered
  3. decode    ``Transfers.select(d)``: ``cuda_ipc`` for location device; ``shm`` when ``d`` names
               this node's own store; ``mooncake`` when it names a peer store with an endpoint and the
               engine is installed; ``http`` otherwise
  4. decode    ``path.read_into(d, dst)`` (or ``path.read(d)``): bytes in, CRC checked; errors are
               pdgrpc's: NotFound (entry released or expired), Unavailable (store or peer gone,
               timeout), DataLoss (CRC mismatch)
  5. decode    ``path.release(d)``: the entry is released in the store that owns it, in the background
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import ClassVar

from pdgrpc.errors import FailedPrecondition, InvalidArgument
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.types import KVDescriptor

ANY_STORE = "*"
PEER_IDLE_TIMEOUT_S = 5.0  # another host's store that stops answering (link down, frozen) fails in seconds


class TransferContext:
    """What every path of one decode node shares: its own store and clients of peer stores."""

    def __init__(self, store: KVStoreClient, peer_stores: Iterable[str] | None = None) -> None:
        self.store = store
        if peer_stores is None:  # $PDGRPC_PEER_STORES: host:port,... of other hosts' stores, or * for any
            peer_stores = os.environ.get("PDGRPC_PEER_STORES", "").split(",")
        self.peer_stores = frozenset(p.strip() for p in peer_stores if p.strip())
        self._peers: dict[str, KVStoreClient] = {}

    def is_own(self, address: str) -> bool:
        return address == self.store.address

    def allowed(self, address: str) -> bool:
        """Whether this node may read from (and release in) the store at ``address``."""
        return self.is_own(address) or ANY_STORE in self.peer_stores or address in self.peer_stores

    def store_for(self, address: str) -> KVStoreClient:
        """The client of the store that owns an entry: ours, or a peer's (never over shm: other host)."""
        if self.is_own(address):
            return self.store
        if not self.allowed(address):
            raise FailedPrecondition(f"descriptor names store {address!r}; this node uses {self.store.address} "
                                     "and no peer store of that address")
        client = self._peers.get(address)
        if client is None:
            client = self._peers[address] = KVStoreClient(address, token=self.store.token, use_shm=False,
                                                          idle_timeout_s=PEER_IDLE_TIMEOUT_S)
        return client

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._peers.values()))
        self._peers.clear()


class KVTransfer(ABC):
    """One way of getting a descriptor's bytes into this process."""

    name: ClassVar[str]

    def __init__(self, ctx: TransferContext) -> None:
        self.ctx = ctx

    @classmethod
    def available(cls) -> bool:
        """Whether this path can run in this process (its library is installed)."""
        return True

    @abstractmethod
    def accepts(self, d: KVDescriptor) -> bool:
        """Whether this path can read ``d`` from here."""

    @abstractmethod
    async def read_into(self, d: KVDescriptor, dst) -> None:
        """Put the bytes into ``dst`` (a writable buffer of exactly ``d.size_bytes``), CRC checked."""

    async def read(self, d: KVDescriptor):
        """The bytes (a buffer the caller copies out of before ``release``)."""
        buf = bytearray(d.size_bytes)
        await self.read_into(d, buf)
        return buf

    def release(self, d: KVDescriptor) -> None:
        """Release the entry in the store that owns it (background; its lease is the fallback)."""
        self.ctx.store_for(d.store_address).release_soon(d.key)

    async def close(self) -> None:  # noqa: B027 (most paths hold nothing of their own)
        """Free what the path holds (an engine, registered buffers)."""


_REGISTRY: dict[str, type[KVTransfer]] = {}
ORDER = ("cuda_ipc", "shm", "mooncake", "http")  # Transfers.select tries them in this order


def register(name: str):
    def add(cls: type[KVTransfer]) -> type[KVTransfer]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def create(name: str, ctx: TransferContext) -> KVTransfer:
    _load_builtin()
    try:
        return _REGISTRY[name](ctx)
    except KeyError:
        raise InvalidArgument(f"unknown KV transfer path {name!r}; known: {sorted(_REGISTRY)}") from None


def names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from pdgrpc.transfer import cuda_ipc, http, mooncake, shm  # noqa: F401  (they register themselves)


class Transfers:
    """The paths of one decode node, in ``ORDER``; ``select`` picks the one for a descriptor."""

    def __init__(self, ctx: TransferContext, paths: Iterable[str] | None = None) -> None:
        _load_builtin()
        self.ctx = ctx
        if paths is None:  # $PDGRPC_KV_TRANSFERS: the paths to use, e.g. "shm,http" (default: all installed)
            paths = [p.strip() for p in os.environ.get("PDGRPC_KV_TRANSFERS", "").split(",") if p.strip()] or ORDER
        self.paths = [create(n, ctx) for n in ORDER if n in paths]
        self.paths = [p for p in self.paths if p.available()]

    def select(self, d: KVDescriptor) -> KVTransfer:
        if not self.ctx.allowed(d.store_address):
            self.ctx.store_for(d.store_address)  # raises FailedPrecondition
        for path in self.paths:
            if path.accepts(d):
                return path
        raise FailedPrecondition(f"descriptor {d.key!r}: no KV transfer path of this node can read it "
                                 f"(paths: {[p.name for p in self.paths]})")

    def release(self, d: KVDescriptor) -> None:
        self.select(d).release(d)

    async def close(self) -> None:
        for path in self.paths:
            await path.close()
        await self.ctx.close()
