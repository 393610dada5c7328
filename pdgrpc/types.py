"""Domain objects: what the servicers translate protobuf into, and everything else works on."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field

from pdgrpc.errors import InvalidArgument

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


class FinishReason(enum.Enum):
    UNSPECIFIED = "unspecified"
    LENGTH = "length"
    EOS = "eos"
    STOP = "stop"


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


LOCATIONS = ("dram", "pinned_dram", "device", "disk")


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen; zero values mean greedy with no limits."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False

    def validate(self, max_model_len: int | None = None, vocab_size: int | None = None) -> None:
        """Raise InvalidArgument naming the first bad field."""
        if self.max_tokens <= 0:
            raise InvalidArgument(f"max_tokens must be >= 1, got {self.max_tokens}")
        if max_model_len is not None and self.max_tokens > max_model_len:
            raise InvalidArgument(f"max_tokens {self.max_tokens} exceeds the model limit {max_model_len}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be finite and >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise InvalidArgument(
                f"stop: at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_STRING_CHARS} chars")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS}")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidArgument(f"stop_token_ids must be in [0, {vocab_size})")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, chat or token_ids is set."""

    text: str | None = None
    chat: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None

    def validate(self) -> None:
        given = [x for x in (self.text, self.chat, self.token_ids) if x is not None]
        if len(given) != 1:
            raise InvalidArgument("prompt: exactly one of text, chat or token_ids must be set")
        if self.text is not None and not self.text:
            raise InvalidArgument("prompt: text is empty")
        if self.chat is not None:
            if not self.chat:
                raise InvalidArgument("prompt: chat has no messages")
            for i, m in enumerate(self.chat):
                if m.role not in CHAT_ROLES:
                    raise InvalidArgument(f"prompt: chat message {i} has role {m.role!r}; expected one of {CHAT_ROLES}")
        if self.token_ids is not None and not self.token_ids:
            raise InvalidArgument("prompt: token_ids is empty")


@dataclass(frozen=True)
class ModelSpec:
    """A served model: identity, limits and KV geometry."""

    name: str
    fingerprint: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    max_model_len: int
    engine: str
    eos_token_ids: tuple[int, ...] = ()

    @property
    def dtype_size(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def kv_bytes(self, layers: int, tokens: int) -> int:
        """Bytes of K and V for `layers` layers and `tokens` tokens."""
        return layers * 2 * self.num_kv_heads * tokens * self.head_dim * self.dtype_size


@dataclass(frozen=True)
class KVLayout:
    model_fingerprint: str
    dtype: str
    layer_start: int
    layer_end: int
    token_start: int
    token_end: int
    num_kv_heads: int
    head_dim: int
    block_layout: str = "layer,kv,head,token,dim"


@dataclass(frozen=True)
class KVDescriptor:
    """A published KV group: where it is, what it is, how to check it."""

    request_id: str
    store_address: str
    key: str
    location: str
    layout: KVLayout
    size_bytes: int
    crc32: int
    lease_expiry_unix: float
    shm_name: str = ""
    device_index: int = 0
    group_index: int = 0
    shm_offset: int = 0  # where in shm_name when that is an arena
    transfer_endpoint: str = ""  # "ip:rpc_port" of the owning store's transfer engine (pdgrpc.transfer.mooncake)
    transfer_address: int = 0  # the bytes' address in that store's registered memory

    def replace(self, **changes) -> "KVDescriptor":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    role: Role
    model: ModelSpec
    running_requests: int
    queued_requests: int
    max_requests: int
    batch_invariant: bool | None = None  # checked at load (torch engine); None: not checked
    engine_detail: str = ""              # what the engine checked and chose at load, one line
    kv_cache_bytes: int = 0              # KV bytes it holds now (pdgrpc_node_kv_cache_bytes)


# ---- prefill stream -------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    kv_lease_seconds: float = 0.0


@dataclass(frozen=True)
class PrefillStarted:
    prompt_token_ids: tuple[int, ...]
    model: ModelSpec


@dataclass(frozen=True)
class PrefillDone:
    first_token_id: int
    first_token_text: str
    first_token_logprob: float
    kv_groups: int
    finish_reason: FinishReason = FinishReason.UNSPECIFIED


PrefillEvent = PrefillStarted | KVDescriptor | PrefillDone


# ---- decode stream --------------------------------------------------------------------------

@dataclass(frozen=True)
class DecodeStart:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    model_fingerprint: str


@dataclass(frozen=True)
class DecodeKVDone:
    first_token_id: int
    kv_groups: int


DecodeInput = DecodeStart | KVDescriptor | DecodeKVDone


@dataclass(frozen=True)
class KVLoaded:
    group_index: int
    size_bytes: int


@dataclass(frozen=True)
class TokenOut:
    """Generated tokens that were ready together (usually one), with the text they add."""

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] = ()

    @classmethod
    def one(cls, token_id: int, text: str, logprob: float = 0.0) -> "TokenOut":
        return cls((token_id,), text, (logprob,))

    def merged(self, other: "TokenOut") -> "TokenOut":
        return TokenOut(self.token_ids + other.token_ids, self.text + other.text, self.logprobs + other.logprobs)


@dataclass(frozen=True)
class DecodeFinished:
    finish_reason: FinishReason
    completion_tokens: int


DecodeEvent = KVLoaded | TokenOut | DecodeFinished


ColocatedEvent = PrefillStarted | PrefillDone | TokenOut | DecodeFinished


# ---- coordinator stream ---------------------------------------------------------------------

@dataclass(frozen=True)
class GenerateRequest:
    prompt: Prompt
    sampling: SamplingParams
    request_id: str = ""


@dataclass(frozen=True)
class GenerateDelta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] = ()


@dataclass
class Timings:
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    kv_transfer_seconds: float = 0.0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    kv_groups_loaded_before_prefill_done: int = 0
    kv_groups: int = 0


@dataclass(frozen=True)
class GenerateFinal:
    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings = field(default_factory=Timings)
    prefill_node: str = ""
    decode_node: str = ""


GenerateEvent = GenerateDelta | GenerateFinal


class NodeHealth(enum.Enum):
    UNSPECIFIED = "unspecified"
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class NodeStatus:
    name: str
    role: Role
    address: str
    health: NodeHealth
    inflight_requests: int
    info: NodeInfo | None
    last_seen_seconds_ago: float
    host: str = ""            # the machine it runs on, as its membership record says
    store_address: str = ""   # the KV store it uses, as its membership record says


@dataclass(frozen=True)
class ClusterStatus:
    nodes: tuple[NodeStatus, ...]
    store_address: str
    inflight_requests: int
