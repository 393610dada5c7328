"""Protobuf <-> domain objects. With the servicers, the only code that touches *_pb2 messages.

``*_from_pb`` functions also reject what protobuf itself accepts but pdgrpc does not: unknown
fields (a client built against another schema) and out-of-range enum values.
"""

from __future__ import annotations

from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from pdgrpc import types as t
from pdgrpc.errors import InvalidArgument
from pdgrpc.v1 import colocated_pb2 as col_pb
from pdgrpc.v1 import common_pb2 as c_pb
from pdgrpc.v1 import coordinator_pb2 as co_pb
from pdgrpc.v1 import decode_pb2 as d_pb
from pdgrpc.v1 import prefill_pb2 as p_pb

_FINISH_TO_PB = {
    t.FinishReason.UNSPECIFIED: c_pb.FINISH_REASON_UNSPECIFIED,
    t.FinishReason.LENGTH: c_pb.FINISH_REASON_LENGTH,
    t.FinishReason.EOS: c_pb.FINISH_REASON_EOS,
    t.FinishReason.STOP: c_pb.FINISH_REASON_STOP,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_LOCATION_TO_PB = {
    "dram": c_pb.KV_LOCATION_DRAM, "pinned_dram": c_pb.KV_LOCATION_PINNED_DRAM,
    "device": c_pb.KV_LOCATION_DEVICE, "disk": c_pb.KV_LOCATION_DISK,
}
_LOCATION_FROM_PB = {v: k for k, v in _LOCATION_TO_PB.items()}
_ROLE_TO_PB = {t.Role.PREFILL: c_pb.NODE_ROLE_PREFILL, t.Role.DECODE: c_pb.NODE_ROLE_DECODE,
               t.Role.COLOCATED: c_pb.NODE_ROLE_COLOCATED}
_ROLE_FROM_PB = {v: k for k, v in _ROLE_TO_PB.items()}
_HEALTH_TO_PB = {
    t.NodeHealth.UNSPECIFIED: co_pb.NODE_HEALTH_UNSPECIFIED, t.NodeHealth.SERVING: co_pb.NODE_HEALTH_SERVING,
    t.NodeHealth.NOT_SERVING: co_pb.NODE_HEALTH_NOT_SERVING, t.NodeHealth.UNREACHABLE: co_pb.NODE_HEALTH_UNREACHABLE,
}
_HEALTH_FROM_PB = {v: k for k, v in _HEALTH_TO_PB.items()}


class MalformedMessage:
    """Stands in for a request whose bytes did not parse (see grpcutil.RejectMalformed)."""

    def __init__(self, error: str) -> None:
        self.error = error


def reject_unknown_fields(msg: Message, where: str) -> None:
    """Unknown fields mean the caller speaks another schema: refuse rather than guess."""
    if isinstance(msg, MalformedMessage):
        raise InvalidArgument(f"{where}: malformed protobuf message ({msg.error})")
    if len(UnknownFieldSet(msg)):
        raise InvalidArgument(f"{where}: unknown fields in message {msg.DESCRIPTOR.name}")
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                reject_unknown_fields(item, f"{where}.{field.name}[{i}]")
        else:
            reject_unknown_fields(value, f"{where}.{field.name}")


# ---- common ----------------------------------------------------------------------------------

def sampling_to_pb(s: t.SamplingParams) -> c_pb.SamplingParams:
    return c_pb.SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        seed=s.seed or 0, has_seed=s.seed is not None, stop_token_ids=s.stop_token_ids, stop=s.stop,
        ignore_eos=s.ignore_eos, logprobs=s.logprobs,
    )


def sampling_from_pb(m: c_pb.SamplingParams) -> t.SamplingParams:
    return t.SamplingParams(
        max_tokens=m.max_tokens, temperature=m.temperature, top_p=m.top_p if m.top_p != 0 else 1.0,
        top_k=m.top_k, seed=m.seed if m.has_seed else None, stop_token_ids=tuple(m.stop_token_ids),
        stop=tuple(m.stop), ignore_eos=m.ignore_eos, logprobs=m.logprobs,
    )


