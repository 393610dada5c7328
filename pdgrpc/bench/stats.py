"""Per-request measurements and their summaries: TTFT, TPOT, ITL, end-to-end latency, goodput.

Definitions (all measured by the benchmark client, from the moment it sends a request):
  TTFT  first token received
  TPOT  (e2e - TTFT) / (output tokens - 1), per request; a one-token answer has none
  ITL   every gap between two consecutive token messages, pooled over all requests
  E2E   last message (the final one, with usage) received
Goodput follows DistServe: a request is *good* when its TTFT and its TPOT both meet their SLOs
(a request without a TPOT meets that SLO). ``goodput_rps`` is good requests per second of the run
(first send to last answer); the sweep's ``max_rate_at_attainment`` is DistServe's per-setup goodput:
the highest offered rate whose SLO attainment (good / sent) is at least the attainment goal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    index: int
    kind: str = ""
    scheduled_s: float = 0.0  # arrival offset in the run
    sent_s: float = 0.0  # when it was really sent (run clock)
    ttft_s: float | None = None
    e2e_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # receive time of each token message, from send
    output_tokens: int = 0
    prompt_tokens: int = 0
    server_prefill_s: float | None = None  # the coordinator's timings: prefill call sent -> first token
    server_queue_s: float | None = None  # arrival -> nodes picked
    error: str = ""

    def add_tokens(self, at_s: float, n: int) -> None:
        """A message with ``n`` tokens arrived ``at_s`` after the send."""
        if self.ttft_s is None:
            self.ttft_s = at_s
        self.token_times_s.append(at_s)
        self.output_tokens += n

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    def good(self, slo_ttft_s: float, slo_tpot_s: float) -> bool:
        if not self.ok or self.ttft_s > slo_ttft_s:
            return False
        tpot = self.tpot_s
        return tpot is None or tpot <= slo_tpot_s


def percentiles(values, ps=PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ..., "mean": ..., "max": ...}`` in the values' unit; None when empty."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {**{f"p{p:g}": None for p in ps}, "mean": None, "max": None}
    out = {f"p{p:g}": float(np.percentile(arr, p)) for p in ps}
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def _ms(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (None if v is None else round(v * 1000, 3)) for k, v in d.items()}


def summarize(results: list[RequestResult], *, offered_rate: float, slo_ttft_s: float, slo_tpot_s: float,
              duration_s: float | None = None) -> dict:
    """One run's summary; latencies in milliseconds, rates per second."""
    ok = [r for r in results if r.ok]
    if duration_s is None:
        ends = [r.sent_s + r.e2e_s for r in ok]
        starts = [r.sent_s for r in results]
        duration_s = (max(ends) - min(starts)) if ends and starts else 0.0
    good = sum(r.good(slo_ttft_s, slo_tpot_s) for r in results)
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if r.error:
            key = r.error.split(":", 1)[0][:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "offered_rate_rps": offered_rate,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "duration_s": round(duration_s, 3),
        "throughput_rps": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": _ms(percentiles(r.ttft_s for r in ok)),
        "tpot_ms": _ms(percentiles(r.tpot_s for r in ok)),
        # p99.9 and max too: a stall of every decoding sequence (a long prefill in the same engine) is
        # a handful of gaps among thousands, below p99 unless long prompts are frequent
        "itl_ms": _ms(percentiles((x for r in ok for x in r.itls_s()), PERCENTILES + (99.9,))),
        "e2e_ms": _ms(percentiles(r.e2e_s for r in ok)),
        "slo": {"ttft_ms": slo_ttft_s * 1000, "tpot_ms": slo_tpot_s * 1000},
        "good": good,
        "slo_attainment": good / len(results) if results else 0.0,
        "goodput_rps": good / duration_s if duration_s > 0 else 0.0,
    }


def by_kind(results: list[RequestResult], **kw) -> dict[str, dict]:
    """Summaries per request kind (e.g. the long prompts and the decode-heavy ones of "mixed")."""
    kinds = sorted({r.kind for r in results})
    if len(kinds) < 2:
        return {}
    return {k: summarize([r for r in results if r.kind == k], **kw) for k in kinds}


def max_rate_at_attainment(runs: list[dict], goal: float = 0.9) -> float:
    """DistServe's goodput of one setup: the highest offered rate whose attainment is >= goal, such
    that every lower rate measured also met it (0.0 when even the lowest did not)."""
    best = 0.0
    for run in sorted(runs, key=lambda r: r["offered_rate_rps"]):
        if run["offered_rate_rps"] <= 0:
            continue
        if run["slo_attainment"] + 1e-12 < goal:
            break
        best = run["offered_rate_rps"]
    return best


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def result_dict(r: RequestResult) -> dict:
    d = asdict(r)
    d["token_times_s"] = [round(t, 6) for t in r.token_times_s]
    return d
