"""The engine interface shared by prefill and decode nodes.

An engine owns the model and its tokenizer; nodes own scheduling, the store and gRPC. All engine
methods are synchronous and are called from one worker thread per node, so an engine needs no
locks and may block on compute.

Protocol, in call order:

Prefill node, per batch of requests (``PrefillScheduler`` forms the batch):
  1. ``tokenize(prompt)``                     -> prompt token ids (node checks limits)
  2. ``prefill(works)``                       -> iterator of ``(index, KVGroup)`` as each layer group
                                                 is computed, then ``(index, SampledToken)`` per work
     The node publishes each KVGroup to the store while the engine computes the next one.
     ``work.cancelled`` is checked between groups; a cancelled work yields nothing more.

Decode node, per request (``DecodeScheduler`` runs the continuous batch):
  1. ``begin_sequence(work)``                 -> an engine-owned sequence state
  2. ``load_kv(seq, group)``                  once per KV group, any order, as descriptors arrive;
                                                 ``group.data`` may be a read-only view of shared
                                                 memory the writer reuses after the call: copy it
  3. ``start_decoding(seq, first_token)``     after the last group: cache complete
  4. ``decode_step(seqs)``                    -> one SampledToken per sequence; sequences join and
                                                 leave the batch between steps
  5. ``free_sequence(seq)``                   on finish, cancel or error (always called)

Colocated mode runs both halves in one process with the KV handed over in memory.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pdgrpc.types import ModelSpec, Prompt, SamplingParams


@dataclass(frozen=True)
class EngineOptions:
    """What a node knows about the engine it should build (validated by the engine; the torch-only
    fields by ``torch_options.check_torch_options``)."""

    name: str = "mock"
    model: str = ""          # model folder or name; engine-specific default when empty
    device: str = "cpu"
    dtype: str = ""          # engine default when empty
    threads: int = 0         # 0: one per CPU the process may run on
    max_batch: int = 32      # most sequences in one decode step (the node's max_batch): kernels are checked up to it
    mock_prefill_cost_per_token_s: float = 0.0
    mock_decode_cost_per_step_s: float = 0.0
    mock_layers_per_group: int = 6
    mock_profile: str = ""         # mock: a cost model, a shipped name or a JSON path (engine.mock_profile)
    prefill_chunk_tokens: int = 0  # torch: prompts longer than this prefill in chunks of it (0: off)
    linear_kernel: str = ""        # torch: "" (chosen per shape at load), "onednn" or "torch" (forced)
    mkl_dispatch: str = ""         # torch on x86: "features" (MKL's kernels by CPU features; the default) or "vendor"


@dataclass(frozen=True)
class KVGroup:
    """KV of layers [layer_start, layer_end) for tokens [token_start, token_end).

    ``data`` is laid out as [layer][k|v][kv_head][token][dim] in the model's KV dtype.
    """

    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float = 0.0


@dataclass
class PrefillWork:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class DecodeWork:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams


class Tokenizer(abc.ABC):
    """Text <-> token ids for one model."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, token_ids: list[int]) -> str: ...


class Engine(abc.ABC):
    """A model that can prefill, decode, or both (colocated)."""

    spec: ModelSpec
    tokenizer: Tokenizer
    # Whether prefill() calls ``more`` between chunks of a long prompt (chunked prefill), so a node
    # hands it the prompts that arrived meanwhile instead of holding them for the next batch.
    prefill_joins: bool = False
    # Whether a sequence's tokens were checked at load not to depend on the rest of its batch: True
    # or False where the engine checks it (the torch engine, ``torch_kernel_plan``), None where it
    # does not. ``engine_detail`` says what was checked and chosen, for the log and NodeInfo.
    batch_invariant: bool | None = None
    engine_detail: str = ""

    def tokenize(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.chat is not None:
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in prompt.chat])
        assert prompt.text is not None
        return self.tokenizer.encode(prompt.text)

    def warm_up(self) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Run once at start so the first request does not pay one-off costs."""

    @abc.abstractmethod
    def prefill(self, works: list[PrefillWork],
                more: Callable[[], list[PrefillWork]] | None = None) -> Iterator[tuple[int, KVGroup | SampledToken]]:
        """Yield (index into works, KVGroup or the first SampledToken) for every work. An engine with
        ``prefill_joins`` also yields (index, None) between two chunks of a prompt (a point where the
        node may run other engine calls, such as a colocated node's decode step), calls ``more()``
        there and prefills what it returns too (indexes continuing after ``works``); others never
        call it."""

    @abc.abstractmethod
    def begin_sequence(self, work: DecodeWork) -> Any: ...

    @abc.abstractmethod
    def load_kv(self, seq: Any, group: KVGroup) -> None: ...

    def kv_destination(self, seq: Any, layers: tuple[int, int], tokens: tuple[int, int],
                       nbytes: int) -> memoryview | None:
        """A writable buffer of exactly ``nbytes`` that holds the sequence's KV for this group once the
        caller has filled it (then ``kv_written``), or None: fetch the bytes and ``load_kv`` them. Lets a
        decode node copy and checksum in one pass, off the engine's thread. Called on the node's
        event loop, like ``kv_written``."""
        return None

    def kv_written(self, seq: Any, layers: tuple[int, int], tokens: tuple[int, int], ok: bool) -> None:
        """The buffer from ``kv_destination`` was filled (``ok``) or the fill failed."""
        raise NotImplementedError

    @abc.abstractmethod
    def start_decoding(self, seq: Any, first_token_id: int) -> None: ...

    @abc.abstractmethod
    def decode_step(self, seqs: list[Any]) -> list[SampledToken]: ...

    @abc.abstractmethod
    def free_sequence(self, seq: Any) -> None: ...
