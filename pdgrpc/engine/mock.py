"""The mock engine: a test double with a real KV footprint and no model.

Tokens are UTF-8 bytes (id = byte + 3; 0 pad, 1 bos, 2 eos). Prefill produces KV bytes of the
configured shape, a deterministic function of the prompt; the tokens it generates depend on a
CRC of the whole KV cache, so a decode node that loaded wrong or partial KV produces different
text than the colocated run. Costs are slept, never spun: a cost model (``mock_profile``, see
pdgrpc.engine.mock_profile: prefill time by prompt length, decode step time by batch size and
context, the model's KV geometry) or the two constants (per prompt token and per decode step),
which let control-plane tests and load tests shape the timing. The mock sleeps until each KV group's
or step's modelled time, so its own work counts toward it.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pdgrpc.engine.base import DecodeWork, Engine, KVGroup, PrefillWork, SampledToken, Tokenizer
from pdgrpc.engine.mock_profile import MockProfile
from pdgrpc.errors import FailedPrecondition, InvalidArgument
from pdgrpc.types import ModelSpec

_BYTE_OFFSET = 3
_EOS = 2
# Generated text stays readable: lowercase letters and spaces.
_ALPHABET = [ord(c) + _BYTE_OFFSET for c in "abcdefghijklmnopqrstuvwxyz      "]
_DIGEST_DIM_STEP = 16


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
    profile: MockProfile | None = None  # replaces the two costs; its geometry must be this config's

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
        p = self.profile
        if p is not None:
            if self.prefill_cost_per_token_s or self.decode_cost_per_step_s:
                raise ValueError("mock profile replaces the mock's cost constants; set one or the other")
            ours = {k: getattr(self, k) for k in p.geometry}
            if ours != p.geometry:
                raise ValueError(f"mock geometry {ours} differs from profile {p.name}'s {p.geometry}")

    @classmethod
    def for_profile(cls, profile: MockProfile, **kwargs) -> "MockEngineConfig":
        """A config with the profile's model geometry (layers, KV heads, head dim, dtype)."""
        return cls(**{**kwargs, **profile.geometry, "profile": profile})


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
    groups: dict[int, np.ndarray] = field(default_factory=dict)
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
        self._kv_tables: dict[int, np.ndarray] = {}  # see _kv_rows
        self.profile = c.profile or MockProfile.constant(
            c.prefill_cost_per_token_s, c.decode_cost_per_step_s,
            num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=c.dtype)

    # ---- KV content -----------------------------------------------------------------------

    def _kv_array(self, token_ids: list[int], layer_start: int, layer_end: int, first_position: int = 0,
                  dim_step: int = 1):
        """KV of the given layers for the tokens, [layer][kv][head][token][dim], in the KV dtype;
        with ``dim_step`` only every dim_step-th dim (the values the digest reads, see _digest)."""
        c = self.config
        ids = np.asarray(token_ids, dtype=np.int64)
        pos = np.arange(len(ids), dtype=np.int64) + first_position
        layer = np.arange(layer_start, layer_end, dtype=np.int64)[:, None, None, None]
        kind = np.arange(2, dtype=np.int64)[None, :, None, None]
        head = np.arange(c.num_kv_heads, dtype=np.int64)[None, None, :, None]
        base = (ids * 131 + pos * 7)[None, None, None, :] + layer * 17 + kind * 3 + head
        return self._kv_rows(dim_step)[base % 1009]  # [L, 2, H, T, D]

    def _kv_rows(self, dim_step: int):
        """Row v: the dims of a KV vector whose (token, position, layer, K/V, head) give v = base % 1009,
        v / 1009 + dim / 4096 in the KV dtype. A vector depends on nothing else, so KV is a gather from
        these 1009 rows: one pass over the output instead of several (a Llama-3-8B prompt's KV is
        128 KiB a token; computing it value by value cost 13x the GPU profile's prefill time in CPU)."""
        table = self._kv_tables.get(dim_step)
        if table is None:
            vals = np.arange(1009, dtype=np.int64).astype(np.float32) / 1009.0
            arr = vals[:, None] + np.arange(self.config.head_dim, dtype=np.float32)[::dim_step] / 4096.0
            if self.config.dtype == "float16":
                arr = arr.astype(np.float16)
            elif self.config.dtype == "bfloat16":
                arr = (arr.view(np.uint32) >> 16).astype(np.uint16)
            table = self._kv_tables[dim_step] = arr
        return table

    def kv_bytes(self, token_ids: list[int], layer_start: int, layer_end: int) -> bytes:
        return self._kv_array(token_ids, layer_start, layer_end).tobytes()

    def _kv_from_bytes(self, data, layers: int, tokens: int):
        dt = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[self.config.dtype]
        c = self.config
        return np.frombuffer(data, dtype=dt).reshape(layers, 2, c.num_kv_heads, tokens, c.head_dim)

    @staticmethod
    def _sampled(kv):
        """The values of a KV array the digest reads: every _DIGEST_DIM_STEP-th dim of every layer,
        head and token. A value depends on its token, position, layer, K/V and head, so KV loaded
        from the wrong request, token, layer or group still changes the text; reading all of it cost
        ~0.7 ms of CPU per request on prefill and again on decode (bench coordinator counts every
        engine millisecond as overhead). Corrupt bytes are the store's CRC's to catch (DATA_LOSS)."""
        return kv[..., ::_DIGEST_DIM_STEP]

    @staticmethod
    def _digest(sampled, previous: int = 0) -> int:
        """CRC of sampled KV (see _sampled) token by token (all layers of token 0, then token 1, ...),
        chained onto ``previous``: the state after a prompt plus generated tokens is the same whether
        their KV came from one prefill or from prefill and decode steps, as with a real model's cache."""
        return zlib.crc32(np.ascontiguousarray(sampled.transpose(3, 0, 1, 2, 4)).tobytes(), previous)

    def _next_token(self, digest: int, position: int, seed: int | None, temperature: float) -> int:
        h = zlib.crc32(f"{digest}:{position}".encode())
        if temperature > 0:
            rng = np.random.default_rng([seed if seed is not None else time.time_ns(), position])
            h ^= int(rng.integers(0, 2**31))
        return _ALPHABET[h % len(_ALPHABET)]

    # ---- prefill --------------------------------------------------------------------------

    def prefill(self, works: list[PrefillWork], more=None) -> Iterator[tuple[int, KVGroup | SampledToken]]:
        c = self.config
        for index, work in enumerate(works):
            ids = work.prompt_token_ids
            self._check_ids(ids)
            parts = []
            groups = range(0, c.num_layers, c.layers_per_group)
            group_cost = self.profile.prefill_s(len(ids)) / len(groups)
            t0 = time.monotonic()
            for i, start in enumerate(groups):
                if work.cancelled.is_set():
                    break
                end = min(start + c.layers_per_group, c.num_layers)
                kv = self._kv_array(ids, start, end)
                parts.append(self._sampled(kv))
                data = kv.tobytes()
                # Group i goes out at its modelled time from the prompt's start: the mock's own work
                # (and the node's, while this generator waits) is part of it, as a GPU's would overlap.
                self._sleep_until(t0 + (i + 1) * group_cost)
                yield index, KVGroup(start, end, 0, len(ids), data)
            else:
                digest = self._digest(np.concatenate(parts))
                s = work.sampling
                yield index, SampledToken(self._next_token(digest, len(ids), s.seed, s.temperature))

    def _check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidArgument(f"token id {bad[0]} outside the vocabulary [0, {self.spec.vocab_size})")

    # ---- decode ---------------------------------------------------------------------------

    def begin_sequence(self, work: DecodeWork) -> _MockSequence:
        self._check_ids(work.prompt_token_ids)
        return _MockSequence(work)

    def load_kv(self, seq: _MockSequence, group: KVGroup) -> None:
        layers, tokens = group.layer_end - group.layer_start, group.token_end - group.token_start
        expected = self.spec.kv_bytes(layers, tokens)
        if len(group.data) != expected:
            raise InvalidArgument(f"KV group has {len(group.data)} bytes, layout says {expected}")
        # Only what the digest reads is kept, copied: the store may reuse group.data once this returns.
        seq.groups[group.layer_start] = self._sampled(self._kv_from_bytes(group.data, layers, tokens)).copy()

    def start_decoding(self, seq: _MockSequence, first_token_id: int) -> None:
        kv = np.concatenate([seq.groups[start] for start in sorted(seq.groups)])
        if kv.shape[0] != self.config.num_layers:
            raise FailedPrecondition(f"KV covers {kv.shape[0]} of {self.config.num_layers} layers")
        seq.groups.clear()  # the digest is all the mock keeps of its "cache"
        seq.digest = self._digest(kv)
        seq.last_token = first_token_id
        seq.position = len(seq.work.prompt_token_ids)  # position of last_token

    @staticmethod
    def _sleep_until(deadline: float) -> None:
        left = deadline - time.monotonic()
        if left > 0:
            time.sleep(left)

    def decode_step(self, seqs: list[_MockSequence]) -> list[SampledToken]:
        deadline = time.monotonic() + self.profile.decode_step_s(len(seqs), sum(seq.position + 1 for seq in seqs))
        out = []
        for seq in seqs:
            s = seq.work.sampling
            kv = self._kv_array([seq.last_token], 0, self.config.num_layers, seq.position, _DIGEST_DIM_STEP)
            seq.digest = self._digest(kv, seq.digest)
            seq.position += 1
            seq.last_token = self._next_token(seq.digest, seq.position, s.seed, s.temperature)
            out.append(SampledToken(seq.last_token))
        self._sleep_until(deadline)  # the step takes its modelled time, the mock's own work included
        return out

    def free_sequence(self, seq: _MockSequence) -> None:
        seq.groups.clear()