def prompt_to_pb(p: t.Prompt) -> c_pb.Prompt:
    if p.text is not None:
        return c_pb.Prompt(text=p.text)
    if p.chat is not None:
        return c_pb.Prompt(chat=c_pb.ChatMessages(
            messages=[c_pb.ChatMessage(role=m.role, content=m.content) for m in p.chat]))
    return c_pb.Prompt(token_ids=c_pb.TokenIds(ids=list(p.token_ids or ())))


def prompt_from_pb(m: c_pb.Prompt) -> t.Prompt:
    kind = m.WhichOneof("kind")
    if kind == "text":
        return t.Prompt(text=m.text)
    if kind == "chat":
        return t.Prompt(chat=tuple(t.ChatMessage(x.role, x.content) for x in m.chat.messages))
    if kind == "token_ids":
        return t.Prompt(token_ids=tuple(m.token_ids.ids))
    raise InvalidArgument("prompt: exactly one of text, chat or token_ids must be set")


def model_to_pb(s: t.ModelSpec) -> c_pb.ModelInfo:
    return c_pb.ModelInfo(
        name=s.name, fingerprint=s.fingerprint, max_model_len=s.max_model_len, vocab_size=s.vocab_size,
        num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, dtype=s.dtype, engine=s.engine,
    )


def model_from_pb(m: c_pb.ModelInfo) -> t.ModelSpec:
    return t.ModelSpec(
        name=m.name, fingerprint=m.fingerprint, num_layers=m.num_layers, num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim, dtype=m.dtype, vocab_size=m.vocab_size, max_model_len=m.max_model_len, engine=m.engine,
    )


def descriptor_to_pb(d: t.KVDescriptor) -> c_pb.KVDescriptor:
    lay = d.layout
    return c_pb.KVDescriptor(
        request_id=d.request_id, store_address=d.store_address, key=d.key,
        location=_LOCATION_TO_PB[d.location], device_index=d.device_index,
        layout=c_pb.KVLayout(
            model_fingerprint=lay.model_fingerprint, dtype=lay.dtype, layer_start=lay.layer_start,
            layer_end=lay.layer_end, token_start=lay.token_start, token_end=lay.token_end,
            num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, block_layout=lay.block_layout,
        ),
        size_bytes=d.size_bytes, crc32=d.crc32, lease_expiry_unix=d.lease_expiry_unix, shm_name=d.shm_name,
        group_index=d.group_index, shm_offset=d.shm_offset,
        transfer_endpoint=d.transfer_endpoint, transfer_address=d.transfer_address,
    )


def descriptor_from_pb(m: c_pb.KVDescriptor) -> t.KVDescriptor:
    if m.location not in _LOCATION_FROM_PB:
        raise InvalidArgument(f"descriptor {m.key!r}: location {m.location} is not a known KVLocation")
    lay = m.layout
    return t.KVDescriptor(
        request_id=m.request_id, store_address=m.store_address, key=m.key, location=_LOCATION_FROM_PB[m.location],
        layout=t.KVLayout(
            model_fingerprint=lay.model_fingerprint, dtype=lay.dtype, layer_start=lay.layer_start,
            layer_end=lay.layer_end, token_start=lay.token_start, token_end=lay.token_end,
            num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, block_layout=lay.block_layout,
        ),
        size_bytes=m.size_bytes, crc32=m.crc32, lease_expiry_unix=m.lease_expiry_unix, shm_name=m.shm_name,
        device_index=m.device_index, group_index=m.group_index, shm_offset=m.shm_offset,
        transfer_endpoint=m.transfer_endpoint, transfer_address=m.transfer_address,
    )


def node_info_to_pb(n: t.NodeInfo) -> c_pb.NodeInfo:
    return c_pb.NodeInfo(
        name=n.name, role=_ROLE_TO_PB[n.role], model=model_to_pb(n.model), running_requests=n.running_requests,
        queued_requests=n.queued_requests, max_requests=n.max_requests, batch_invariant=n.batch_invariant,
        engine_detail=n.engine_detail, kv_cache_bytes=n.kv_cache_bytes,
    )


