"""Prefill and decode of one request in one process: the baseline every disaggregated run must match."""

from __future__ import annotations

from pdgrpc.engine.base import DecodeWork, Engine, KVGroup, PrefillWork, SampledToken
from pdgrpc.engine.output import OutputTracker
from pdgrpc.types import FinishReason, SamplingParams


def prefill_in_memory(engine: Engine, request_id: str, prompt_token_ids: list[int],
                      sampling: SamplingParams) -> tuple[list[KVGroup], SampledToken]:
    """One prompt's KV groups and first token."""
    groups: list[KVGroup] = []
    first: SampledToken | None = None
    for _, item in engine.prefill([PrefillWork(request_id, list(prompt_token_ids), sampling)]):
        if isinstance(item, KVGroup):
            groups.append(item)
        elif item is not None:  # None: a chunk boundary
            first = item
    assert first is not None
    return groups, first


def start_sequence(engine: Engine, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                   groups: list[KVGroup], first: SampledToken):
    """A decoding sequence holding the KV of ``prefill_in_memory`` (free it with ``free_sequence``)."""
    seq = engine.begin_sequence(DecodeWork(request_id, list(prompt_token_ids), sampling))
    try:
        for g in groups:
            engine.load_kv(seq, g)
        engine.start_decoding(seq, first.token_id)
    except BaseException:
        engine.free_sequence(seq)
        raise
    return seq


def generate_colocated(engine: Engine, prompt_token_ids: list[int],
                       sampling: SamplingParams) -> tuple[list[int], str, FinishReason]:
    """Token ids, text and finish reason of one request, KV handed over in memory."""
    tracker = OutputTracker(engine.tokenizer, prompt_token_ids, sampling, engine.spec.eos_token_ids)
    groups, first = prefill_in_memory(engine, "colocated", prompt_token_ids, sampling)
    text, reason = tracker.add(first.token_id)
    if reason is not None:
        return tracker.token_ids, text, reason
    seq = start_sequence(engine, "colocated", prompt_token_ids, sampling, groups, first)
    try:
        while reason is None:
            (tok,) = engine.decode_step([seq])
            delta, reason = tracker.add(tok.token_id)
            text += delta
    finally:
        engine.free_sequence(seq)
    return tracker.token_ids, text, reason
