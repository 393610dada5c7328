"""KV cache plumbing for the torch engine: the wire layout and the decode batch.

Wire layout of a KVGroup: ``[layer][k|v][kv_head][token][head_dim]``, contiguous, model dtype
(bfloat16 as its raw 2-byte values).

Decode: each sequence's KV lives in exactly one place. Before it first decodes (and whenever it
is left out of a step) it is its own tensor ``[L, 2, H, T, D]``; while it is a member of the
current ``DecodeBatch`` it is a row of the batch buffer ``[L, 2, B, H, cap, D]``, left-padded so
every row's newest token sits in the same column. A step writes the new K/V column in place
(``BufferLayer``), so steps with an unchanged membership copy no cache at all. When the membership
changes the batch is rebuilt: one copy of each member's KV into the new buffer, and one copy out
for sequences that left the batch but are still alive.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from pdgrpc.engine.base import DecodeWork, KVGroup
from pdgrpc.engine.tensor_pool import TensorPool
from pdgrpc.errors import InvalidArgument


def kv_group_nbytes(cache: Cache, layer_start: int, layer_end: int, dtype: torch.dtype) -> int:
    _, heads, tokens, dim = cache.layers[layer_start].keys.shape
    return (layer_end - layer_start) * 2 * heads * tokens * dim * torch.tensor([], dtype=dtype).element_size()


def kv_group_bytes(cache: Cache, layer_start: int, layer_end: int, dtype: torch.dtype,
                   out: memoryview | None = None) -> bytearray | memoryview:
    """Layers [layer_start, layer_end) of a batch-1 cache as wire bytes (one copy, device -> host),
    into ``out`` when given (e.g. a region of the store's shm arena), else into a new bytearray."""
    k0 = cache.layers[layer_start].keys
    _, heads, tokens, dim = k0.shape
    layers = layer_end - layer_start
    if out is None:
        out = bytearray(kv_group_nbytes(cache, layer_start, layer_end, dtype))
    dst = torch.frombuffer(out, dtype=dtype).view(layers, 2, heads, tokens, dim)
    for i in range(layers):
        layer = cache.layers[layer_start + i]
        dst[i, 0].copy_(layer.keys[0])
        dst[i, 1].copy_(layer.values[0])
    return out


def kv_group_tensor(cache: Cache, layer_start: int, layer_end: int) -> torch.Tensor:
    """Layers [layer_start, layer_end) of a batch-1 cache in the wire layout, on the cache's device
    (a GPU engine publishes this by CUDA IPC instead of copying to host)."""
    return torch.stack([torch.stack((cache.layers[i].keys[0], cache.layers[i].values[0]))
                        for i in range(layer_start, layer_end)]).contiguous()


def group_nbytes(data) -> int:
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    return memoryview(data).nbytes


def kv_from_bytes(group: KVGroup, dtype: torch.dtype, heads: int, dim: int) -> torch.Tensor:
    """A read-only view [layers, 2, heads, tokens, dim] of a group's bytes (no copy; copy it before use).
    A group that already is a tensor (CUDA IPC) is viewed as it is."""
    layers = group.layer_end - group.layer_start
    tokens = group.token_end - group.token_start
    data = group.data
    if isinstance(data, torch.Tensor):
        return data.view(dtype).view(layers, 2, heads, tokens, dim)
    nbytes = memoryview(data).nbytes
    with warnings.catch_warnings():  # bytes are read-only; we only read from the view
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(data, dtype=torch.uint8, count=nbytes) if nbytes else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).view(layers, 2, heads, tokens, dim)


class BufferLayer(DynamicLayer):
    """A cache layer over preallocated [B, H, cap, D] buffers: update() writes in place, no concatenation."""

    _layer_type = None  # never auto-register in transformers' layer mappings

    def __init__(self, k_buf: torch.Tensor, v_buf: torch.Tensor, length: int) -> None:
        super().__init__()
        self.k_buf, self.v_buf, self.length = k_buf, v_buf, length
        self.device = k_buf.device
        self.keys = k_buf[:, :, :length]
        self.values = v_buf[:, :, :length]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        if end > self.k_buf.shape[-2]:
            raise RuntimeError(f"decode buffer full ({end} > {self.k_buf.shape[-2]})")
        self.k_buf[:, :, self.length:end].copy_(key_states)
        self.v_buf[:, :, self.length:end].copy_(value_states)
        self.length = end
        self.keys = self.k_buf[:, :, :end]
        self.values = self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass(eq=False)