def node_info_from_pb(m: c_pb.NodeInfo) -> t.NodeInfo:
    return t.NodeInfo(
        name=m.name, role=_ROLE_FROM_PB.get(m.role, t.Role.PREFILL), model=model_from_pb(m.model),
        running_requests=m.running_requests, queued_requests=m.queued_requests, max_requests=m.max_requests,
        batch_invariant=m.batch_invariant if m.HasField("batch_invariant") else None, engine_detail=m.engine_detail,
        kv_cache_bytes=m.kv_cache_bytes,
    )


def node_info_request_pb() -> c_pb.NodeInfoRequest:
    return c_pb.NodeInfoRequest()


# ---- prefill ---------------------------------------------------------------------------------

def prefill_request_to_pb(r: t.PrefillRequest) -> p_pb.PrefillRequest:
    return p_pb.PrefillRequest(request_id=r.request_id, prompt=prompt_to_pb(r.prompt),
                               sampling=sampling_to_pb(r.sampling), kv_lease_seconds=r.kv_lease_seconds)


def prefill_request_from_pb(m: p_pb.PrefillRequest) -> t.PrefillRequest:
    reject_unknown_fields(m, "PrefillRequest")
    return t.PrefillRequest(request_id=m.request_id, prompt=prompt_from_pb(m.prompt),
                            sampling=sampling_from_pb(m.sampling), kv_lease_seconds=m.kv_lease_seconds)


def prefill_event_to_pb(e: t.PrefillEvent) -> p_pb.PrefillResponse:
    if isinstance(e, t.PrefillStarted):
        return p_pb.PrefillResponse(started=p_pb.PrefillStarted(
            prompt_token_ids=e.prompt_token_ids, model=model_to_pb(e.model)))
    if isinstance(e, t.KVDescriptor):
        return p_pb.PrefillResponse(descriptor=descriptor_to_pb(e))
    return p_pb.PrefillResponse(done=p_pb.PrefillDone(
        first_token_id=e.first_token_id, first_token_text=e.first_token_text,
        first_token_logprob=e.first_token_logprob, kv_groups=e.kv_groups,
        finish_reason=_FINISH_TO_PB[e.finish_reason]))


def prefill_event_from_pb(m: p_pb.PrefillResponse) -> t.PrefillEvent:
    kind = m.WhichOneof("event")
    if kind == "started":
        return t.PrefillStarted(tuple(m.started.prompt_token_ids), model_from_pb(m.started.model))
    if kind == "descriptor":
        return descriptor_from_pb(m.descriptor)
    if kind == "done":
        d = m.done
        return t.PrefillDone(d.first_token_id, d.first_token_text, d.first_token_logprob, d.kv_groups,
                             _FINISH_FROM_PB.get(d.finish_reason, t.FinishReason.UNSPECIFIED))
    raise InvalidArgument("prefill response has no event")


# ---- decode ----------------------------------------------------------------------------------

def decode_input_to_pb(e: t.DecodeInput) -> d_pb.DecodeRequest:
    if isinstance(e, t.DecodeStart):
        return d_pb.DecodeRequest(start=d_pb.DecodeStart(
            request_id=e.request_id, prompt_token_ids=e.prompt_token_ids, sampling=sampling_to_pb(e.sampling),
            model_fingerprint=e.model_fingerprint))
    if isinstance(e, t.KVDescriptor):
        return d_pb.DecodeRequest(descriptor=descriptor_to_pb(e))
    return d_pb.DecodeRequest(kv_done=d_pb.DecodeKVDone(first_token_id=e.first_token_id, kv_groups=e.kv_groups))


