"""The torch engine's attention: transformers' SDPA attention, without its KV-head copies on CPU.

Why: with grouped-query attention (SmolLM2: 9 query heads share 3 KV heads) and an attention mask,
transformers' ``sdpa`` attention copies every KV head once per query head that uses it
(``repeat_kv``) before calling ``torch.nn.functional.scaled_dot_product_attention``, because on
CUDA a mask together with ``enable_gqa`` sends SDPA to its slow math kernel. A decode batch gets a
mask whenever its sequences differ in length (left padding), and a long prompt among short ones
pads every row to its length: on one CPU core, a step of 5 short sequences and one of 1100 tokens
took 388 ms against 71 ms for 6 short ones, most of it in those copies (30 layers x 2 x
[6, 9, 1101, 64] floats). Torch's CPU flash-attention kernel takes the mask and ``enable_gqa``
together, so on CPU this calls SDPA with both and copies nothing: the same kernel on the same
numbers (bit-identical output in ``tests/test_torch_engine.py``), 2.5 ms -> 0.5 ms per layer for
that batch. Everything else (no mask, CUDA, paged caches, position biases) goes to transformers'
own function unchanged.

``use_grouped_kv_attention(model)`` switches a loaded model to it.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "pdgrpc_sdpa"
_registered = False


def grouped_kv_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; output [B, q_len, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None or query.device.type != "cpu" or getattr(module, "num_key_value_groups", 1) == 1
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or kwargs.get("output_attentions", False)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # With a mask transformers never asks for a causal kernel (the mask says it all); same here.
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=False,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, grouped_kv_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds for sdpa
    _registered = True


def use_grouped_kv_attention(model: Any) -> None:
    """Make ``model`` (loaded with ``attn_implementation="sdpa"``) attend through ``grouped_kv_sdpa``."""
    _register()
    model.set_attn_implementation(NAME)
