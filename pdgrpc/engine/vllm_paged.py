"""vLLM's paged KV cache <-> pdgrpc's wire layout, one layer at a time (used by GswarmConnector).

The wire layout is ``[k|v][kv_head][token][dim]`` for tokens [0, T) of a prompt, whatever the attention
backend's paged layout and block size. ``PagedBlocks`` gathers a prompt's tokens out of its blocks and
scatters them back; it works on torch tensors and, for the CPU cache viewed without torch's
overhead, on numpy arrays. Two layouts exist (``_LAYOUT_MODES`` maps backends to them):

* ``cpu`` (vLLM's CPU_ATTN, tested): blocks ``[num_blocks, kv_heads, block_size, 2*head_dim]``; inside
  a block and head, K transposed ``[head_dim][block_size]``, then V ``[block_size][head_dim]``, checked
  against vLLM's cache-write kernel at start (``probe_cpu_layout``);
* ``kv_last`` (FLASH_ATTN, TRITON_ATTN, FLEX_ATTENTION): a token's K then V on the last dim of a logical
  ``[num_blocks, kv_heads, block_size, 2*head_dim]`` view (written from vLLM 0.32's source, not run on
  a GPU yet).
"""

from __future__ import annotations

import torch

LAYOUT_MODES = {"CPU_ATTN": "cpu", "FLASH_ATTN": "kv_last", "TRITON_ATTN": "kv_last", "FLEX_ATTENTION": "kv_last"}


def _permute(x, order):
    return x.permute(*order) if isinstance(x, torch.Tensor) else x.transpose(order)


def _copy(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        dst[...] = src


def _views(cache, mode: str, block_size: int, heads: int, dim: int):
    """K and V of a layer's paged cache, each as a ``[block][kv_head][token_in_block][dim]`` view."""
    nb = cache.shape[0]

    def reshape(x, shape):
        return x.view(*shape) if isinstance(x, torch.Tensor) else x.reshape(shape)

    if mode == "cpu":  # per block and head: K transposed ([dim][token]), then V ([token][dim])
        k = _permute(reshape(cache, (nb, heads, 2, dim, block_size))[:, :, 0], (0, 1, 3, 2))
        v = reshape(cache, (nb, heads, 2, block_size, dim))[:, :, 1]
        return k, v
    kv = reshape(cache, (nb, heads, block_size, 2, dim))  # "kv_last": a token's K, then its V
    return kv[:, :, :, 0], kv[:, :, :, 1]


class PagedBlocks:
    """One layer's paged KV cache, copied to and from the wire layout ``[k|v][kv_head][token][dim]``."""

    def __init__(self, cache, mode: str, block_size: int, num_kv_heads: int, head_dim: int) -> None:
        self.kv = _views(cache, mode, block_size, num_kv_heads, head_dim)
        self.block_size = block_size

    def gather(self, block_ids: list[int], num_tokens: int, out) -> None:
        """Copy tokens [0, num_tokens) held in ``block_ids`` into ``out`` ([2, heads, tokens, dim])."""
        bs, full = self.block_size, num_tokens // self.block_size
        _, heads, _, dim = out.shape
        for src, dst in zip(self.kv, out):
            if full:
                _copy(dst[:, :full * bs].reshape(heads, full, bs, dim),
                      _permute(src[self._index(block_ids[:full])], (1, 0, 2, 3)))
            if num_tokens > full * bs:
                _copy(dst[:, full * bs:num_tokens], src[block_ids[full], :, :num_tokens - full * bs])

    def scatter(self, block_ids: list[int], data, first_token: int = 0) -> None:
        """Write tokens [first_token, T) of ``data`` ([2, heads, T, dim]) into ``block_ids``;
        ``first_token`` is block-aligned (the blocks before it are a local prefix hit: left alone)."""
        bs, num_tokens = self.block_size, data.shape[2]
        first, full = first_token // bs, num_tokens // bs
        _, heads, _, dim = data.shape
        for dst, src in zip(self.kv, data):
            if full > first:
                part = src[:, first * bs:full * bs].reshape(heads, full - first, bs, dim)
                dst[self._index(block_ids[first:full])] = _permute(part, (1, 0, 2, 3))
            if num_tokens > full * bs:
                dst[block_ids[full], :, :num_tokens - full * bs] = src[:, full * bs:]

    def _index(self, ids: list[int]):
        k = self.kv[0]
        return torch.tensor(ids, dtype=torch.long, device=k.device) if isinstance(k, torch.Tensor) else ids


def probe_cpu_layout(dtype: torch.dtype, block_size: int, heads: int, dim: int) -> str:
    """Check ``_views``' CPU layout against the kernel that writes the cache (its packing depends on
    the ISA it picks: AMX packs bf16 differently); return the ISA, or raise if the layout differs."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, block_size, dim)
    cache = torch.zeros(2, heads, block_size, 2 * dim, dtype=dtype)
    key_cache, value_cache = cache.view(2, heads, 2 * block_size, dim).chunk(2, dim=2)
    n = block_size + block_size // 2
    key, value = torch.randn(2, n, heads, dim).to(dtype)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(n), isa)
    out = torch.empty(2, heads, n, dim, dtype=dtype)
    PagedBlocks(cache, "cpu", block_size, heads, dim).gather([0, 1], n, out)
    if not (torch.equal(out[0], key.transpose(0, 1)) and torch.equal(out[1], value.transpose(0, 1))):
        raise ValueError(f"GswarmConnector: the CPU KV cache layout of ISA {isa!r} ({dtype}) is not supported")
    return isa
