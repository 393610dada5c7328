"""The ``shm`` KV transfer path: same host, a region of a shm arena (or a segment) of this node's own
store, read as a zero-copy view (``KVStoreClient.get``) or copied and CRC-checked in one pass into
the caller's buffer (``KVStoreClient.get_into``); the arena mechanics are in ``pdgrpc.kvstore.arena``."""

from __future__ import annotations

from pdgrpc.transfer.base import KVTransfer, register
from pdgrpc.types import KVDescriptor


@register("shm")
class ShmTransfer(KVTransfer):
    def accepts(self, d: KVDescriptor) -> bool:
        return bool(d.shm_name) and d.location != "device" and self.ctx.is_own(d.store_address)

    async def read_into(self, d: KVDescriptor, dst) -> None:
        await self.ctx.store.get_into(d.key, dst, shm_name=d.shm_name, size=d.size_bytes, crc32=d.crc32,
                                      shm_offset=d.shm_offset)

    async def read(self, d: KVDescriptor):
        # A zero-copy view of the arena region: the caller copies it into its cache before release.
        return await self.ctx.store.get(d.key, shm_name=d.shm_name, size=d.size_bytes, crc32=d.crc32,
                                        shm_offset=d.shm_offset)
