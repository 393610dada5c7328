"""One request through the cluster: prefill -> store -> decode, descriptors forwarded as published.

``Router.generate`` in order:
  1. validate, admit (bounded in-flight count), pick the least-loaded prefill and decode nodes
  2. call Prefill (server stream); on PrefillStarted open Decode (bidi stream) with DecodeStart
  3. forward each KVDescriptor to decode the moment prefill streams it, so decode fetches group N
     while prefill computes group N+1; decode acknowledges each with KVLoaded
  4. on PrefillDone send the first token to the client at once, then DecodeKVDone to decode
  5. stream decode's tokens to the client, then a final message with usage and timings
On any failure, cancel or deadline both downstream calls are cancelled (gRPC carries the cancel
to the nodes, which stop work and release what they hold) and the request's KV is released by owner
from our store and every other store its descriptors named (a store per host), again a little later
to catch a publish that was in flight; live requests' leases are renewed in the same stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdgrpc import convert, metrics
from pdgrpc.coordinator.pool import NodeHandle, NodePool
from pdgrpc.errors import Code, InvalidArgument, PdgrpcError, ResourceExhausted, Unavailable
from pdgrpc.grpcutil import error_from_rpc
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.types import (
    REQUEST_ID_RE,
    DecodeFinished,
    DecodeKVDone,
    DecodeStart,
    FinishReason,
    GenerateDelta,
    GenerateEvent,
    GenerateFinal,
    GenerateRequest,
    KVDescriptor,
    KVLoaded,
    PrefillDone,
    PrefillRequest,
    PrefillStarted,
    Prompt,
    Role,
    Timings,
    TokenOut,
)

log = logging.getLogger(__name__)
LATE_RELEASE_DELAY_S = 2.0
MAX_RETRIES = 3            # attempts after the first, when nodes die mid-request
DEFAULT_KV_LEASE_S = 60.0  # what nodes give published KV; renewed while the request lives


@dataclass
class _Progress:
    """What one request has seen so far (all times monotonic)."""

    arrival: float
    prefill_sent: float = 0.0
    prefill_done: float = 0.0
    last_descriptor: float = 0.0
    all_loaded: float = 0.0
    first_token: float = 0.0
    last_token: float = 0.0
    groups: int = 0
    loaded: int = 0
    loaded_before_prefill_done: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    queue_s: float = 0.0


class _NodeFailed(Exception):
    """A node died or stopped answering during an attempt; the request may go on elsewhere."""

    def __init__(self, node: NodeHandle, error: PdgrpcError) -> None:
        super().__init__(error.message)
        self.node = node
        self.error = error


@dataclass
class _RequestState:
    """What survives from one attempt to the next."""

    request_id: str
    attempt: int = 0
    prompt_ids: list[int] | None = None                   # after tokenization by the first prefill
    generated: list[int] = field(default_factory=list)    # tokens already sent to the client

    def owner(self) -> str:
        """Owner of this attempt's KV: distinct per attempt, so releasing a failed attempt's KV
        never touches the next attempt's."""
        return self.request_id if self.attempt == 0 else f"{self.request_id}.r{self.attempt}"