def decode_input_from_pb(m: d_pb.DecodeRequest) -> t.DecodeInput:
    reject_unknown_fields(m, "DecodeRequest")
    kind = m.WhichOneof("event")
    if kind == "start":
        s = m.start
        return t.DecodeStart(s.request_id, tuple(s.prompt_token_ids), sampling_from_pb(s.sampling),
                             s.model_fingerprint)
    if kind == "descriptor":
        return descriptor_from_pb(m.descriptor)
    if kind == "kv_done":
        return t.DecodeKVDone(m.kv_done.first_token_id, m.kv_done.kv_groups)
    raise InvalidArgument("decode request message has no event set")


def decode_event_to_pb(e: t.DecodeEvent) -> d_pb.DecodeResponse:
    if isinstance(e, t.KVLoaded):
        return d_pb.DecodeResponse(kv_loaded=d_pb.KVLoaded(group_index=e.group_index, size_bytes=e.size_bytes))
    if isinstance(e, t.TokenOut):
        return d_pb.DecodeResponse(tokens=_tokens_to_pb(e))
    return d_pb.DecodeResponse(finished=d_pb.DecodeFinished(
        finish_reason=_FINISH_TO_PB[e.finish_reason], completion_tokens=e.completion_tokens))


def decode_event_from_pb(m: d_pb.DecodeResponse) -> t.DecodeEvent:
    kind = m.WhichOneof("event")
    if kind == "kv_loaded":
        return t.KVLoaded(m.kv_loaded.group_index, m.kv_loaded.size_bytes)
    if kind == "token":
        return t.TokenOut.one(m.token.token_id, m.token.text, m.token.logprob)
    if kind == "tokens":
        return _tokens_from_pb(m.tokens)
    if kind == "finished":
        return t.DecodeFinished(_FINISH_FROM_PB.get(m.finished.finish_reason, t.FinishReason.UNSPECIFIED),
                                m.finished.completion_tokens)
    raise InvalidArgument("decode response has no event")


def _tokens_to_pb(e: t.TokenOut) -> d_pb.DecodeTokens:
    return d_pb.DecodeTokens(token_ids=e.token_ids, text=e.text, logprobs=e.logprobs)


def _tokens_from_pb(m: d_pb.DecodeTokens) -> t.TokenOut:
    if not m.token_ids:
        raise InvalidArgument("DecodeTokens without a token")
    if m.logprobs and len(m.logprobs) != len(m.token_ids):
        raise InvalidArgument(f"DecodeTokens: {len(m.logprobs)} logprobs for {len(m.token_ids)} tokens")
    return t.TokenOut(tuple(m.token_ids), m.text, tuple(m.logprobs))


# ---- colocated -------------------------------------------------------------------------------

def colocated_event_to_pb(e: t.ColocatedEvent) -> col_pb.ColocatedResponse:
    if isinstance(e, t.PrefillStarted):
        return col_pb.ColocatedResponse(started=prefill_event_to_pb(e).started)
    if isinstance(e, t.PrefillDone):
        return col_pb.ColocatedResponse(first=prefill_event_to_pb(e).done)
    if isinstance(e, t.TokenOut):
        return col_pb.ColocatedResponse(tokens=_tokens_to_pb(e))
    return col_pb.ColocatedResponse(finished=decode_event_to_pb(e).finished)


def colocated_event_from_pb(m: col_pb.ColocatedResponse) -> t.ColocatedEvent:
    kind = m.WhichOneof("event")
    if kind == "started":
        return prefill_event_from_pb(p_pb.PrefillResponse(started=m.started))
    if kind == "first":
        return prefill_event_from_pb(p_pb.PrefillResponse(done=m.first))
    if kind == "token":
        return decode_event_from_pb(d_pb.DecodeResponse(token=m.token))
    if kind == "tokens":
        return _tokens_from_pb(m.tokens)
    if kind == "finished":
        return decode_event_from_pb(d_pb.DecodeResponse(finished=m.finished))
    raise InvalidArgument("colocated response has no event")


# ---- coordinator -----------------------------------------------------------------------------

