"""Cost models for the mock engine: how long a prefill and a decode step of a real model take.

A profile is a JSON file (shipped ones in ``pdgrpc/engine/profiles/``, chosen by name with
``--mock-profile NAME`` or ``mock_profile = "NAME"``; any other value is a path). The mock sleeps
what the profile says, so a node costs wall time, not CPU, and a 2-core box runs many mock nodes
that pace like GPU nodes: prefill's KV groups go out at their share of the modelled prefill time
from the prompt's start, a decode step returns at its modelled time from its start, and the mock's
own work and the node's between two groups count toward it, as a GPU's compute would overlap them.
Making the KV bytes is real work, though: 80-100 ms of CPU here for a 512-token Llama-3-8B prompt's
64 MiB, more than the A100 profile's 38 ms, so prefill with that profile is CPU-bound and slower
than modelled (decode is not: ~1 ms of CPU per 16-sequence step). Times are in seconds:

  prefill of one prompt of n tokens  = prefill_base_s + prefill_per_token_s * n + prefill_per_token2_s * n**2
  decode step of a batch of B seqs   = decode_base_s + decode_per_seq_s * B
                                       + decode_per_context_token_s * (sum of the B sequences' context tokens)

(the n**2 term is prefill attention; the context term is decode attention reading the KV cache).
The profile also names the model it describes and its KV geometry (``num_layers``,
``num_kv_heads``, ``head_dim``, ``dtype``): the mock takes that geometry, so its KV bytes per token
(2 * layers * kv heads * head dim * dtype bytes, checked against ``kv_bytes_per_token`` when the
file gives it) and so the store's and the wire's load are the real model's. ``source`` says where
the numbers came from: "measured here with tools/calibrate_mock_profile.py on DATE, CPU, ..." or
"published: TITLE, TABLE/FIGURE, ...". ``notes`` and ``measurements`` (the points the fit used) are
free-form. Every other key is refused, and every number is checked when a node starts.

Shipped: ``smollm2-135m-cpu-epyc2`` (the torch engine's SmolLM2-135M-Instruct float32 on this
project's 2-vCPU EPYC machine, measured) and ``llama3-8b-a100-vidur`` (Meta-Llama-3-8B bf16 on one
A100, fitted to the per-operator GPU timings Microsoft's Vidur simulator publishes; see its notes
for what those timings cover). Without a profile the mock's two constants
(``mock_prefill_cost_per_token_s``, ``mock_decode_cost_per_step_s``) are a trivial profile.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
COEFFICIENTS = ("prefill_base_s", "prefill_per_token_s", "prefill_per_token2_s",
                "decode_base_s", "decode_per_seq_s", "decode_per_context_token_s")
# The mock's own geometry (MockEngineConfig's defaults: SmolLM2-135M's KV shape).
_MOCK_GEOMETRY = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64, "dtype": "float32"}


class ProfileError(ValueError):
    """A profile file is missing, unreadable or holds a wrong value; the message names the field."""


@dataclass(frozen=True)
class MockProfile:
    name: str
    model: str               # the model the numbers describe
    hardware: str            # where they were taken
    source: str              # how: measured here (tool, date, CPU) or published (title, table/figure)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    prefill_base_s: float = 0.0
    prefill_per_token_s: float = 0.0
    prefill_per_token2_s: float = 0.0
    decode_base_s: float = 0.0
    decode_per_seq_s: float = 0.0
    decode_per_context_token_s: float = 0.0
    kv_bytes_per_token: int = 0      # 0: computed from the geometry; given: must match it
    notes: str = ""
    measurements: Any = None         # the points the coefficients were fitted to (free-form)

    def __post_init__(self) -> None:
        for key in ("name", "model", "hardware", "source"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise ProfileError(f"profile field {key!r} must be a non-empty string")
        for key in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ProfileError(f"profile field {key!r} must be a whole number > 0, not {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ProfileError(f"profile field 'dtype' must be one of {sorted(DTYPE_BYTES)}, not {self.dtype!r}")
        for key in COEFFICIENTS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ProfileError(f"profile field {key!r} must be a finite number of seconds >= 0, not {value!r}")
        computed = 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]
        if self.kv_bytes_per_token == 0:
            object.__setattr__(self, "kv_bytes_per_token", computed)
        elif self.kv_bytes_per_token != computed:
            raise ProfileError(f"profile field 'kv_bytes_per_token' is {self.kv_bytes_per_token!r}, but the "
                               f"geometry (2 x {self.num_layers} layers x {self.num_kv_heads} kv heads x "
                               f"{self.head_dim} dims x {DTYPE_BYTES[self.dtype]} bytes) gives {computed}")
        if not isinstance(self.notes, str):
            raise ProfileError("profile field 'notes' must be a string")

    # ---- the model ------------------------------------------------------------------------

    def prefill_s(self, tokens: int) -> float:
        """Modelled time to prefill one prompt of ``tokens`` tokens (0 tokens: nothing to do)."""
        if tokens <= 0:
            return 0.0
        return self.prefill_base_s + self.prefill_per_token_s * tokens + self.prefill_per_token2_s * tokens * tokens

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """Modelled time of one decode step for ``batch`` sequences holding ``context_tokens`` in all."""
        if batch <= 0:
            return 0.0
        return self.decode_base_s + self.decode_per_seq_s * batch + self.decode_per_context_token_s * context_tokens

    @property
    def geometry(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "dtype": self.dtype}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def constant(cls, prefill_per_token_s: float = 0.0, decode_per_step_s: float = 0.0,
                 **geometry: Any) -> "MockProfile":
        """The trivial profile of the mock's two constants, on the given geometry (default: the mock's)."""
        return cls(name="constant", model="mock", hardware="none", source="the mock's cost constants",
                   prefill_per_token_s=prefill_per_token_s, decode_base_s=decode_per_step_s,
                   **{**_MOCK_GEOMETRY, **geometry})

    @classmethod
    def from_dict(cls, raw: Any, where: str = "profile") -> "MockProfile":
        if not isinstance(raw, dict):
            raise ProfileError(f"{where}: a profile is a JSON object, not {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ProfileError(f"{where}: unknown profile fields {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in raw)
        if missing:
            raise ProfileError(f"{where}: missing profile fields {missing}")
        try:
            return cls(**raw)
        except ProfileError as exc:
            raise ProfileError(f"{where}: {exc}") from None


def shipped_profiles() -> list[str]:
    try:
        return sorted(f[:-5] for f in os.listdir(PROFILE_DIR) if f.endswith(".json"))
    except OSError:
        return []


def profile_path(name_or_path: str) -> str:
    """A shipped profile's file by name, else the value itself as a path."""
    if os.sep not in name_or_path and "/" not in name_or_path and not name_or_path.endswith(".json"):
        path = os.path.join(PROFILE_DIR, name_or_path + ".json")
        if not os.path.exists(path):
            raise ProfileError(f"no shipped mock profile {name_or_path!r}; shipped: {shipped_profiles()} "
                               f"(or give a path to a .json file)")
        return path
    return name_or_path


