"""The prefill node's work, free of gRPC: admit, tokenize, batch, compute, publish KV.

Per request (``PrefillService.prefill``), in order:
  1. validate and tokenize; yield ``PrefillStarted`` with the prompt's token ids
  2. queue the work; the scheduler batches queued prompts up to a token budget (arrival order) and
     runs the engine on them, shortest prompt first; an engine that prefills long prompts in chunks
     takes the prompts queued meanwhile into the running batch between two chunks
  3. for each KV group the engine yields: put it in the store (owner = request id, with a lease)
     and yield its ``KVDescriptor`` at once, while the engine computes the next group
  4. yield ``PrefillDone`` with the first token
If the caller goes away (cancel, deadline), the work is flagged so the engine stops between groups,
and the KV this request published is released.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from pdgrpc import metrics
from pdgrpc.engine.base import Engine, KVGroup, PrefillWork, SampledToken
from pdgrpc.engine.output import OutputTracker
from pdgrpc.errors import Internal, InvalidArgument, PdgrpcError, ResourceExhausted
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.transfer.cuda_ipc import DeviceExports
from pdgrpc.types import (
    REQUEST_ID_RE,
    FinishReason,
    KVDescriptor,
    KVLayout,
    ModelSpec,
    PrefillDone,
    PrefillEvent,
    PrefillRequest,
    PrefillStarted,
    Prompt,
)

log = logging.getLogger(__name__)
MAX_LEASE_S = 600.0
INLINE_TOKENIZE_CHARS = 512  # a text this short is encoded on the loop (~0.1 ms) when the tokenizer thread is idle
JOIN_WAIT_S = 2.0  # how long the engine thread waits for the loop to hand it newly queued prompts


@dataclass(frozen=True)
class PrefillLimits:
    max_requests: int = 64          # running + queued; more is RESOURCE_EXHAUSTED
    batch_token_budget: int = 4096  # prompt tokens per engine batch
    kv_lease_s: float = 60.0        # default lease of published KV
    store_full_wait_s: float = 2.0  # how long a publish waits for room in a full store


@dataclass
class _Pending:
    work: PrefillWork
    out: asyncio.Queue


def check_prefill_request(req: PrefillRequest, spec: ModelSpec) -> None:
    """The fields of a prefill request that need no tokenizer (every engine's prefill node)."""
    if not REQUEST_ID_RE.match(req.request_id):
        raise InvalidArgument("request_id must be 1-64 of letters, digits, '-', '_', '.'")
    req.prompt.validate()
    req.sampling.validate(spec.max_model_len, spec.vocab_size)
    if req.kv_lease_seconds < 0 or req.kv_lease_seconds > MAX_LEASE_S:
        raise InvalidArgument(f"kv_lease_seconds must be in [0, {MAX_LEASE_S}]")


def validate_prompt_ids(ids: list[int], spec: ModelSpec, max_tokens: int) -> None:
    if not ids:
        raise InvalidArgument("prompt has no tokens")
    bad = next((t for t in ids if not 0 <= t < spec.vocab_size), None)
    if bad is not None:
        raise InvalidArgument(f"prompt token id {bad} outside the vocabulary [0, {spec.vocab_size})")
    if len(ids) + max_tokens > spec.max_model_len:
        raise InvalidArgument(
            f"prompt of {len(ids)} tokens plus max_tokens {max_tokens} exceeds the model limit {spec.max_model_len}")


class PrefillService:
    def __init__(self, node: str, engine: Engine, thread: EngineThread, store: KVStoreClient,
                 limits: PrefillLimits) -> None:
        self.node = node
        self.engine = engine
        self.thread = thread
        self.store = store
        self.limits = limits
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self.running = 0
        self._task: asyncio.Task | None = None
        self._device_exports: DeviceExports | None = None  # only a GPU engine publishes by CUDA IPC
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{node}-tokenize")
        self._tokenizing = 0  # calls queued or running in that thread

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._schedule(), name="prefill-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    def _gauges(self) -> None:
        metrics.NODE_QUEUE_DEPTH.labels("prefill", self.node).set(len(self._queue))
        metrics.NODE_RUNNING.labels("prefill", self.node).set(self.running)

    async def prefill(self, req: PrefillRequest,
                      kv_sink: Callable[[KVGroup], Awaitable[None]] | None = None) -> AsyncIterator[PrefillEvent]:
        """Yield PrefillStarted, a KVDescriptor per published group, PrefillDone.

        With ``kv_sink`` (colocated mode) groups go to the sink instead of the store and no
        descriptors are yielded.
        """
        spec = self.engine.spec
        check_prefill_request(req, spec)
        if self.running + len(self._queue) >= self.limits.max_requests:
            raise ResourceExhausted(f"prefill node {self.node} is full ({self.limits.max_requests} requests)",
                                    retry_after_s=0.5)
        ids = await self._tokenize(req.prompt)
        validate_prompt_ids(ids, spec, req.sampling.max_tokens)
        yield PrefillStarted(tuple(ids), spec)

        lease_s = req.kv_lease_seconds or self.limits.kv_lease_s
        pending = _Pending(PrefillWork(req.request_id, ids, req.sampling), asyncio.Queue())
        self._queue.append(pending)
        self._gauges()
        self._wakeup.set()
        keys: list[str] = []                   # every key a publish was started for
        publishing: set[asyncio.Task] = set()  # publishes run concurrently with the engine and each other
        next_item: asyncio.Task | None = None
        finished = False
        try:
            while True:
                if next_item is None:
                    next_item = asyncio.ensure_future(pending.out.get())
                done, _ = await asyncio.wait({next_item, *publishing}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {next_item}:
                    publishing.discard(task)
                    yield task.result()
                if next_item not in done:
                    continue
                item, next_item = next_item.result(), None
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, KVGroup):
                    if kv_sink is not None:
                        await kv_sink(item)
                        continue
                    keys.append(f"{req.request_id}.g{len(keys)}")
                    publishing.add(asyncio.ensure_future(self._publish(req.request_id, keys[-1], len(keys) - 1,
                                                                       item, lease_s)))
                    continue
                assert isinstance(item, SampledToken)
                for task in asyncio.as_completed(list(publishing)):
                    yield await task
                publishing.clear()
                tracker = OutputTracker(self.engine.tokenizer, ids, req.sampling, spec.eos_token_ids)
                text, reason = tracker.add(item.token_id)
                finished = True
                yield PrefillDone(item.token_id, text, item.logprob, len(keys), reason or FinishReason.UNSPECIFIED)
                return
        finally:
            pending.work.cancelled.set()
            for task in [*publishing, *([next_item] if next_item else [])]:
                task.cancel()
            if pending in self._queue:
                self._queue.remove(pending)
                self._gauges()
            if not finished and keys:
                # Nobody will fetch these: free them now rather than at lease expiry.
                for key in keys:
                    self.store.release_soon(key)

    async def _tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids as they are; a short text on the loop while the tokenizer thread is idle (a
        thread hop costs more than encoding a few hundred characters); the rest in that thread.
        Not in the engine thread: a prefill batch holds it until it ends, and a prompt must be queued
        (so tokenized) to join a running batch between two chunks. Never two tokenize calls at once:
        the loop tokenizes only while the thread has nothing to do."""
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if self._tokenizing == 0 and prompt.text is not None and len(prompt.text) <= INLINE_TOKENIZE_CHARS:
            return self.engine.tokenize(prompt)
        self._tokenizing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, self.engine.tokenize,
                                                                    prompt)
        finally:
            self._tokenizing -= 1

    async def _publish(self, request_id: str, key: str, index: int, group: KVGroup, lease_s: float) -> KVDescriptor:
        spec = self.engine.spec
        t0 = time.monotonic()
        # metrics: the group's KV is held here until the store has it; failed publishes counted by reason
        held = spec.kv_bytes(group.layer_end - group.layer_start, group.token_end - group.token_start)
        metrics.NODE_KV_CACHE.labels("prefill", self.node).inc(held)
        try:
            if getattr(group.data, "is_cuda", False):  # a GPU engine: hand off by CUDA IPC, bytes stay on GPU
                return await self._publish_device(request_id, key, index, group, lease_s, t0)
            put = await self._put_waiting_for_room(key, group.data, request_id, lease_s)
        except ResourceExhausted:
            metrics.KV_TRANSFER_FAILURES.labels("prefill", "store_full").inc()
            raise
        except PdgrpcError:
            metrics.KV_TRANSFER_FAILURES.labels("prefill", "store").inc()
            raise
        finally:
            metrics.NODE_KV_CACHE.labels("prefill", self.node).dec(held)
        metrics.observe_kv_transfer("prefill", "publish", time.monotonic() - t0, put.size)
        return KVDescriptor(
            request_id=request_id, store_address=self.store.address, key=key, location=put.location,
            layout=KVLayout(spec.fingerprint, spec.dtype, group.layer_start, group.layer_end, group.token_start,
                            group.token_end, spec.num_kv_heads, spec.head_dim),
            size_bytes=put.size, crc32=put.crc32, lease_expiry_unix=put.lease_expiry_unix, shm_name=put.shm_name,
            shm_offset=put.shm_offset, transfer_endpoint=put.transfer_endpoint,
            transfer_address=put.transfer_address, group_index=index,
        )

    async def _publish_device(self, request_id: str, key: str, index: int, group: KVGroup, lease_s: float,
                              t0: float) -> KVDescriptor:
        spec = self.engine.spec
        if self._device_exports is None:
            self._device_exports = DeviceExports(self.store)
        device, size = await self._device_exports.publish(key, group.data, owner=request_id, lease_s=lease_s)
        metrics.observe_kv_transfer("prefill", "publish", time.monotonic() - t0, size)
        return KVDescriptor(
            request_id=request_id, store_address=self.store.address, key=key, location="device",
            layout=KVLayout(spec.fingerprint, spec.dtype, group.layer_start, group.layer_end, group.token_start,
                            group.token_end, spec.num_kv_heads, spec.head_dim),
            size_bytes=size, crc32=0, lease_expiry_unix=time.time() + lease_s, device_index=device,
            group_index=index,
        )

    async def _put_waiting_for_room(self, key: str, data, owner: str, lease_s: float):
        """A full store is usually full for a moment (decode releases KV as it loads it): wait with
        backoff up to ``store_full_wait_s``, then fail with RESOURCE_EXHAUSTED. Never drop KV."""
        deadline = time.monotonic() + self.limits.store_full_wait_s
        delay = 0.02
        while True:
            try:
                return await self.store.put(key, data, owner=owner, lease_s=lease_s)
            except ResourceExhausted as exc:
                if time.monotonic() + delay > deadline:
                    raise ResourceExhausted(f"KV store full: {exc.message}", retry_after_s=1.0) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)

    async def _schedule(self) -> None:
        """Form batches of queued prompts up to the token budget and run them, one batch at a time."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch: list[_Pending] = []
                tokens = 0
                while self._queue:
                    nxt = self._queue[0]
                    n = len(nxt.work.prompt_token_ids)
                    if batch and tokens + n > self.limits.batch_token_budget:
                        break
                    batch.append(self._queue.pop(0))
                    tokens += n
                # Shortest prompt first within the batch (stable: arrival order among equals). The
                # engine prefills a batch's prompts one after another, so in arrival order a 40-token
                # prompt queued behind a 1000-token one waits for all of it (seconds on a CPU core);
                # the other way round the long one waits a few short prefills more. Only within one
                # batch, bounded by the token budget: nothing waits past the next batch.
                batch = sorted((p for p in batch if not p.work.cancelled.is_set()),
                               key=lambda p: len(p.work.prompt_token_ids))
                if batch:
                    await self._run_batch(batch)

    def _joiner(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> Callable[[], list[PrefillWork]]:
        """``more`` for an engine that prefills in chunks: called in the engine thread between two
        chunks, it moves the prompts queued meanwhile into the running ``batch`` (on the event loop,
        which owns the queue) and returns their works. Without it a 40-token prompt that arrives
        while a 1000-token one prefills waits for all of it (seconds on a CPU core)."""
        def more() -> list[PrefillWork]:
            answer: concurrent.futures.Future = concurrent.futures.Future()

            def take() -> None:
                if answer.set_running_or_notify_cancel():
                    answer.set_result(self._join(batch))

            try:
                loop.call_soon_threadsafe(take)
                return answer.result(timeout=JOIN_WAIT_S)
            except RuntimeError:  # the loop is closed: the node is stopping
                return []
            except concurrent.futures.TimeoutError:  # the loop is stuck: go on without joiners
                return [] if answer.cancel() else answer.result()  # took them just now: run them
        return more

    def _join(self, batch: list[_Pending]) -> list[PrefillWork]:
        """Queued prompts (arrival order) that fit the token budget join the running batch."""
        budget = self.limits.batch_token_budget
        joined = []
        for pending in list(self._queue):
            n = len(pending.work.prompt_token_ids)
            if pending.work.cancelled.is_set() or n > budget:
                continue
            budget -= n
            self._queue.remove(pending)
            batch.append(pending)
            joined.append(pending.work)
        if joined:
            self.running = len(batch)
            self._gauges()
            metrics.NODE_PREFILL_JOINS.labels("prefill", self.node).inc(len(joined))
        return joined

    async def _run_batch(self, batch: list[_Pending]) -> None:
        self.running = len(batch)
        self._gauges()
        metrics.NODE_BATCH_SIZE.labels("prefill", self.node).observe(len(batch))
        t0 = time.monotonic()
        done: set[int] = set()
        try:
            works = [p.work for p in batch]
            more = self._joiner(batch, asyncio.get_running_loop()) if self.engine.prefill_joins else None
            async for index, item in self.thread.iterate(lambda: self.engine.prefill(works, more)):
                if item is None:  # between two chunks: other engine calls got their turn
                    continue
                batch[index].out.put_nowait(item)
                if isinstance(item, SampledToken):
                    done.add(index)
        except Exception as exc:  # engine failure: every unfinished request in the batch gets it
            log.exception("prefill batch failed")
            for i, p in enumerate(batch):
                if i not in done:
                    p.out.put_nowait(exc if isinstance(exc, PdgrpcError) else
                                     Internal(f"prefill engine failed: {type(exc).__name__}: {exc}"))
        finally:
            metrics.NODE_STEP_TIME.labels("prefill", self.node).observe(time.monotonic() - t0)
            self.running = 0
            self._gauges()
