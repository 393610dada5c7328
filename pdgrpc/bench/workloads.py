"""Benchmark workloads: what each request asks for, and when it arrives.

Synthetic workloads draw prompt and output lengths from seeded log-normal distributions (clipped)
and send token-id prompts of exactly that length, so no tokenizer, dataset or download is needed and
the same seed gives the same requests on every machine. ``fixed:130,514`` sends prompts of exactly
those lengths in turn; ``jsonl:PATH`` reads prompts from a file.

Arrivals are open-loop Poisson: exponential gaps at the given rate, drawn from their own seeded
stream, so every setup measured at one rate sees the very same arrival times and requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Lengths:
    """A clipped log-normal: ``median * exp(sigma * N(0, 1))`` rounded into [lo, hi]."""

    median: float
    sigma: float
    lo: int
    hi: int

    def draw(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        x = self.median * scale * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(x), max(1, round(self.lo * scale)), max(1, round(self.hi * scale))).astype(int)


@dataclass(frozen=True)
class Mix:
    """One component of a workload: ``weight`` of the requests have these lengths."""

    weight: float
    prompt: Lengths
    output: Lengths
    kind: str


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    parts: tuple[Mix, ...]
    slo_ttft_ms: float  # defaults sized for SmolLM2 on a CPU core or two (see README "Performance")
    slo_tpot_ms: float


# Sized for a 135M model on two CPU cores: a real deployment scales lengths with --prompt-scale and
# --output-scale and sets its own SLOs.
WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("chat", "chat-like: medium prompts, medium answers",
             (Mix(1.0, Lengths(128, 0.6, 16, 512), Lengths(48, 0.5, 8, 128), "chat"),), 1500, 150),
    Workload("gen", "generation-heavy: short prompts, long answers",
             (Mix(1.0, Lengths(32, 0.4, 8, 96), Lengths(128, 0.3, 64, 256), "gen"),), 1000, 150),
    Workload("long", "prompt-heavy long context: long prompts, short answers",
             (Mix(1.0, Lengths(1024, 0.3, 512, 2048), Lengths(16, 0.3, 4, 32), "long"),), 5000, 200),
    Workload("mixed", "long prompts arriving while short-prompt requests decode (20% long)",
             (Mix(0.8, Lengths(48, 0.3, 16, 96), Lengths(64, 0.2, 32, 96), "decode-heavy"),
              Mix(0.2, Lengths(1024, 0.15, 768, 1280), Lengths(8, 0.2, 4, 16), "long-prompt")), 4000, 150),
)}


@dataclass(frozen=True)
class BenchRequest:
    index: int
    max_tokens: int
    token_ids: tuple[int, ...] | None = None
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    kind: str = ""

    @property
    def prompt_len(self) -> int:
        """Prompt tokens when known up front (token-id prompts); 0 for text prompts."""
        return len(self.token_ids) if self.token_ids is not None else 0

    def client_kwargs(self) -> dict:
        """Keyword arguments for ``Client.generate``: exactly max_tokens tokens (EOS ignored), greedy."""
        kw: dict = {"max_tokens": self.max_tokens, "ignore_eos": True, "temperature": 0.0}
        if self.token_ids is not None:
            kw["token_ids"] = list(self.token_ids)
        elif self.messages is not None:
            kw["messages"] = [dict(m) for m in self.messages]
        return kw

    def prompt_arg(self) -> str | None:
        return self.text


@dataclass
class WorkloadSpec:
    """What ``--workload`` names, resolved: a synthetic preset or a JSONL file."""

    name: str
    vocab: int = 49152
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    max_output: int = 0  # 0: no cap
    jsonl_rows: list[dict] = field(default_factory=list)

    fixed_lengths: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str, **kw) -> "WorkloadSpec":
        if text.startswith("jsonl:"):
            return cls(name=text, jsonl_rows=load_jsonl(text[len("jsonl:"):]), **kw)
        if text.startswith("fixed:"):
            try:
                lengths = tuple(int(x) for x in text[len("fixed:"):].split(","))
            except ValueError:
                lengths = ()
            if not lengths or min(lengths) < 1:
                raise ValueError(f"{text!r}: use fixed:N[,N...] with prompt lengths >= 1")
            return cls(name=text, fixed_lengths=lengths, **kw)
        if text not in WORKLOADS:
            raise ValueError(f"unknown workload {text!r}: choose one of {sorted(WORKLOADS)}, fixed:N[,N...] "
                             "or jsonl:PATH")
        return cls(name=text, **kw)

    @property
    def preset(self) -> Workload | None:
        return WORKLOADS.get(self.name)

    def requests(self, n: int, seed: int) -> list[BenchRequest]:
        if self.fixed_lengths:  # prompts of exactly these lengths in turn, max_output (else 32) tokens each
            rng = np.random.default_rng([seed, 4])
            lens = [self.fixed_lengths[i % len(self.fixed_lengths)] for i in range(n)]
            return [BenchRequest(i, self.max_output or 32, kind=f"prompt-{k}",
                                 token_ids=tuple(int(t) for t in rng.integers(3, self.vocab, size=k)))
                    for i, k in enumerate(lens)]
        if self.jsonl_rows:
            return jsonl_requests(self.jsonl_rows, n, seed, self.max_output)
        return synthetic_requests(WORKLOADS[self.name], n, seed, vocab=self.vocab, prompt_scale=self.prompt_scale,
                                  output_scale=self.output_scale, max_output=self.max_output)


def synthetic_requests(w: Workload, n: int, seed: int, *, vocab: int = 49152, prompt_scale: float = 1.0,
                       output_scale: float = 1.0, max_output: int = 0) -> list[BenchRequest]:
    """``n`` requests of workload ``w``; the same (w, n, seed) always gives the same requests."""
    rng = np.random.default_rng([seed, 1])
    weights = np.array([m.weight for m in w.parts], dtype=float)
    which = rng.choice(len(w.parts), size=n, p=weights / weights.sum())
    out = []
    for i in range(n):
        m = w.parts[which[i]]
        plen = int(m.prompt.draw(rng, 1, prompt_scale)[0])
        olen = int(m.output.draw(rng, 1, output_scale)[0])
        if max_output:
            olen = min(olen, max_output)
        ids = tuple(int(t) for t in rng.integers(3, vocab, size=plen))
        out.append(BenchRequest(i, olen, token_ids=ids, kind=m.kind))
    return out


def load_jsonl(path: str) -> list[dict]:
    """Rows of ``{"prompt": str | "messages": [...] | "token_ids": [...], "max_tokens": int}``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from None
            if not isinstance(row, dict) or sum(k in row for k in ("prompt", "messages", "token_ids")) != 1:
                raise ValueError(f"{path}:{lineno}: need exactly one of prompt, messages, token_ids")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def jsonl_requests(rows: list[dict], n: int, seed: int, max_output: int = 0) -> list[BenchRequest]:
    """``n`` requests drawn from ``rows`` (seeded, with replacement when n > len(rows))."""
    rng = np.random.default_rng([seed, 2])
    order = rng.permutation(len(rows)) if n <= len(rows) else rng.integers(0, len(rows), size=n)
    out = []
    for i in range(n):
        row = rows[int(order[i])]
        olen = int(row.get("max_tokens", 64))
        if max_output:
            olen = min(olen, max_output)
        out.append(BenchRequest(
            i, olen, text=row.get("prompt"),
            token_ids=tuple(int(t) for t in row["token_ids"]) if "token_ids" in row else None,
            messages=tuple(dict(m) for m in row["messages"]) if "messages" in row else None, kind="jsonl"))
    return out


def poisson_arrivals(rate: float, n: int, seed: int) -> np.ndarray:
    """Arrival offsets in seconds of ``n`` requests at ``rate`` per second (the first at 0)."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    gaps = np.random.default_rng([seed, 3]).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)
