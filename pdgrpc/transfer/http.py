"""The ``http`` KV transfer path: the owning store's binary HTTP path (GET /v1/kv/{key}, raw bytes,
CRC-32 in X-Checksum-Crc32; the store copies an arena region out for it). Any store this node may
read from, on any host: the fallback where no faster path applies (no Mooncake engine installed, or
the owning store has none)."""

from __future__ import annotations

from pdgrpc.transfer.base import KVTransfer, register
from pdgrpc.types import KVDescriptor


@register("http")
class HttpTransfer(KVTransfer):
    def accepts(self, d: KVDescriptor) -> bool:
        return d.location != "device"

    async def read_into(self, d: KVDescriptor, dst) -> None:
        store = self.ctx.store_for(d.store_address)
        # shm_name only on our own store's host: a peer's segment names a file of another machine.
        shm_name = d.shm_name if self.ctx.is_own(d.store_address) else ""
        await store.get_into(d.key, dst, shm_name=shm_name, size=d.size_bytes, crc32=d.crc32,
                             shm_offset=d.shm_offset if shm_name else 0)

    async def read(self, d: KVDescriptor):
        store = self.ctx.store_for(d.store_address)
        shm_name = d.shm_name if self.ctx.is_own(d.store_address) else ""
        return await store.get(d.key, shm_name=shm_name, size=d.size_bytes, crc32=d.crc32,
                               shm_offset=d.shm_offset if shm_name else 0)
