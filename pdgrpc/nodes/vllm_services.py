"""Prefill, decode and colocated services backed by vLLM (``--engine vllm``): the same async methods
and events as the torch/mock services, so the servicers, the coordinator and the protocol are unchanged.

Prefill (``VllmPrefillService.prefill``): validate and tokenize, yield ``PrefillStarted``; run the
prompt in vLLM with ``max_tokens=1`` and the connector's save opt-in; vLLM's final output carries
the descriptors of the KV the connector put in the store (one per layer group, layout
``layer,kv,head,token,dim``, see ``pdgrpc.engine.vllm_connector``); yield a ``KVDescriptor`` for each,
then ``PrefillDone`` with the first token. A save that failed is the error the store gave
(RESOURCE_EXHAUSTED when it is full). A cancelled call aborts the vLLM request (vLLM frees its
blocks) and releases the request's store entries by owner, now and once more a moment later.

Decode (``VllmDecodeService.decode``): ``DecodeStart`` and each descriptor are checked as they arrive,
with the torch path's status codes (FAILED_PRECONDITION for another model, layout or store,
INVALID_ARGUMENT for inconsistent sizes, NOT_FOUND for a key the store no longer has). On
``DecodeKVDone`` the request goes to vLLM as prompt + first token, with the descriptors: the
connector loads the prompt's KV (checking each entry's size and CRC-32, releasing it once loaded)
and vLLM computes only the first token's forward. ``KVLoaded`` events follow once vLLM reports the
prompt's tokens as cached (``RequestOutput.num_cached_tokens``). If a load fails (e.g. a CRC
mismatch) vLLM recomputes the prompt instead of decoding from bad KV: the answer is still right, no
``KVLoaded`` is sent, and ``pdgrpc_kv_transfer_failures_total{role="decode"}`` counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator

from prometheus_client import Counter, Gauge

from pdgrpc import metrics
from pdgrpc.engine.output import OutputTracker
from pdgrpc.engine.vllm_engine import PARAMS_KEY, WIRE_LAYOUT, VllmEngine, build_vllm_engine
from pdgrpc.errors import (
    Internal,
    InvalidArgument,
    NotFound,
    PdgrpcError,
    ResourceExhausted,
    error_for,
)
from pdgrpc.kvstore import arena as arenas
from pdgrpc.kvstore import shm
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.nodes.checks import check_decode_start, check_descriptor
from pdgrpc.nodes.decode_service import DecodeLimits
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.nodes.prefill_service import PrefillLimits, check_prefill_request, validate_prompt_ids
from pdgrpc.types import (
    ColocatedEvent,
    DecodeEvent,
    DecodeFinished,
    DecodeInput,
    DecodeKVDone,
    DecodeStart,
    FinishReason,
    KVDescriptor,
    KVLayout,
    KVLoaded,
    PrefillDone,
    PrefillEvent,
    PrefillRequest,
    PrefillStarted,
    Role,
    TokenOut,
)

log = logging.getLogger(__name__)
LATE_RELEASES_S = (0.0, 2.0, 10.0)  # an aborted step still finishes its saves: release again after it

VLLM_KV_USAGE = Gauge("pdgrpc_vllm_kv_cache_usage_ratio", "Share of vLLM's KV blocks in use (last engine step)",
                      ["role", "node"])
VLLM_REQUESTS = Gauge("pdgrpc_vllm_requests", "Requests in vLLM's scheduler (last engine step)",
                      ["role", "node", "state"])
VLLM_PROMPT_TOKENS = Counter("pdgrpc_vllm_prompt_tokens_total",
                             "Prompt tokens of requests vLLM ran: computed, or cached (KV loaded from the store)",
                             ["role", "node", "source"])
_ids = itertools.count()


def _stat_logger(role: str, node: str):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class NodeStats(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                VLLM_KV_USAGE.labels(role, node).set(scheduler_stats.kv_cache_usage)
                VLLM_REQUESTS.labels(role, node, "running").set(scheduler_stats.num_running_reqs)
                VLLM_REQUESTS.labels(role, node, "waiting").set(scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self) -> None:
            pass

    return NodeStats


async def build_vllm_service(cfg, store: KVStoreClient):
    """(engine, service, thread) for serve_node: vLLM started for the node's role."""
    role = cfg.role.value
    use_shm = await store.shm_enabled()
    engine = await asyncio.to_thread(build_vllm_engine, cfg.engine, cfg.role, store.address, use_shm, cfg.name,
                                     [_stat_logger(role, cfg.name)])
    for state in ("running", "waiting"):
        VLLM_REQUESTS.labels(role, cfg.name, state).set(0)
    for source in ("computed", "cached"):
        VLLM_PROMPT_TOKENS.labels(role, cfg.name, source)
    thread = EngineThread(f"{role}-tokenizer")
    prefill = VllmPrefillService(cfg.name, engine, thread, store,
                                 PrefillLimits(cfg.max_requests, cfg.batch_token_budget, cfg.kv_lease_s))
    if cfg.role is Role.PREFILL:
        service = prefill
    elif cfg.role is Role.DECODE:
        service = VllmDecodeService(cfg.name, engine, thread, store, DecodeLimits(cfg.max_requests, cfg.max_batch,
                                                                                            cfg.stream_interval))
    else:
        service = VllmColocatedService(prefill)
    await service.warm_up()
    return engine, service, thread