class SequenceState:
    """One decoding sequence (engine-owned; nodes only pass it back)."""

    serial: int
    work: DecodeWork
    prompt_len: int
    kv: torch.Tensor | None = None          # own storage [L, 2, H, T, D] when not in a batch
    kv_base: torch.Tensor | None = None     # kv's buffer when it came from the TensorPool
    covered: np.ndarray | None = None       # [L, prompt_len] bool while KV is loading
    length: int = 0                         # tokens in the cache
    last_token: int = -1                    # fed at the next step, at position `length`
    ready: bool = False
    freed: bool = False
    batch: DecodeBatch | None = None
    row: int = -1
    filling: int = 0                        # kv_destination buffers handed out, not yet written


class DecodeBatch:
    """The left-padded KV of the sequences decoded together, grown in place step by step.

    Membership changes are incremental where they can be: a sequence that leaves has the last row
    moved into its place (one row copied), a sequence no longer than the batch joins in a spare row
    (its own KV copied, left-padded). Only a longer newcomer, a full buffer or much padding left by
    long sequences that finished needs a new batch (every row copied): with KV of hundreds of MB,
    that copy stalls every decoding sequence for tens of milliseconds.
    """

    SPARE_ROWS = 4  # rows for newcomers; unused rows cost address space, not memory, until written

    def __init__(self, seqs: list[SequenceState], layers: int, heads: int, dim: int, dtype: torch.dtype,
                 device: torch.device, pool: TensorPool, *, zero_padding: bool = True, min_length: int = 0) -> None:
        self.seqs = list(seqs)
        # Columns in use (the common padded length). Where the padding is never written (not
        # zero_padding) it costs address space only, so a batch may start ``min_length`` wide: a
        # prompt up to that long then joins in a spare row instead of every row being copied into a
        # new, wider buffer (whose fresh pages fault in at ~0.5 ms/MB here: a 50-200 ms step).
        self.length = max(max(s.length for s in seqs), 0 if zero_padding else min_length)
        self.pool = pool
        # Whether attention reads the padding (masked, but NaN * 0 is NaN: it must hold zeros). Not
        # with torch_attention on CPU: each row attends to the columns it holds (held_columns), and
        # the padding, up to a long prompt's length times the rows, is never written at all.
        self.zero_padding = zero_padding
        cap = self._capacity(self.length)
        rows = len(seqs) + self.SPARE_ROWS
        # Uninitialised (pooled); columns past `length` are written by each step before anything reads them.
        self.buf, self._base = pool.take((layers, 2, rows, heads, cap, dim), dtype, device)
        self.mask = torch.ones(rows, cap, dtype=torch.long, device=device)
        for row, s in enumerate(self.seqs):
            self._fill_row(row, kv_view(s))
        self._update_padded()

    @staticmethod
    def _capacity(length: int) -> int:
        return length + max(32, length // 4)

    @property
    def members(self) -> frozenset[int]:
        return frozenset(s.serial for s in self.seqs)

    @property
    def rows(self) -> int:
        return self.buf.shape[2]

    def _fill_row(self, row: int, kv: torch.Tensor) -> None:
        """Row ``row`` holds ``kv`` ([L, 2, H, T, D], T <= length) right-aligned, zeros before it
        where attention reads the padding."""
        pad = self.length - kv.shape[-2]
        if self.zero_padding:
            self.buf[:, :, row, :, :pad].zero_()
        self.buf[:, :, row, :, pad:self.length].copy_(kv)
        self.mask[row].fill_(1)
        self.mask[row, :pad] = 0

    def _kept_from(self, seq: SequenceState) -> int:
        """The first column of ``seq``'s row worth keeping when the row is copied: its own KV, and its
        zeros before that where attention reads the padding."""
        return 0 if self.zero_padding else self.length - seq.length

    def _update_padded(self) -> None:
        self.padded = any(s.length != self.length for s in self.seqs)

    def can_add(self, seq: SequenceState, spare: int) -> bool:
        return seq.length <= self.length and len(self.seqs) + spare <= self.rows

    def add(self, seq: SequenceState) -> None:
        """Put a sequence that holds its own KV (``seq.kv``) into the next free row."""
        row = len(self.seqs)
        self._fill_row(row, kv_view(seq))
        self.seqs.append(seq)
        seq.batch, seq.row = self, row
        self._update_padded()

    def remove(self, seq: SequenceState) -> None:
        """Drop a member's row (its KV is gone from the batch: copy it out first if it is still needed)."""
        row, last = seq.row, len(self.seqs) - 1
        if row != last:  # the last row moves into the hole: one row copied, the batch stays dense
            moved = self.seqs[last]
            start = self._kept_from(moved)
            self.buf[:, :, row, :, start:self.length].copy_(self.buf[:, :, last, :, start:self.length])
            self.mask[row].copy_(self.mask[last])
            self.seqs[row], moved.row = moved, row
        self.seqs.pop()
        seq.batch, seq.row = None, -1
        self._update_padded()

    def ensure_room(self, extra: int = 1) -> None:
        if self.length + extra <= self.buf.shape[-2]:
            return
        cap = self._capacity(self.length + extra)
        b = len(self.seqs)
        buf, base = self.pool.take((*self.buf.shape[:-2], cap, self.buf.shape[-1]), self.buf.dtype, self.buf.device)
        for row, s in enumerate(self.seqs):
            start = self._kept_from(s)
            buf[:, :, row, :, start:self.length].copy_(self.buf[:, :, row, :, start:self.length])
        mask = torch.ones(self.mask.shape[0], cap, dtype=self.mask.dtype, device=self.mask.device)
        mask[:b, :self.length].copy_(self.mask[:b, :self.length])
        self.pool.give(self._base)
        self.buf, self.mask, self._base = buf, mask, base

    def cache(self) -> Cache:
        b = len(self.seqs)
        return Cache(layers=[BufferLayer(self.buf[i, 0, :b], self.buf[i, 1, :b], self.length)
                             for i in range(self.buf.shape[0])])

    def attention_mask(self) -> torch.Tensor | None:
        """[B, length + 1] for the step about to run, or None when no row is padded."""
        return self.mask[:len(self.seqs), :self.length + 1] if self.padded else None

    def release(self) -> None:
        self.buf = self.mask = None  # type: ignore[assignment]
        self.pool.give(self._base)
        self._base = None
        self.seqs = []


def kv_view(seq: SequenceState) -> torch.Tensor:
    """[L, 2, H, length, D] view of a sequence's KV, wherever it lives."""
    b = seq.batch
    if b is not None:
        pad = b.length - seq.length
        return b.buf[:, :, seq.row, :, pad:b.length]
    assert seq.kv is not None
    return seq.kv[..., :seq.length, :]


def check_layout(layers: tuple[int, int], tokens: tuple[int, int], size: int, seq: SequenceState,
                 num_layers: int, expected_bytes: int) -> None:
    """A KV group's layer and token ranges fit the model and the prompt, and its size their layout."""
    if not (0 <= layers[0] < layers[1] <= num_layers):
        raise InvalidArgument(f"KV group layers [{layers[0]}, {layers[1]}) outside [0, {num_layers})")
    if not (0 <= tokens[0] < tokens[1] <= seq.prompt_len):
        raise InvalidArgument(f"KV group tokens [{tokens[0]}, {tokens[1]}) outside the prompt [0, {seq.prompt_len})")
    if size != expected_bytes:
        raise InvalidArgument(f"KV group has {size} bytes, its layout says {expected_bytes}")


def check_group(group: KVGroup, seq: SequenceState, num_layers: int, expected_bytes: int) -> None:
    try:
        size = group_nbytes(group.data)
    except TypeError:
        raise InvalidArgument("KV group data is not a bytes-like buffer") from None
    check_layout((group.layer_start, group.layer_end), (group.token_start, group.token_end), size, seq,
                 num_layers, expected_bytes)
