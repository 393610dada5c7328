"""Colocated mode: prefill and decode of a request in one process, KV handed over in memory.

The same prefill scheduler, decode scheduler and engine as the disaggregated nodes; only the
hand-off differs: each KV group the engine yields is loaded straight into the decode sequence
instead of going through the store. This is the baseline every disaggregated number is compared to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pdgrpc.engine.base import DecodeWork, KVGroup
from pdgrpc.errors import ResourceExhausted
from pdgrpc.nodes.decode_service import DecodeService
from pdgrpc.nodes.prefill_service import PrefillService
from pdgrpc.types import ColocatedEvent, PrefillDone, PrefillRequest, PrefillStarted


class ColocatedService:
    def __init__(self, prefill: PrefillService, decode: DecodeService) -> None:
        self.prefill_service = prefill
        self.decode_service = decode
        self.engine = prefill.engine
        self.thread = prefill.thread

    @property
    def running(self) -> int:
        return self.decode_service.requests

    @property
    def queued(self) -> int:
        return self.prefill_service.queued

    def start(self) -> None:
        self.prefill_service.start()
        self.decode_service.start()

    async def stop(self) -> None:
        await self.prefill_service.stop()
        await self.decode_service.stop()

    async def generate(self, req: PrefillRequest) -> AsyncIterator[ColocatedEvent]:
        dec = self.decode_service
        if dec.requests >= dec.limits.max_requests:
            raise ResourceExhausted(f"node {dec.node} is full ({dec.limits.max_requests} requests)",
                                    retry_after_s=0.5)
        dec.requests += 1
        seq = None

        async def load(group: KVGroup) -> None:
            await self.thread.call(self.engine.load_kv, seq, group)

        try:
            first: PrefillDone | None = None
            ids: list[int] = []
            async for ev in self.prefill_service.prefill(req, kv_sink=load):
                if isinstance(ev, PrefillStarted):
                    ids = list(ev.prompt_token_ids)
                    seq = await self.thread.call(self.engine.begin_sequence,
                                                 DecodeWork(req.request_id, ids, req.sampling))
                elif isinstance(ev, PrefillDone):
                    first = ev
                yield ev
            assert first is not None
            async for out in dec.run_sequence(seq, ids, req.sampling, first.first_token_id):
                yield out
        finally:
            dec.requests -= 1
            if seq is not None:
                await self.thread.call(self.engine.free_sequence, seq)
