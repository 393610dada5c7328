"""Turns sampled tokens into text deltas and decides when a sequence ends.

One ``OutputTracker`` follows one sequence. Prefill uses it for the first token, decode replays the
first token through its own tracker and continues, and the colocated path uses it for all tokens,
so the three agree on text and on where generation stops.
"""

from __future__ import annotations

from pdgrpc.engine.base import Tokenizer
from pdgrpc.engine.detok import IncrementalDetokenizer, StopChecker
from pdgrpc.types import FinishReason, SamplingParams


class OutputTracker:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], sampling: SamplingParams,
                 eos_token_ids: tuple[int, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer.decode, prompt_token_ids)
        self._stop = StopChecker(sampling.stop)
        self._sampling = sampling
        self._stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            self._stop_ids.update(eos_token_ids)
        self.token_ids: list[int] = []
        self.finish_reason: FinishReason | None = None

    def add(self, token_id: int) -> tuple[str, FinishReason | None]:
        """Record one token; return the text it adds and the finish reason if it ends the sequence."""
        if self.finish_reason is not None:
            raise RuntimeError("sequence already finished")
        self.token_ids.append(token_id)
        delta, stopped = self._stop.feed(self._detok.add(token_id))
        if stopped:
            self.finish_reason = FinishReason.STOP
        elif token_id in self._stop_ids:
            self.finish_reason = FinishReason.EOS
        elif len(self.token_ids) >= self._sampling.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        if self.finish_reason is not None and self.finish_reason is not FinishReason.STOP:
            delta += self._stop.flush()
        return delta, self.finish_reason
