"""The mock engine: a test double with a real KV footprint and no model.

Tokens are UTF-8 bytes (id = byte + 3; 0 pad, 1 bos, 2 eos). Prefill produces KV bytes of the
configured shape, a deterministic function of the prompt; the tokens it generates depend on a
CRC of the whole KV cache, so a decode node that loaded wrong or partial KV produces different
text than the colocated run. Costs (sleep per prompt token and per decode step) let control-plane
tests and load tests shape the timing.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pdgrpc.engine.base import DecodeWork, Engine, KVGroup, PrefillWork, SampledToken, Tokenizer
from pdgrpc.errors import InvalidArgument
from pdgrpc.types import ModelSpec

_BYTE_OFFSET = 3
_EOS = 2
# Generated text stays readable: lowercase letters and spaces.
_ALPHABET = [ord(c) + _BYTE_OFFSET for c in "abcdefghijklmnopqrstuvwxyz      "]


@dataclass(frozen=True)
class MockEngineConfig:
    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    dtype: str = "float32"
    vocab_size: int = 49152
    max_model_len: int = 4096
    layers_per_group: int = 6
    prefill_cost_per_token_s: float = 0.0
    decode_cost_per_step_s: float = 0.0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"mock dtype must be float32, float16 or bfloat16, not {self.dtype}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "layers_per_group", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mock {name} must be > 0")
        if self.vocab_size < 259:
            raise ValueError("mock vocab_size must be >= 259 (byte tokens)")
        if self.prefill_cost_per_token_s < 0 or self.decode_cost_per_step_s < 0:
            raise ValueError("mock costs must be >= 0")


class ByteTokenizer(Tokenizer):
    def encode(self, text: str) -> list[int]:
        return [1] + [b + _BYTE_OFFSET for b in text.encode("utf-8")]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        rendered = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return self.encode(rendered)

    def decode(self, token_ids: list[int]) -> str:
        raw = bytes(t - _BYTE_OFFSET for t in token_ids if _BYTE_OFFSET <= t < 256 + _BYTE_OFFSET)
        return raw.decode("utf-8", errors="replace")


@dataclass
class _MockSequence:
    work: DecodeWork
    groups: dict[int, bytes] = field(default_factory=dict)
    digest: int = 0
    last_token: int = 0
    position: int = 0


class MockEngine(Engine):
    def __init__(self, config: MockEngineConfig | None = None, name: str = "mock") -> None:
        self.config = c = config or MockEngineConfig()
        shape = f"{c.num_layers}x{c.num_kv_heads}x{c.head_dim}:{c.dtype}:{c.vocab_size}"
        self.spec = ModelSpec(
            name=name,
            fingerprint="mock-" + hashlib.sha256(shape.encode()).hexdigest()[:16],
            num_layers=c.num_layers,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype=c.dtype,
            vocab_size=c.vocab_size,
            max_model_len=c.max_model_len,
            engine="mock",
            eos_token_ids=(_EOS,),
        )
        self.tokenizer = ByteTokenizer()

    # ---- KV content -----------------------------------------------------------------------

    def kv_bytes(self, token_ids: list[int], layer_start: int, layer_end: int) -> bytes:
        """KV of the given layers for the whole prompt, [layer][kv][head][token][dim]."""
        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)
        pos = np.arange(len(ids), dtype=np.int64)
        layer = np.arange(layer_start, layer_end, dtype=np.int64)[:, None, None, None]
        kind = np.arange(2, dtype=np.int64)[None, :, None, None]
        head = np.arange(c.num_kv_heads, dtype=np.int64)[None, None, :, None]
        base = (ids * 131 + pos * 7)[None, None, None, :] + layer * 17 + kind * 3 + head
        vals = (base % 1009).astype(np.float32) / 1009.0
        dims = (np.arange(c.head_dim, dtype=np.float32) / 4096.0)
        arr = vals[..., None] + dims  # [L, 2, H, T, D]
        if c.dtype == "float16":
            return arr.astype(np.float16).tobytes()
        if c.dtype == "bfloat16":
            return (arr.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes()
        return arr.astype(np.float32).tobytes()

    def _next_token(self, digest: int, last_token: int, position: int, work_seed: int | None,
                    temperature: float) -> int:
        h = zlib.crc32(f"{digest}:{last_token}:{position}".encode())
        if temperature > 0:
            rng = np.random.default_rng([work_seed if work_seed is not None else time.time_ns(), position])
            h ^= int(rng.integers(0, 2**31))
        return _ALPHABET[h % len(_ALPHABET)]

    # ---- prefill --------------------------------------------------------------------------

    def prefill(self, works: list[PrefillWork]) -> Iterator[tuple[int, KVGroup | SampledToken]]:
        c = self.config
        for index, work in enumerate(works):
            ids = work.prompt_token_ids
            self._check_ids(ids)
            digest = 0
            groups = range(0, c.num_layers, c.layers_per_group)
            group_cost = c.prefill_cost_per_token_s * len(ids) / len(groups)
            for start in groups:
                if work.cancelled.is_set():
                    break
                end = min(start + c.layers_per_group, c.num_layers)
                if group_cost:
                    time.sleep(group_cost)
                data = self.kv_bytes(ids, start, end)
                digest = zlib.crc32(data, digest)
                yield index, KVGroup(start, end, 0, len(ids), data)
            else:
                s = work.sampling
                yield index, SampledToken(self._next_token(digest, ids[-1], len(ids), s.seed, s.temperature))

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} outside the vocabulary [0, {self.spec.vocab_size})")

    # ---- decode ---------------------------------------------------------------------------

    def begin_sequence(self, work: DecodeWork) -> _MockSequence:
        self._check_ids(work.prompt_token_ids)
        return _MockSequence(work)

    def load_kv(self, seq: _MockSequence, group: KVGroup) -> None:
        expected = self.spec.kv_bytes(group.layer_end - group.layer_start, group.token_end - group.token_start)
        if len(group.data) != expected:
            raise InvalidArgument(f"KV group has {len(group.data)} bytes, layout says {expected}")
        seq.groups[group.layer_start] = bytes(group.data)

    def start_decoding(self, seq: _MockSequence, first_token_id: int) -> None:
        digest = 0
        for start in sorted(seq.groups):
            digest = zlib.crc32(seq.groups[start], digest)
        seq.groups.clear()  # the digest is all the mock keeps of its "cache"
        seq.digest = digest
        seq.last_token = first_token_id
        seq.position = len(seq.work.prompt_token_ids) + 1

    def decode_step(self, seqs: list[_MockSequence]) -> list[SampledToken]:
        if self.config.decode_cost_per_step_s:
            time.sleep(self.config.decode_cost_per_step_s)
        out = []
        for seq in seqs:
            s = seq.work.sampling
            tok = self._next_token(seq.digest, seq.last_token, seq.position, s.seed, s.temperature)
            seq.last_token, seq.position = tok, seq.position + 1
            out.append(SampledToken(tok))
        return out

    def free_sequence(self, seq: _MockSequence) -> None:
        seq.groups.clear()
