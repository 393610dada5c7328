"""Big CPU buffers kept for reuse (the torch engine's decode batches, the vLLM connector's save
buffers): in this VM a fresh buffer's pages cost ~0.5 ms per MB to fault in, ten times a copy."""

from __future__ import annotations

import threading

import numpy as np
import torch


class TensorPool:
    """Big CPU buffers kept for reuse instead of freed.

    Why: a fresh buffer is fresh pages, and in this VM touching them costs ~0.5 ms per MB (a 150 MB
    decode batch: 60-100 ms to allocate, against ~14 ms to clear a warm one). Every change of the
    decode batch's membership needs a new buffer, so without reuse each one stalls every sequence
    decoding for tens of milliseconds: the tail of the inter-token latency. Small buffers and GPU
    memory (torch's caching allocator reuses those) bypass the pool.
    """

    MIN_BYTES = 1 << 20

    def __init__(self, max_free_bytes: int = 1 << 30, max_free: int = 8) -> None:
        self.max_free_bytes, self.max_free = max_free_bytes, max_free
        self._free: list[torch.Tensor] = []  # flat uint8 tensors, smallest first
        self._lock = threading.Lock()  # take/give come from the compute thread and the engine thread

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(an uninitialised tensor of ``shape``, its pooled base to ``give`` back, or None)."""
        nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
        if torch.device(device).type != "cpu" or nbytes < self.MIN_BYTES:
            return torch.empty(shape, dtype=dtype, device=device), None
        with self._lock:
            i = next((i for i, b in enumerate(self._free) if b.numel() >= nbytes), None)
            base = self._free.pop(i) if i is not None else None  # by index: == on tensors compares values
        if base is None:
            base = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8)  # room to grow into
        return base[:nbytes].view(dtype).view(shape), base

    def give(self, base: torch.Tensor | None) -> None:
        if base is None:
            return
        with self._lock:
            self._free.append(base)
            self._free.sort(key=torch.Tensor.numel)
            while len(self._free) > self.max_free or sum(b.numel() for b in self._free) > self.max_free_bytes:
                self._free.pop(0)  # keep the big ones: they are the costly ones to fault in

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)