def load_profile(name_or_path: str) -> MockProfile:
    """The profile a shipped name or a JSON file's path names, validated (ProfileError if not)."""
    path = profile_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as exc:
        raise ProfileError(f"cannot read mock profile {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"mock profile {path} is not valid JSON: {exc}") from None
    return MockProfile.from_dict(raw, f"mock profile {path}")


def check_mock_options(opts: Any, where: str, error: type[Exception]) -> None:
    """``mock_profile`` loads and validates, belongs to the mock engine, is not mixed with the mock's
    cost constants, and agrees with ``dtype`` if that is set (raises ``error``)."""
    if opts.mock_prefill_cost_per_token_s < 0 or opts.mock_decode_cost_per_step_s < 0:
        raise error(f"{where}mock costs must be >= 0")
    if not opts.mock_profile:
        return
    if opts.name != "mock":
        raise error(f"{where}mock_profile is a mock engine option, not {opts.name}'s")
    if opts.mock_prefill_cost_per_token_s or opts.mock_decode_cost_per_step_s:
        raise error(f"{where}mock_profile replaces mock_prefill_cost_per_token_s and mock_decode_cost_per_step_s; "
                    f"set one or the other")
    try:
        profile = load_profile(opts.mock_profile)
    except ProfileError as exc:
        raise error(f"{where}{exc}") from None
    if opts.dtype and opts.dtype != profile.dtype:
        raise error(f"{where}dtype {opts.dtype!r} differs from mock profile {profile.name}'s KV dtype "
                    f"{profile.dtype!r} (leave dtype empty)")