class Router:
    def __init__(self, pool: NodePool, store: KVStoreClient, max_inflight: int,
                 kv_lease_s: float = DEFAULT_KV_LEASE_S) -> None:
        self.pool = pool
        self.store = store
        self.max_inflight = max_inflight
        self.kv_lease_s = kv_lease_s
        self.inflight = 0
        self._background: set[asyncio.Task] = set()
        self._live_owners: set[str] = set()
        # With a store per host, KV lives in the store of the prefill node's host: the stores other
        # than ours that each live owner's descriptors named (renewed and released there too).
        self._owner_stores: dict[str, set[str]] = {}
        self._peer_stores: dict[str, KVStoreClient] = {}
        self._renewer: asyncio.Task | None = None

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")

    async def close(self) -> None:
        if self._renewer:
            self._renewer.cancel()
        await asyncio.gather(*(c.close() for c in self._peer_stores.values()))

    def _stores_of(self, owner: str) -> list[KVStoreClient]:
        """Our store and the other stores ``owner``'s KV was published to."""
        peers = []
        for address in sorted(self._owner_stores.get(owner, ())):
            if address not in self._peer_stores:
                self._peer_stores[address] = KVStoreClient(address, token=self.store.token, use_shm=False)
            peers.append(self._peer_stores[address])
        return [self.store, *peers]

    async def _renew_leases(self) -> None:
        """Live requests keep their KV: renew at a third of the lease, so only the KV of requests
        nobody serves any more (a coordinator or node gone) ever expires."""
        while True:
            await asyncio.sleep(self.kv_lease_s / 3)
            for owner in list(self._live_owners):
                for store in self._stores_of(owner):
                    try:
                        await store.renew(owner, self.kv_lease_s)
                    except PdgrpcError as exc:
                        log.warning("lease renewal for %s in %s failed: %s", owner, store.address, exc)

    async def generate(self, req: GenerateRequest, timeout_s: float | None) -> AsyncIterator[GenerateEvent]:
        p = _Progress(arrival=time.monotonic())
        req.prompt.validate()
        req.sampling.validate()
        if req.request_id and not REQUEST_ID_RE.match(req.request_id):
            raise InvalidArgument("request_id must be 1-64 of letters, digits, '-', '_', '.'")
        rid = req.request_id or uuid.uuid4().hex
        if self.inflight >= self.max_inflight:
            raise ResourceExhausted(f"coordinator is at its limit of {self.max_inflight} requests", retry_after_s=0.5)
        if self.pool.colocated:
            async for ev in self._generate_colocated(req, rid, p, timeout_s):
                yield ev
            return
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.inflight += 1
        metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)
        state = _RequestState(rid)
        failed: list[NodeHandle] = []
        try:
            while True:
                prefill_node = self.pool.pick(Role.PREFILL, exclude=tuple(failed))
                decode_node = self.pool.pick(Role.DECODE, exclude=tuple(failed))
                if not p.queue_s:
                    p.queue_s = time.monotonic() - p.arrival
                try:
                    async for ev in self._attempt(req, state, p, prefill_node, decode_node, deadline):
                        yield ev
                    return
                except _NodeFailed as failure:
                    # A node died (or would not answer): go on elsewhere if anything is left to try.
                    failed.append(failure.node)
                    state.attempt += 1
                    metrics.REQUEST_RETRIES.labels(failure.node.role.value).inc()
                    log.warning("request %s: %s; retrying (attempt %d, %d tokens already sent)", rid,
                                failure.error.message, state.attempt, len(state.generated))
                    if state.attempt > MAX_RETRIES or (deadline is not None and time.monotonic() >= deadline):
                        raise failure.error from None
        finally:
            self.inflight -= 1
            metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)

    async def _attempt(self, req: GenerateRequest, state: "_RequestState", p: _Progress, prefill_node: NodeHandle,
                       decode_node: NodeHandle, deadline: float | None) -> AsyncIterator[GenerateEvent]:
        """One prefill + decode pair. A retry after tokens were sent continues the sequence: prefill
        gets prompt + tokens sent so far and only the tokens still owed are generated."""
        owner = state.owner()
        if state.prompt_ids is None:
            prompt, sampling = req.prompt, req.sampling
        else:
            prompt = Prompt(token_ids=tuple(state.prompt_ids) + tuple(state.generated))
            sampling = dataclasses.replace(req.sampling, max_tokens=req.sampling.max_tokens - len(state.generated))
        prefill_node.inflight += 1
        decode_node.inflight += 1
        out: asyncio.Queue = asyncio.Queue()
        to_decode: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        received_at: dict[int, float] = {}
        groups = loaded = 0
        finished = False

        def remaining() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0.001)

        async def decode_requests():
            while (msg := await to_decode.get()) is not None:
                yield convert.decode_input_to_pb(msg)
                if isinstance(msg, KVDescriptor):
                    received = received_at.pop(msg.group_index, time.monotonic())
                    metrics.KV_TRANSFER.labels("coordinator", "deliver").observe(time.monotonic() - received)

        async def read_decode(call) -> None:
            nonlocal loaded
            try:
                async for msg in call:
                    ev = convert.decode_event_from_pb(msg)
                    if isinstance(ev, KVLoaded):
                        loaded += 1
                        if state.attempt == 0:
                            p.loaded = loaded
                            if p.prefill_done and loaded == p.groups:
                                p.all_loaded = time.monotonic()
                    elif isinstance(ev, TokenOut):
                        out.put_nowait(GenerateDelta(ev.text, ev.token_ids, ev.logprobs if sampling.logprobs else ()))
                    elif isinstance(ev, DecodeFinished):
                        out.put_nowait(ev)
                        return
                raise Unavailable(f"decode node {decode_node.name} ended the stream without finishing")
            except grpc.aio.AioRpcError as exc:
                out.put_nowait(self._downstream_error(exc, decode_node))
            except PdgrpcError as exc:
                out.put_nowait(exc)

        async def pump_prefill() -> None:
            nonlocal groups
            sent = time.monotonic()
            call = prefill_node.stub.Prefill(
                convert.prefill_request_to_pb(PrefillRequest(owner, prompt, sampling)), timeout=remaining(),
                metadata=self.pool.metadata)
            try:
                async for msg in call:
                    ev = convert.prefill_event_from_pb(msg)
                    if isinstance(ev, PrefillStarted):
                        if state.prompt_ids is None:
                            state.prompt_ids = list(ev.prompt_token_ids)
                            p.prompt_tokens, p.model, p.prefill_sent = len(ev.prompt_token_ids), ev.model.name, sent
                        to_decode.put_nowait(DecodeStart(owner, ev.prompt_token_ids, sampling, ev.model.fingerprint))
                        dcall = decode_node.stub.Decode(decode_requests(), timeout=remaining(),
                                                    metadata=self.pool.metadata)
                        tasks.append(asyncio.create_task(read_decode(dcall)))
                    elif isinstance(ev, KVDescriptor):
                        if ev.store_address != self.store.address:
                            self._owner_stores.setdefault(owner, set()).add(ev.store_address)
                        groups += 1
                        received_at[ev.group_index] = time.monotonic()
                        if state.attempt == 0:
                            p.groups, p.last_descriptor = groups, received_at[ev.group_index]
                        to_decode.put_nowait(ev)
                    elif isinstance(ev, PrefillDone):
                        if state.attempt == 0:
                            p.prefill_done = time.monotonic()
                            p.loaded_before_prefill_done = loaded
                            if loaded == groups:
                                p.all_loaded = p.prefill_done
                        out.put_nowait(ev)
                        if ev.finish_reason is FinishReason.UNSPECIFIED:
                            to_decode.put_nowait(DecodeKVDone(ev.first_token_id, ev.kv_groups))
                        to_decode.put_nowait(None)
                        return
                raise Unavailable(f"prefill node {prefill_node.name} ended the stream without a first token")
            except grpc.aio.AioRpcError as exc:
                out.put_nowait(self._downstream_error(exc, prefill_node))
            except PdgrpcError as exc:
                out.put_nowait(exc)

        try:
            tasks.append(asyncio.create_task(pump_prefill()))
            self._live_owners.add(owner)
            pending = None  # taken from the queue while merging deltas, handled next
            while True:
                ev, pending = (pending, None) if pending is not None else (await out.get(), None)
                if isinstance(ev, _NodeFailed):
                    raise ev
                if isinstance(ev, BaseException):
                    raise ev
                now = time.monotonic()
                if isinstance(ev, PrefillDone):
                    delta = GenerateDelta(ev.first_token_text, (ev.first_token_id,),
                                          (ev.first_token_logprob,) if sampling.logprobs else ())
                    if not p.first_token:
                        p.first_token = now
                        metrics.TIME_TO_FIRST_TOKEN.labels(p.model).observe(now - p.arrival)
                    else:
                        metrics.INTER_TOKEN_LATENCY.labels(p.model).observe(now - p.last_token)
                    p.last_token = now
                    state.generated.append(ev.first_token_id)
                    yield delta
                    if ev.finish_reason is not FinishReason.UNSPECIFIED:
                        reason = ev.finish_reason
                        break
                elif isinstance(ev, GenerateDelta):
                    # Deltas that queued up while the client's last message was being sent go out as one.
                    while not out.empty():
                        more = out.get_nowait()
                        if not isinstance(more, GenerateDelta):
                            pending = more
                            break
                        ev = GenerateDelta(ev.text + more.text, ev.token_ids + more.token_ids,
                                           ev.logprobs + more.logprobs)
                    metrics.INTER_TOKEN_LATENCY.labels(p.model).observe(now - p.last_token)
                    p.last_token = now
                    state.generated.extend(ev.token_ids)
                    yield ev
                elif isinstance(ev, DecodeFinished):
                    reason = ev.finish_reason
                    break
            finished = True
            p.completion_tokens = len(state.generated)
            yield self._final(state.request_id, reason, p, p.queue_s, prefill_node, decode_node)
        finally:
            self._live_owners.discard(owner)
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            prefill_node.inflight -= 1
            decode_node.inflight -= 1
            if not finished or loaded < groups:
                self._release_later(owner)
            else:
                self._owner_stores.pop(owner, None)

    async def _generate_colocated(self, req: GenerateRequest, rid: str, p: _Progress,
                                  timeout_s: float | None) -> AsyncIterator[GenerateEvent]:
        """The baseline path: one node does both phases; same timings and metrics."""
        node = self.pool.pick(Role.COLOCATED)
        self.inflight += 1
        node.inflight += 1
        metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)
        queue_s = time.monotonic() - p.arrival
        p.prefill_sent = time.monotonic()
        call = node.stub.Generate(convert.prefill_request_to_pb(PrefillRequest(rid, req.prompt, req.sampling)),
                                  timeout=timeout_s, metadata=self.pool.metadata)
        try:
            async for msg in call:
                ev = convert.colocated_event_from_pb(msg)
                now = time.monotonic()
                if isinstance(ev, PrefillStarted):
                    p.prompt_tokens, p.model = len(ev.prompt_token_ids), ev.model.name
                elif isinstance(ev, PrefillDone):
                    p.prefill_done = p.first_token = p.last_token = now
                    p.completion_tokens = 1
                    metrics.TIME_TO_FIRST_TOKEN.labels(p.model).observe(now - p.arrival)
                    yield GenerateDelta(ev.first_token_text, (ev.first_token_id,),
                                        (ev.first_token_logprob,) if req.sampling.logprobs else ())
                elif isinstance(ev, TokenOut):
                    metrics.INTER_TOKEN_LATENCY.labels(p.model).observe(now - p.last_token)
                    p.last_token = now
                    p.completion_tokens += len(ev.token_ids)
                    yield GenerateDelta(ev.text, ev.token_ids, ev.logprobs if req.sampling.logprobs else ())
                elif isinstance(ev, DecodeFinished):
                    yield self._final(rid, ev.finish_reason, p, queue_s, node, node)
                    return
            raise Unavailable(f"colocated node {node.name} ended the stream without finishing")
        except grpc.aio.AioRpcError as exc:
            err = self._downstream_error(exc, node)
            raise (err.error if isinstance(err, _NodeFailed) else err) from None
        finally:
            call.cancel()
            self.inflight -= 1
            node.inflight -= 1
            metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)

    def _final(self, rid: str, reason: FinishReason, p: _Progress, queue_s: float,
               prefill_node: NodeHandle, decode_node: NodeHandle) -> GenerateFinal:
        now = time.monotonic()
        total = now - p.arrival
        m = p.model
        metrics.E2E_LATENCY.labels(m).observe(total)
        metrics.QUEUE_TIME.labels(m).observe(queue_s)
        metrics.PROMPT_TOKENS.labels(m).inc(p.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(m).inc(p.completion_tokens)
        if p.prefill_done:  # metrics: per-phase request time
            metrics.PREFILL_TIME.labels(m).observe(p.prefill_done - p.prefill_sent)
        if p.first_token:  # metrics
            metrics.DECODE_TIME.labels(m).observe(now - p.first_token)
        if p.completion_tokens > 1:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(m).observe((now - p.first_token) / (p.completion_tokens - 1))
        kv_s = max(p.all_loaded - p.last_descriptor, 0.0) if p.all_loaded and p.groups else 0.0
        if p.groups:
            metrics.KV_TRANSFER.labels("coordinator", "total").observe(kv_s)
        timings = Timings(queue_s, p.prefill_done - p.prefill_sent, kv_s, p.first_token - p.arrival, total,
                          p.loaded_before_prefill_done, p.groups)
        return GenerateFinal(rid, reason, p.prompt_tokens, p.completion_tokens, timings,
                             prefill_node.name, decode_node.name)

    def _downstream_error(self, exc: grpc.aio.AioRpcError, node: NodeHandle) -> BaseException:
        """A failed downstream call: _NodeFailed when the node itself is gone (retry elsewhere),
        otherwise the domain error with the node's own status (bad input is not retried)."""
        err = error_from_rpc(exc, f"{node.role.value} node {node.name}")
        if err.code is Code.UNAVAILABLE:
            self.pool.mark_unreachable(node)
            return _NodeFailed(node, err)
        return err

    def _release_later(self, rid: str) -> None:
        """Free the request's KV now, and once more after in-flight publishes have landed."""
        async def release() -> None:
            stores = self._stores_of(rid)
            self._owner_stores.pop(rid, None)
            for delay in (0.0, LATE_RELEASE_DELAY_S):
                await asyncio.sleep(delay)
                for store in stores:
                    try:
                        await store.release_owner(rid)
                    except PdgrpcError as exc:  # leases reclaim it in the end
                        log.warning("release of %s in %s failed: %s", rid, store.address, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
