"""Prefill and decode of one request in one process: the baseline every disaggregated run must match."""

from __future__ import annotations

from pdgrpc.engine.base import DecodeWork, Engine, KVGroup, PrefillWork, SampledToken
from pdgrpc.engine.output import OutputTracker
from pdgrpc.types import FinishReason, SamplingParams


def generate_colocated(engine: Engine, prompt_token_ids: list[int],
                       sampling: SamplingParams) -> tuple[list[int], str, FinishReason]:
    """Token ids, text and finish reason of one request, KV handed over in memory."""
    tracker = OutputTracker(engine.tokenizer, prompt_token_ids, sampling, engine.spec.eos_token_ids)
    groups: list[KVGroup] = []
    first: SampledToken | None = None
    for _, item in engine.prefill([PrefillWork("colocated", list(prompt_token_ids), sampling)]):
        if isinstance(item, KVGroup):
            groups.append(item)
        elif item is not None:  # None: a chunk boundary
            first = item
    assert first is not None
    text, reason = tracker.add(first.token_id)
    if reason is not None:
        return tracker.token_ids, text, reason
    seq = engine.begin_sequence(DecodeWork("colocated", list(prompt_token_ids), sampling))
    try:
        for g in groups:
            engine.load_kv(seq, g)
        engine.start_decoding(seq, first.token_id)
        while reason is None:
            (tok,) = engine.decode_step([seq])
            delta, reason = tracker.add(tok.token_id)
            text += delta
    finally:
        engine.free_sequence(seq)
    return tracker.token_ids, text, reason