def generate_request_to_pb(r: t.GenerateRequest) -> co_pb.GenerateRequest:
    return co_pb.GenerateRequest(prompt=prompt_to_pb(r.prompt), sampling=sampling_to_pb(r.sampling),
                                 request_id=r.request_id)


def generate_request_from_pb(m: co_pb.GenerateRequest) -> t.GenerateRequest:
    reject_unknown_fields(m, "GenerateRequest")
    return t.GenerateRequest(prompt_from_pb(m.prompt), sampling_from_pb(m.sampling), m.request_id)


def generate_event_to_pb(e: t.GenerateEvent) -> co_pb.GenerateResponse:
    if isinstance(e, t.GenerateDelta):
        return co_pb.GenerateResponse(delta=co_pb.GenerateDelta(text=e.text, token_ids=e.token_ids,
                                                                logprobs=e.logprobs))
    tm = e.timings
    return co_pb.GenerateResponse(final=co_pb.GenerateFinal(
        request_id=e.request_id, finish_reason=_FINISH_TO_PB[e.finish_reason],
        usage=c_pb.Usage(prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens),
        timings=c_pb.Timings(
            queue_seconds=tm.queue_seconds, prefill_seconds=tm.prefill_seconds,
            kv_transfer_seconds=tm.kv_transfer_seconds, first_token_seconds=tm.first_token_seconds,
            total_seconds=tm.total_seconds,
            kv_groups_loaded_before_prefill_done=tm.kv_groups_loaded_before_prefill_done,
            kv_groups=tm.kv_groups),
        prefill_node=e.prefill_node, decode_node=e.decode_node))


def generate_event_from_pb(m: co_pb.GenerateResponse) -> t.GenerateEvent:
    kind = m.WhichOneof("event")
    if kind == "delta":
        return t.GenerateDelta(m.delta.text, tuple(m.delta.token_ids), tuple(m.delta.logprobs))
    if kind == "final":
        f = m.final
        tm = f.timings
        return t.GenerateFinal(
            request_id=f.request_id, finish_reason=_FINISH_FROM_PB.get(f.finish_reason, t.FinishReason.UNSPECIFIED),
            prompt_tokens=f.usage.prompt_tokens, completion_tokens=f.usage.completion_tokens,
            timings=t.Timings(tm.queue_seconds, tm.prefill_seconds, tm.kv_transfer_seconds, tm.first_token_seconds,
                              tm.total_seconds, tm.kv_groups_loaded_before_prefill_done, tm.kv_groups),
            prefill_node=f.prefill_node, decode_node=f.decode_node)
    raise InvalidArgument("generate response has no event")


def cluster_status_request_pb() -> co_pb.ClusterStatusRequest:
    return co_pb.ClusterStatusRequest()


def cluster_status_to_pb(s: t.ClusterStatus) -> co_pb.ClusterStatus:
    return co_pb.ClusterStatus(
        nodes=[co_pb.NodeStatus(
            name=n.name, role=_ROLE_TO_PB[n.role], address=n.address, health=_HEALTH_TO_PB[n.health],
            inflight_requests=n.inflight_requests, info=node_info_to_pb(n.info) if n.info else None,
            last_seen_seconds_ago=n.last_seen_seconds_ago, host=n.host, store_address=n.store_address)
            for n in s.nodes],
        store_address=s.store_address, inflight_requests=s.inflight_requests)


def cluster_status_from_pb(m: co_pb.ClusterStatus) -> t.ClusterStatus:
    return t.ClusterStatus(
        nodes=tuple(t.NodeStatus(
            name=n.name, role=_ROLE_FROM_PB.get(n.role, t.Role.PREFILL), address=n.address,
            health=_HEALTH_FROM_PB.get(n.health, t.NodeHealth.UNSPECIFIED), inflight_requests=n.inflight_requests,
            info=node_info_from_pb(n.info) if n.HasField("info") else None,
            last_seen_seconds_ago=n.last_seen_seconds_ago, host=n.host, store_address=n.store_address)
            for n in m.nodes),
        store_address=m.store_address, inflight_requests=m.inflight_requests)
