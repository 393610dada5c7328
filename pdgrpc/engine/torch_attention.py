"""The torch engine's attention: transformers' SDPA attention, cheaper for padded decode batches on CPU.

A decode batch gets an attention mask whenever its sequences differ in length (left padding), and
a long prompt among short ones pads every row to its length. Transformers' ``sdpa`` attention then
does two costly things, both fixed here on CPU:

1. With grouped-query attention (SmolLM2: 9 query heads share 3 KV heads) and any mask it copies
   every KV head once per query head that uses it (``repeat_kv``), because on CUDA a mask together
   with ``enable_gqa`` sends SDPA to its slow math kernel. Torch's CPU flash-attention kernel takes
   both: here SDPA gets the mask and ``enable_gqa`` and copies nothing. Same kernel, same numbers
   (bit-identical logits, ``tests/test_torch_engine.py``).
2. Every row attends over the padded length, and the padding must hold zeros (masked, but NaN * 0
   is NaN). For a decode step (one query per row) of a left-padded batch each row here attends to
   exactly the columns it holds, no mask (``_ragged_decode``): a long prompt among short ones costs
   its own columns, not its length times the batch, a row's attention is the same whatever else is
   in the batch, and the engine need not write the padding at all (``ATTENDS_TO_HELD_COLUMNS_ONLY``).
   Logits equal those of the padded computation up to float rounding, the same greedy tokens.

On one CPU core, a step of 5 sequences of 120 tokens and one of 1100 took 171-472 ms through
transformers' sdpa, 110 ms with (1), 73 ms with (1) and (2), against 67-70 ms for 6 short ones (two
threads: 338 ms before); 15 short and one long: 1183 -> 113 ms; 31 and one: 2336 -> 184 ms.
Everything else (no mask, CUDA, paged caches, position biases) goes to transformers' own function
unchanged.

``use_engine_attention(model)`` switches a loaded model to it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

NAME = "pdgrpc_sdpa"
# Devices on which a decode step run inside ``held_columns`` through NAME reads only the columns each
# row holds (see _ragged_decode), so the batch's padding may stay unwritten.
ATTENDS_TO_HELD_COLUMNS_ONLY = {"cpu"}
_registered = False
_held: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("pdgrpc_held_columns", default=None)


@contextlib.contextmanager
def held_columns(spans: list[int]) -> Iterator[None]:
    """Within it, a decode step's attention takes row i to hold the last ``spans[i]`` columns of
    the cache (the new token included) and reads nothing else: the engine says so instead of the
    mask being searched for it, and a batch whose padding was never written cannot be read."""
    token = _held.set(spans)
    try:
        yield
    finally:
        _held.reset(token)


def engine_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; output [B, q_len, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    extras = (kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
              or kwargs.get("output_attentions", False))
    on_cpu = query.device.type == "cpu" and not extras
    if on_cpu and query.shape[2] == 1 and dropout == 0.0 and (attention_mask is not None or _held.get() is not None):
        out = _ragged_decode(query, key, value, attention_mask, scaling)
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    if _held.get() is not None:  # the caller left the padding unwritten: nothing else may read it
        raise RuntimeError("held_columns is set but this attention call cannot honour it")
    if attention_mask is None or not on_cpu or getattr(module, "num_key_value_groups", 1) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask transformers never asks for a causal kernel (the mask says it all); same here.
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _ragged_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   scaling: float | None) -> torch.Tensor | None:
    """One decode step (one query per row) of a left-padded batch: each row attends to exactly the
    columns it holds, with no mask, so no padding is ever read (the engine leaves it unwritten) and
    a row's attention is the same whatever else is in the batch. A long prompt among short ones
    then costs its own columns, not its length times the batch, and neither does the padding a
    finished long sequence left behind. None when the mask is not left padding (the caller then
    attends over all of it)."""
    cols = key.shape[2]
    spans = _held.get()
    if spans is not None:
        if len(spans) != query.shape[0] or not all(0 < span <= cols for span in spans):
            raise RuntimeError(f"held_columns {spans} do not fit a batch of {query.shape[0]} rows, {cols} columns")
    elif mask is None or mask.shape[-1] != cols:
        return None
    else:
        spans = getattr(mask, "_pdgrpc_spans", False)
        if spans is False:  # the same mask object comes to every layer of a step: work it out once per step
            spans = left_padded_spans(mask)
            mask._pdgrpc_spans = spans
        if spans is None:
            return None
    if len(set(spans)) == 1:  # one span for all (padding left behind by sequences that finished)
        return torch.nn.functional.scaled_dot_product_attention(
            query, key[:, :, cols - spans[0]:], value[:, :, cols - spans[0]:], scale=scaling, enable_gqa=True)
    out = query.new_empty(query.shape[0], query.shape[1], 1, value.shape[-1])
    for row, span in enumerate(spans):  # views, no copies: ~15 us a call here, 30 layers x rows a step
        out[row] = torch.nn.functional.scaled_dot_product_attention(
            query[row:row + 1], key[row:row + 1, :, cols - span:], value[row:row + 1, :, cols - span:],
            scale=scaling, enable_gqa=True)[0]
    return out


def left_padded_spans(mask: torch.Tensor) -> list[int] | None:
    """How many columns each row holds, when ``mask`` ([B, 1, 1, cols], True = attend) is left
    padding: each row's valid columns one run at the right end. None otherwise, or when no row is
    padded (nothing to skip)."""
    cols = mask.shape[-1]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.dtype != torch.bool:
        return None
    valid = mask[:, 0, 0]
    spans_t = valid.sum(-1)
    if not torch.equal(valid, torch.arange(cols, device=mask.device) >= (cols - spans_t)[:, None]):
        return None
    spans = spans_t.tolist()
    return None if all(span == cols for span in spans) or min(spans) == 0 else spans


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, engine_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds for sdpa
    _registered = True


def use_engine_attention(model: Any) -> None:
    """Make ``model`` (loaded with ``attn_implementation="sdpa"``) attend through ``engine_sdpa``."""
    _register()
    model.set_attn_implementation(NAME)
