"""Continuous batching for decode: sequences join and leave between engine steps.

Each step runs ``engine.decode_step`` on every active sequence (up to ``max_batch``) in the
engine thread, then hands each sequence its token. A sequence that finished, or whose caller went
away, is out of the next step; new sequences are in it as soon as they are added.

A sequence is added with its first token (prefill's) and started (``engine.start_decoding``) in
the same engine-thread call as its first step. Started by a call of its own, it waited behind the
running step, missed the step submitted meanwhile and got its second token a step later: the gap
between the first and the second token was ~2 steps (p50 ~90 ms against ~40 ms between later tokens
under mixed load, and most of the ITL p99).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pdgrpc import metrics
from pdgrpc.engine.base import Engine
from pdgrpc.engine.output import OutputTracker
from pdgrpc.errors import Internal, PdgrpcError
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.types import TokenOut

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ActiveSequence:
    seq: Any
    tracker: OutputTracker
    first_token_id: int | None = None  # not started yet: start_decoding with it before its first step
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # (TokenOut, FinishReason | None) or an error


class DecodeScheduler:
    def __init__(self, node: str, engine: Engine, thread: EngineThread, max_batch: int) -> None:
        self.node = node
        self.engine = engine
        self.thread = thread
        self.max_batch = max_batch
        self._active: list[ActiveSequence] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="decode-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    def add(self, seq: Any, tracker: OutputTracker, first_token_id: int) -> ActiveSequence:
        """Join the next step; the sequence is started (``start_decoding(seq, first_token_id)``)
        in that step's engine-thread call, just before the step."""
        entry = ActiveSequence(seq, tracker, first_token_id)
        self._active.append(entry)
        self._wakeup.set()
        return entry

    def remove(self, entry: ActiveSequence) -> None:
        if entry in self._active:
            self._active.remove(entry)

    async def _run(self) -> None:
        while True:
            if not self._active:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._active[: self.max_batch]
            metrics.NODE_BATCH_SIZE.labels("decode", self.node).observe(len(batch))
            t0 = time.monotonic()
            try:
                failed, tokens = await self.thread.call(self._start_and_step, batch)
            except Exception as exc:
                log.exception("decode step failed")
                err = _as_status(exc, "decode engine failed")
                for e in batch:
                    self.remove(e)
                    e.out.put_nowait(err)
                continue
            for e, exc in failed.items():  # could not start: that sequence ends with its error
                self.remove(e)
                e.out.put_nowait(exc)
            batch = [e for e in batch if e not in failed]
            metrics.NODE_STEP_TIME.labels("decode", self.node).observe(time.monotonic() - t0)
            # metrics: sequences left out of this step by max_batch; one more token of KV per sequence
            metrics.NODE_QUEUE_DEPTH.labels("decode", self.node).set(max(len(self._active) - self.max_batch, 0))
            metrics.KV_HELD.grow("decode", self.node, [e.seq for e in batch if e in self._active],
                                 self.engine.spec.kv_bytes(self.engine.spec.num_layers, 1))
            for e, tok in zip(batch, tokens):
                if e not in self._active:  # its caller left during the step
                    continue
                text, reason = e.tracker.add(tok.token_id)
                e.out.put_nowait((TokenOut.one(tok.token_id, text, tok.logprob), reason))
                if reason is not None:
                    self.remove(e)
            # Let request tasks run (send tokens, add sequences) between steps.
            await asyncio.sleep(0)

    def _start_and_step(self, batch: list[ActiveSequence]) -> tuple[dict[ActiveSequence, BaseException], list]:
        """In the engine thread: start the batch's new sequences, then one step of those that could
        be. Returns the ones that could not start (with their error) and the step's tokens."""
        failed: dict[ActiveSequence, BaseException] = {}
        for e in batch:
            if e.first_token_id is not None:
                first, e.first_token_id = e.first_token_id, None
                try:
                    self.engine.start_decoding(e.seq, first)
                except Exception as exc:  # noqa: BLE001 -- that sequence's error, reported to it alone
                    failed[e] = _as_status(exc, "decode engine failed to start a sequence")
        ready = [e.seq for e in batch if e not in failed]
        return failed, (self.engine.decode_step(ready) if ready else [])


def _as_status(exc: Exception, what: str) -> PdgrpcError:
    """A domain error as it is (its own status); anything else is the engine's fault: INTERNAL."""
    return exc if isinstance(exc, PdgrpcError) else Internal(f"{what}: {type(exc).__name__}: {exc}")
