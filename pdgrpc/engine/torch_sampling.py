"""Token sampling for the torch engine: greedy, temperature, top-k, top-p, seeded.

Reproducibility: a seeded request draws each token from a CPU ``torch.Generator`` seeded from
``(seed, absolute position of the token)``. The draw for a position therefore does not depend on
which process samples it (prefill samples the first token, a decode node the rest), on the batch
the request runs in, or on the device (probabilities are moved to the CPU before the draw).

``logprob`` is always the log-softmax of the raw logits (before temperature and filtering) at the
chosen token.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

import torch

from pdgrpc.engine.base import SampledToken
from pdgrpc.types import SamplingParams


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed for (request seed, token position), stable across processes."""
    digest = hashlib.blake2b(f"pdgrpc:{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Sampler:
    def __init__(self) -> None:
        # Unseeded requests draw from a per-process generator seeded from the OS.
        self._unseeded = torch.Generator(device="cpu")
        self._unseeded.manual_seed(secrets.randbits(63))

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               positions: Sequence[int]) -> list[SampledToken]:
        """One token per row of ``logits`` [B, V]; ``positions[i]`` is the absolute index of row i's token."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        greedy_ids = torch.argmax(logits, dim=-1)
        chosen: list[int] = greedy_ids.tolist()
        for i, p in enumerate(params):
            if p.temperature > 0:
                chosen[i] = self._draw(logits[i], p, positions[i])
        idx = torch.tensor(chosen, dtype=torch.long, device=logits.device)
        lp = logprobs.gather(1, idx[:, None])[:, 0].tolist()
        return [SampledToken(t, float(x)) for t, x in zip(chosen, lp)]

    def _draw(self, row: torch.Tensor, p: SamplingParams, position: int) -> int:
        scores = row / p.temperature
        vocab = scores.shape[-1]
        if 0 < p.top_k < vocab:
            kth = torch.topk(scores, p.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            drop[0] = False
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        if p.seed is not None:
            gen = torch.Generator(device="cpu")
            gen.manual_seed(position_seed(p.seed, position))
        else:
            gen = self._unseeded
        return int(torch.multinomial(probs, 1, generator=gen).item())
