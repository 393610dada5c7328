"""One request through the cluster: prefill -> store -> decode, descriptors forwarded as published.

``Router.generate`` in order:
  1. validate, admit (bounded in-flight count), pick the least-loaded prefill and decode nodes
  2. call Prefill (server stream); on PrefillStarted open Decode (bidi stream) with DecodeStart
  3. forward each KVDescriptor to decode the moment prefill streams it, so decode fetches group N
     while prefill computes group N+1; decode acknowledges each with KVLoaded
  4. on PrefillDone send the first token to the client at once, then DecodeKVDone to decode
  5. stream decode's tokens to the client, then a final message with usage and timings
On any failure, cancel or deadline both downstream calls are cancelled (gRPC carries the cancel
to the nodes, which stop work and release what they hold) and the request's KV is released from
the store by owner, again a little later to catch a publish that was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import grpc

from pdgrpc import convert, metrics
from pdgrpc.coordinator.pool import NodeHandle, NodePool
from pdgrpc.errors import InvalidArgument, PdgrpcError, ResourceExhausted, Unavailable
from pdgrpc.grpcutil import error_from_rpc
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.types import (
    REQUEST_ID_RE, DecodeFinished, DecodeKVDone, DecodeStart, FinishReason, GenerateDelta, GenerateEvent,
    GenerateFinal, GenerateRequest, KVDescriptor, KVLoaded, PrefillDone, PrefillRequest, PrefillStarted, Role,
    Timings, TokenOut,
)

log = logging.getLogger(__name__)
LATE_RELEASE_DELAY_S = 2.0


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


class Router:
    def __init__(self, pool: NodePool, store: KVStoreClient, max_inflight: int) -> None:
        self.pool = pool
        self.store = store
        self.max_inflight = max_inflight
        self.inflight = 0
        self._background: set[asyncio.Task] = set()

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
        prefill_node = self.pool.pick(Role.PREFILL)
        decode_node = self.pool.pick(Role.DECODE)
        self.inflight += 1
        prefill_node.inflight += 1
        decode_node.inflight += 1
        metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)
        queue_s = time.monotonic() - p.arrival
        out: asyncio.Queue = asyncio.Queue()
        to_decode: asyncio.Queue = asyncio.Queue()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        tasks: list[asyncio.Task] = []
        received_at: dict[int, float] = {}
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
            try:
                async for msg in call:
                    ev = convert.decode_event_from_pb(msg)
                    if isinstance(ev, KVLoaded):
                        p.loaded += 1
                        if p.prefill_done and p.loaded == p.groups:
                            p.all_loaded = time.monotonic()
                    elif isinstance(ev, TokenOut):
                        out.put_nowait(GenerateDelta(ev.text, (ev.token_id,),
                                                     (ev.logprob,) if req.sampling.logprobs else ()))
                    elif isinstance(ev, DecodeFinished):
                        out.put_nowait(ev)
                        return
                raise Unavailable(f"decode node {decode_node.name} ended the stream without finishing")
            except grpc.aio.AioRpcError as exc:
                out.put_nowait(self._downstream_error(exc, decode_node))
            except PdgrpcError as exc:
                out.put_nowait(exc)

        async def pump_prefill() -> None:
            p.prefill_sent = time.monotonic()
            call = prefill_node.stub.Prefill(
                convert.prefill_request_to_pb(PrefillRequest(rid, req.prompt, req.sampling)), timeout=remaining())
            try:
                async for msg in call:
                    ev = convert.prefill_event_from_pb(msg)
                    if isinstance(ev, PrefillStarted):
                        p.prompt_tokens = len(ev.prompt_token_ids)
                        p.model = ev.model.name
                        to_decode.put_nowait(DecodeStart(rid, ev.prompt_token_ids, req.sampling, ev.model.fingerprint))
                        dcall = decode_node.stub.Decode(decode_requests(), timeout=remaining())
                        tasks.append(asyncio.create_task(read_decode(dcall)))
                    elif isinstance(ev, KVDescriptor):
                        p.groups += 1
                        p.last_descriptor = received_at[ev.group_index] = time.monotonic()
                        to_decode.put_nowait(ev)
                    elif isinstance(ev, PrefillDone):
                        p.prefill_done = time.monotonic()
                        p.loaded_before_prefill_done = p.loaded
                        if p.loaded == p.groups:
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
            while True:
                ev = await out.get()
                if isinstance(ev, BaseException):
                    raise ev
                now = time.monotonic()
                if isinstance(ev, PrefillDone):
                    p.first_token = p.last_token = now
                    p.completion_tokens = 1
                    metrics.TIME_TO_FIRST_TOKEN.labels(p.model).observe(now - p.arrival)
                    yield GenerateDelta(ev.first_token_text, (ev.first_token_id,),
                                        (ev.first_token_logprob,) if req.sampling.logprobs else ())
                    if ev.finish_reason is not FinishReason.UNSPECIFIED:
                        reason = ev.finish_reason
                        break
                elif isinstance(ev, GenerateDelta):
                    metrics.INTER_TOKEN_LATENCY.labels(p.model).observe(now - p.last_token)
                    p.last_token = now
                    p.completion_tokens += 1
                    yield ev
                elif isinstance(ev, DecodeFinished):
                    reason = ev.finish_reason
                    break
            finished = True
            yield self._final(rid, reason, p, queue_s, prefill_node, decode_node)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            self.inflight -= 1
            prefill_node.inflight -= 1
            decode_node.inflight -= 1
            metrics.REQUESTS_INFLIGHT.labels("coordinator").set(self.inflight)
            if not finished or p.loaded < p.groups:
                self._release_later(rid)

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
                                  timeout=timeout_s)
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
                    p.completion_tokens += 1
                    yield GenerateDelta(ev.text, (ev.token_id,), (ev.logprob,) if req.sampling.logprobs else ())
                elif isinstance(ev, DecodeFinished):
                    yield self._final(rid, ev.finish_reason, p, queue_s, node, node)
                    return
            raise Unavailable(f"colocated node {node.name} ended the stream without finishing")
        except grpc.aio.AioRpcError as exc:
            raise self._downstream_error(exc, node) from None
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

    def _downstream_error(self, exc: grpc.aio.AioRpcError, node: NodeHandle) -> PdgrpcError:
        err = error_from_rpc(exc, f"{node.role.value} node {node.name}")
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_unreachable(node)
        return err

    def _release_later(self, rid: str) -> None:
        """Free the request's KV now, and once more after in-flight publishes have landed."""
        async def release() -> None:
            for delay in (0.0, LATE_RELEASE_DELAY_S):
                await asyncio.sleep(delay)
                try:
                    await self.store.release_owner(rid)
                except PdgrpcError as exc:  # leases reclaim it in the end
                    log.warning("release of %s failed: %s", rid, exc)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
