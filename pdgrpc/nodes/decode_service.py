"""The decode node's work, free of gRPC: fetch KV by descriptor, load it, decode in a batch.

Per request (``DecodeService.decode``), inputs in order: ``DecodeStart``, any number of
``KVDescriptor`` (fetched concurrently as they arrive, each answered with ``KVLoaded`` once its
bytes are checked and in the cache, then released from the store), ``DecodeKVDone`` with the
first token. Then the sequence joins the continuous batch and tokens stream out until it
finishes. Descriptors are checked before anything is fetched: right request, right model
fingerprint and geometry, this node's store, sizes that match the layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pdgrpc import metrics
from pdgrpc.engine.base import DecodeWork, Engine, KVGroup
from pdgrpc.engine.output import OutputTracker
from pdgrpc.errors import DataLoss, InvalidArgument, NotFound, PdgrpcError, ResourceExhausted
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.nodes.checks import check_decode_start, check_descriptor
from pdgrpc.nodes.decode_scheduler import DecodeScheduler
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.transfer.base import TransferContext, Transfers
from pdgrpc.types import (
    DecodeEvent,
    DecodeFinished,
    DecodeInput,
    DecodeKVDone,
    DecodeStart,
    KVDescriptor,
    KVLoaded,
    TokenOut,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeLimits:
    max_requests: int = 64
    max_batch: int = 32
    # Tokens per message, at most (the last message of a sequence may have fewer). 1 streams every
    # token the moment it exists; N > 1 trades smoothness for N times fewer messages through the
    # node, the coordinator and the client, whose per-message cost is what limits a busy cluster
    # (vLLM's and SGLang's --stream-interval).
    stream_interval: int = 1


class _KVComplete:
    def __init__(self, first_token_id: int) -> None:
        self.first_token_id = first_token_id


class DecodeService:
    def __init__(self, node: str, engine: Engine, thread: EngineThread, store: KVStoreClient,
                 limits: DecodeLimits, transfers: Transfers | None = None) -> None:
        self.node = node
        self.engine = engine
        self.thread = thread
        self.store = store
        self.limits = limits
        # How KV bytes get here (pdgrpc.transfer): shm from this host's store, HTTP or Mooncake from peers'.
        self.transfers = transfers if transfers is not None else Transfers(TransferContext(store))
        self.scheduler = DecodeScheduler(node, engine, thread, limits.max_batch)
        self.requests = 0

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.transfers.close()

    def _on_cuda(self) -> bool:
        return str(getattr(self.engine, "device", "cpu")).startswith("cuda")

    def _check_start(self, start: DecodeStart) -> None:
        check_decode_start(start, self.engine.spec)

    def _check_descriptor(self, d: KVDescriptor, start: DecodeStart, seen: set[int]) -> None:
        check_descriptor(d, start, self.engine.spec, self.store.address, seen, gpu=self._on_cuda(),
                         store_allowed=self.transfers.ctx.allowed)

    async def decode(self, inputs: AsyncIterator[DecodeInput]) -> AsyncIterator[DecodeEvent]:
        first = await anext(inputs, None)
        if not isinstance(first, DecodeStart):
            raise InvalidArgument("the first decode message must be a DecodeStart")
        self._check_start(first)
        if self.requests >= self.limits.max_requests:
            raise ResourceExhausted(f"decode node {self.node} is full ({self.limits.max_requests} requests)",
                                    retry_after_s=0.5)
        self.requests += 1
        metrics.NODE_RUNNING.labels("decode", self.node).set(self.requests)
        ids = list(first.prompt_token_ids)
        seq = None
        events: asyncio.Queue = asyncio.Queue()
        unreleased: dict[str, KVDescriptor] = {}
        reader: asyncio.Task | None = None
        try:
            seq = await self.thread.call(self.engine.begin_sequence,
                                         DecodeWork(first.request_id, ids, first.sampling))
            reader = asyncio.create_task(self._read_inputs(inputs, first, seq, events, unreleased))
            while True:
                ev = await events.get()
                if isinstance(ev, BaseException):
                    raise ev
                if isinstance(ev, _KVComplete):
                    break
                yield ev
            async for out in self.run_sequence(seq, ids, first.sampling, ev.first_token_id):
                yield out
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            self.requests -= 1
            metrics.NODE_RUNNING.labels("decode", self.node).set(self.requests)
            if seq is not None:
                metrics.KV_HELD.free("decode", self.node, seq)  # metrics
                await self.thread.call(self.engine.free_sequence, seq)
            for d in unreleased.values():  # KV never loaded (cancel, error): nobody will fetch it now
                self.transfers.release(d)

    async def run_sequence(self, seq: object, prompt_ids: list[int], sampling, first_token_id: int
                           ) -> AsyncIterator[TokenOut | DecodeFinished]:
        """Decode a sequence whose KV is fully loaded: tokens after the first, then DecodeFinished.
        The scheduler starts it (``start_decoding``) in the engine-thread call of its first step."""
        tracker = OutputTracker(self.engine.tokenizer, prompt_ids, sampling, self.engine.spec.eos_token_ids)
        _, reason = tracker.add(first_token_id)  # prefill already sent its text
        if reason is not None:
            yield DecodeFinished(reason, 1)
            return
        entry = self.scheduler.add(seq, tracker, first_token_id)
        interval = self.limits.stream_interval
        held: TokenOut | None = None  # tokens kept back until there are ``interval`` of them
        try:
            while True:
                item = await entry.out.get()
                if isinstance(item, BaseException):
                    if held is not None:
                        yield held
                    raise item
                tokens, reason = item
                held = tokens if held is None else held.merged(tokens)
                # Tokens that piled up while the last message was being sent go out together: the
                # same latency for each, one message instead of many (the per-message cost is what
                # limits a busy node and the coordinator).
                while reason is None and not entry.out.empty():
                    item = entry.out.get_nowait()
                    if isinstance(item, BaseException):
                        yield held
                        raise item
                    held, reason = held.merged(item[0]), item[1]
                if reason is None and len(held.token_ids) < interval:
                    continue
                yield held
                held = None
                if reason is not None:
                    yield DecodeFinished(reason, len(tracker.token_ids))
                    return
        finally:
            self.scheduler.remove(entry)
            metrics.KV_HELD.free("decode", self.node, seq)  # metrics: also ends colocated sequences

    async def _read_inputs(self, inputs: AsyncIterator[DecodeInput], start: DecodeStart, seq: object,
                           events: asyncio.Queue, unreleased: dict[str, KVDescriptor]) -> None:
        """Fetch each descriptor as it arrives; report _KVComplete once all are loaded."""
        fetches: list[asyncio.Task] = []
        seen: set[int] = set()
        try:
            async for msg in inputs:
                if isinstance(msg, KVDescriptor):
                    self._check_descriptor(msg, start, seen)
                    unreleased[msg.key] = msg
                    fetches.append(asyncio.create_task(self._fetch(msg, seq, events, unreleased)))
                elif isinstance(msg, DecodeKVDone):
                    await asyncio.gather(*fetches)
                    self._check_complete(msg, seen)
                    events.put_nowait(_KVComplete(msg.first_token_id))
                    return
                else:
                    raise InvalidArgument("DecodeStart sent twice")
            raise InvalidArgument("decode stream ended before DecodeKVDone")
        except BaseException as exc:
            for f in fetches:
                f.cancel()
            if not isinstance(exc, asyncio.CancelledError):
                events.put_nowait(exc)
            raise

    def _check_complete(self, done: DecodeKVDone, seen: set[int]) -> None:
        if done.kv_groups != len(seen) or seen != set(range(len(seen))):
            raise InvalidArgument(f"DecodeKVDone says {done.kv_groups} KV groups; received {sorted(seen)}")
        if not 0 <= done.first_token_id < self.engine.spec.vocab_size:
            raise InvalidArgument(f"first token id {done.first_token_id} outside the vocabulary")

    async def _fetch(self, d: KVDescriptor, seq: object, events: asyncio.Queue,
                     unreleased: dict[str, KVDescriptor]) -> None:
        t0 = time.monotonic()
        lay = d.layout
        layers, tokens = (lay.layer_start, lay.layer_end), (lay.token_start, lay.token_end)
        dst = self.engine.kv_destination(seq, layers, tokens, d.size_bytes) if d.location != "device" else None
        try:
            path = self.transfers.select(d)
            if dst is not None:
                # Straight into the engine's cache: one pass copies and checks the CRC, on the store
                # client's threads (or one network read, then that pass), not on the engine's thread.
                try:
                    await path.read_into(d, dst)
                except asyncio.CancelledError:
                    # The copy may still run on a store thread: no kv_written, so the engine never hands
                    # this buffer to another sequence (it is freed once the copy lets go of it).
                    raise
                except BaseException:
                    self.engine.kv_written(seq, layers, tokens, False)
                    raise
                self.engine.kv_written(seq, layers, tokens, True)
                data = None
            else:
                # CUDA IPC: the producer's GPU tensor, copied GPU to GPU on load. Same host: a zero-copy
                # view of the arena region; load_kv copies it into our cache before the release below
                # lets the writer reuse the region.
                data = await path.read(d)
        except NotFound:
            metrics.KV_TRANSFER_FAILURES.labels("decode", "not_found").inc()
            raise NotFound(f"KV key {d.key!r} not found in store {d.store_address}") from None
        except DataLoss:
            metrics.KV_TRANSFER_FAILURES.labels("decode", "checksum").inc()
            raise
        except PdgrpcError:
            metrics.KV_TRANSFER_FAILURES.labels("decode", "store").inc()
            raise
        if data is not None:
            await self.thread.call(self.engine.load_kv, seq,
                                   KVGroup(lay.layer_start, lay.layer_end, lay.token_start, lay.token_end, data))
        metrics.observe_kv_transfer("decode", "fetch", time.monotonic() - t0, d.size_bytes)
        metrics.KV_FETCH_PATH.labels("decode", path.name).inc(d.size_bytes)
        metrics.KV_HELD.add("decode", self.node, seq, d.size_bytes)  # metrics: KV now in this node's cache
        events.put_nowait(KVLoaded(d.group_index, d.size_bytes))
        # Loaded into our cache: the store's copy has served its purpose. Released in the background:
        # a store round trip the first decode step need not wait for.
        unreleased.pop(d.key, None)
        path.release(d)