class _VllmService:
    role = "prefill"

    def __init__(self, node: str, engine: VllmEngine, thread: EngineThread, store: KVStoreClient) -> None:
        self.node, self.engine, self.thread, self.store = node, engine, thread, store
        self.running = 0
        self.queued = 0
        self._background: set[asyncio.Task] = set()

    @property
    def requests(self) -> int:
        return self.running

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        handler = getattr(self.engine.llm, "output_handler", None)
        if handler is not None:  # stopped first, or it reports the engine it reads from as dead
            handler.cancel()
        await asyncio.to_thread(self.engine.shutdown)

    async def warm_up(self) -> None:
        """One short request, so the first real one does not pay one-off costs."""
        sp = self.engine.sampling_params(_greedy(2), 2)
        async for _ in self.engine.llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, sp, f"warmup-{next(_ids)}"):
            pass

    def _admit(self, limit: int) -> None:
        if self.running >= limit:
            raise ResourceExhausted(f"{self.role} node {self.node} is full ({limit} requests)", retry_after_s=0.5)
        self.running += 1
        metrics.NODE_RUNNING.labels(self.role, self.node).set(self.running)

    def _leave(self) -> None:
        self.running -= 1
        metrics.NODE_RUNNING.labels(self.role, self.node).set(self.running)

    def _count_prompt(self, prompt_tokens: int, cached: int) -> None:
        VLLM_PROMPT_TOKENS.labels(self.role, self.node, "cached").inc(cached)
        VLLM_PROMPT_TOKENS.labels(self.role, self.node, "computed").inc(prompt_tokens - cached)

    def _later(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _greedy(max_tokens: int):
    from pdgrpc.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def _logprob(completion, index: int) -> float:
    lps = getattr(completion, "logprobs", None)
    if not lps or index >= len(lps):
        return 0.0
    entry = lps[index].get(completion.token_ids[index])
    return float(entry.logprob) if entry is not None else 0.0


class VllmPrefillService(_VllmService):
    role = "prefill"

    def __init__(self, node, engine, thread, store, limits: PrefillLimits) -> None:
        super().__init__(node, engine, thread, store)
        self.limits = limits

    async def validate(self, req: PrefillRequest) -> list[int]:
        spec = self.engine.spec
        check_prefill_request(req, spec)
        ids = await self.thread.call(self.engine.tokenize, req.prompt)
        validate_prompt_ids(ids, spec, req.sampling.max_tokens)
        return ids

    async def prefill(self, req: PrefillRequest) -> AsyncIterator[PrefillEvent]:
        spec = self.engine.spec
        if self.running >= self.limits.max_requests:  # before tokenizing: a full node answers at once
            raise ResourceExhausted(f"prefill node {self.node} is full ({self.limits.max_requests} requests)",
                                    retry_after_s=0.5)
        ids = await self.validate(req)
        yield PrefillStarted(tuple(ids), spec)
        self._admit(self.limits.max_requests)
        save = req.sampling.max_tokens > 1  # a one-token answer needs no decode, so no KV
        transfer = {PARAMS_KEY: {"save": {"owner": req.request_id, "key_prefix": req.request_id,
                                          "lease_s": req.kv_lease_seconds or self.limits.kv_lease_s}}}
        sp = self.engine.sampling_params(req.sampling, 1, transfer if save else None)
        t0 = time.monotonic()
        final = None
        try:
            async for out in self.engine.llm.generate({"prompt_token_ids": ids}, sp,
                                                      f"{req.request_id}-p{next(_ids)}"):
                final = out
            if final is None or not final.outputs or not final.outputs[0].token_ids:
                raise Internal("vLLM finished the prefill without a token")
            self._count_prompt(len(ids), final.num_cached_tokens or 0)
            groups = self._descriptors(req.request_id, len(ids), final.kv_transfer_params) if save else []
            metrics.NODE_STEP_TIME.labels("prefill", self.node).observe(time.monotonic() - t0)
            for d, seconds in groups:
                metrics.observe_kv_transfer("prefill", "publish", seconds, d.size_bytes)
                yield d
            completion = final.outputs[0]
            token = completion.token_ids[0]
            tracker = OutputTracker(self.engine.tokenizer, ids, req.sampling, spec.eos_token_ids)
            text, reason = tracker.add(token)
            yield PrefillDone(token, text, _logprob(completion, 0), len(groups), reason or FinishReason.UNSPECIFIED)
            final = "done"
        finally:
            self._leave()
            if final != "done" and save:  # cancelled or failed: nobody will fetch what was put
                self._later(self._release_owner(req.request_id))

    def _descriptors(self, request_id: str, num_tokens: int, params: dict | None) -> list[tuple[KVDescriptor, float]]:
        spec = self.engine.spec
        result = ((params or {}).get(PARAMS_KEY) or {}).get("save")
        if result is None:
            raise Internal("vLLM returned no KV descriptors for the prefill (connector not configured?)")
        if "error" in result:
            err = result["error"]
            metrics.KV_TRANSFER_FAILURES.labels(
                "prefill", "store_full" if err["code"] == "RESOURCE_EXHAUSTED" else "store").inc()
            raise error_for(err["code"], f"publishing KV: {err['message']}")
        out = []
        for i, g in enumerate(result["groups"]):
            layout = KVLayout(spec.fingerprint, spec.dtype, g["layer_start"], g["layer_end"], 0, num_tokens,
                              spec.num_kv_heads, spec.head_dim, result.get("layout", WIRE_LAYOUT))
            out.append((KVDescriptor(request_id, self.store.address, g["key"], g["location"], layout, g["size"],
                                     g["crc32"], g["lease_expiry_unix"], g["shm_name"], group_index=i,
                                     shm_offset=int(g.get("shm_offset", 0))),
                        float(g.get("seconds", 0.0))))
        return out

    async def _release_owner(self, owner: str) -> None:
        last = 0.0
        for at in LATE_RELEASES_S:
            await asyncio.sleep(at - last)
            last = at
            with contextlib.suppress(PdgrpcError):
                await self.store.release_owner(owner)


class VllmDecodeService(_VllmService):
    role = "decode"

    def __init__(self, node, engine, thread, store, limits: DecodeLimits) -> None:
        super().__init__(node, engine, thread, store)
        self.limits = limits

    def _check_start(self, start: DecodeStart) -> None:
        check_decode_start(start, self.engine.spec)

    def _check_descriptor(self, d: KVDescriptor, start: DecodeStart, seen: set[int]) -> None:
        check_descriptor(d, start, self.engine.spec, self.store.address, seen)  # vLLM nodes: host memory only

    async def _check_present(self, d: KVDescriptor) -> None:
        """NOT_FOUND now rather than a recompute later: the entry must still be in the store."""
        try:
            if d.shm_name and arenas.is_arena_name(d.shm_name):  # a region: the arena must be there
                shm.segment_size(d.shm_name)
                if not await self.store.exists(d.key):
                    raise NotFound(d.key)
            elif d.shm_name:
                shm.segment_size(d.shm_name)
            else:  # the gswarm location call answers 404 for an unknown key
                if not await self.store.exists(d.key):
                    raise NotFound(d.key)
        except NotFound:
            metrics.KV_TRANSFER_FAILURES.labels("decode", "not_found").inc()
            raise NotFound(f"KV key {d.key!r} not found in store {self.store.address}") from None

    async def decode(self, inputs: AsyncIterator[DecodeInput]) -> AsyncIterator[DecodeEvent]:
        start = await anext(inputs, None)
        if not isinstance(start, DecodeStart):
            raise InvalidArgument("the first decode message must be a DecodeStart")
        self._check_start(start)
        self._admit(self.limits.max_requests)
        groups: list[KVDescriptor] = []
        submitted = False
        try:
            seen: set[int] = set()
            async for msg in inputs:
                if isinstance(msg, KVDescriptor):
                    self._check_descriptor(msg, start, seen)
                    groups.append(msg)
                    await self._check_present(msg)
                elif isinstance(msg, DecodeKVDone):
                    done = msg
                    break
                else:
                    raise InvalidArgument("DecodeStart sent twice")
            else:
                raise InvalidArgument("decode stream ended before DecodeKVDone")
            if done.kv_groups != len(seen) or seen != set(range(len(seen))):
                raise InvalidArgument(f"DecodeKVDone says {done.kv_groups} KV groups; received {sorted(seen)}")
            if not 0 <= done.first_token_id < self.engine.spec.vocab_size:
                raise InvalidArgument(f"first token id {done.first_token_id} outside the vocabulary")
            ids = list(start.prompt_token_ids)
            tracker = OutputTracker(self.engine.tokenizer, ids, start.sampling, self.engine.spec.eos_token_ids)
            _, reason = tracker.add(done.first_token_id)  # prefill already sent its text
            if reason is not None:
                yield DecodeFinished(reason, 1)
                return
            groups.sort(key=lambda d: d.group_index)
            load = {"num_tokens": len(ids), "groups": [
                {"key": d.key, "shm_name": d.shm_name, "shm_offset": d.shm_offset, "size": d.size_bytes,
                 "crc32": d.crc32,
                 "layer_start": d.layout.layer_start, "layer_end": d.layout.layer_end} for d in groups]}
            sp = self.engine.sampling_params(start.sampling, start.sampling.max_tokens - 1,
                                             {PARAMS_KEY: {"load": load}})
            submitted = True
            t0 = time.monotonic()
            first_output = True
            held: TokenOut | None = None  # tokens kept back until there are stream_interval of them
            async for out in self.engine.llm.generate({"prompt_token_ids": ids + [done.first_token_id]}, sp,
                                                      f"{start.request_id}-d{next(_ids)}"):
                if first_output:
                    first_output = False
                    for ev in self._loaded(groups, len(ids), out.num_cached_tokens or 0, time.monotonic() - t0):
                        yield ev
                completion = out.outputs[0]
                for i, token in enumerate(completion.token_ids):
                    text, reason = tracker.add(token)
                    one = TokenOut.one(token, text, _logprob(completion, i))
                    held = one if held is None else held.merged(one)
                    if reason is not None:
                        yield held
                        yield DecodeFinished(reason, len(tracker.token_ids))
                        return  # closing the generator aborts the vLLM request if it is still running
                if held is not None and len(held.token_ids) >= self.limits.stream_interval:
                    yield held  # the tokens of one engine output travel together
                    held = None
            raise Internal("vLLM ended the decode before it finished")
        finally:
            self._leave()
            if not submitted:  # the connector never saw these entries: free them now
                for d in groups:
                    with contextlib.suppress(PdgrpcError):
                        await self.store.release(d.key)

    def _loaded(self, groups: list[KVDescriptor], prompt_tokens: int, cached: int, seconds: float):
        self._count_prompt(prompt_tokens + 1, cached)
        if cached >= prompt_tokens:
            for d in groups:
                metrics.observe_kv_transfer("decode", "fetch", seconds, d.size_bytes)
                yield KVLoaded(d.group_index, d.size_bytes)
            return
        metrics.KV_TRANSFER_FAILURES.labels("decode", "checksum").inc()
        log.warning("decode %s: the KV load failed (%d of %d prompt tokens cached); vLLM recomputed the prompt",
                    groups[0].request_id if groups else "?", cached, prompt_tokens)


class VllmColocatedService(_VllmService):
    """Both phases in one vLLM request: the baseline the disaggregated numbers are compared to."""

    role = "colocated"

    def __init__(self, prefill: VllmPrefillService) -> None:
        super().__init__(prefill.node, prefill.engine, prefill.thread, prefill.store)
        self.prefill_service = prefill
        self.limits = prefill.limits

    async def generate(self, req: PrefillRequest) -> AsyncIterator[ColocatedEvent]:
        spec = self.engine.spec
        if self.running >= self.limits.max_requests:
            raise ResourceExhausted(f"node {self.node} is full ({self.limits.max_requests} requests)",
                                    retry_after_s=0.5)
        ids = await self.prefill_service.validate(req)
        yield PrefillStarted(tuple(ids), spec)
        self._admit(self.limits.max_requests)
        try:
            tracker = OutputTracker(self.engine.tokenizer, ids, req.sampling, spec.eos_token_ids)
            sp = self.engine.sampling_params(req.sampling, req.sampling.max_tokens)
            first = True
            async for out in self.engine.llm.generate({"prompt_token_ids": ids}, sp, f"{req.request_id}-c{next(_ids)}"):
                completion = out.outputs[0]
                for i, token in enumerate(completion.token_ids):
                    text, reason = tracker.add(token)
                    if first:
                        first = False
                        self._count_prompt(len(ids), out.num_cached_tokens or 0)
                        yield PrefillDone(token, text, _logprob(completion, i), 0, reason or FinishReason.UNSPECIFIED)
                        if reason is not None:
                            yield DecodeFinished(reason, 1)
                            return
                        continue
                    yield TokenOut.one(token, text, _logprob(completion, i))
                    if reason is not None:
                        yield DecodeFinished(reason, len(tracker.token_ids))
                        return
            raise Internal("vLLM ended the request before it finished")
        finally:
            self._leave()
