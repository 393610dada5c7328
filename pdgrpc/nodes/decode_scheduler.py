"""Continuous batching for decode: sequences join and leave between engine steps.

Each step runs ``engine.decode_step`` on every active sequence (up to ``max_batch``) in the
engine thread, then hands each sequence its token. A sequence that finished, or whose caller went
away, is out of the next step; new sequences are in it as soon as they are added.
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

    def add(self, seq: Any, tracker: OutputTracker) -> ActiveSequence:
        entry = ActiveSequence(seq, tracker)
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
                tokens = await self.thread.call(self.engine.decode_step, [e.seq for e in batch])
            except Exception as exc:
                log.exception("decode step failed")
                err = exc if isinstance(exc, PdgrpcError) else Internal(f"decode engine failed: {exc}")
                for e in batch:
                    self.remove(e)
                    e.out.put_nowait(err)
                continue
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
