"""The torch engine's linear layers: two kernels, and a layer whose row results do not depend on the batch.

Why. A decode step multiplies one row per sequence by every weight. GEMM libraries choose their
code path, and with it the order in which a row's products are summed, by the number of rows. So
the same sequence gets other bits in a step of 1 row than in a step of 9, its greedy tokens part
from those it gets alone, and a disaggregated cluster (batches formed by the decode node) stops
matching a colocated one (batches formed there). Seen on the CPUs of this project's machines:
MKL's sgemm (``F.linear`` in fp32) sums 1-3 rows otherwise than 4 or more on an AMD EPYC Zen 4;
oneDNN sums 1 row (fp32) or 1-2 rows (bf16) otherwise at K = 1536 there, and its bf16 kernels on an
Intel Sapphire Rapids switch again between 17 and 33 rows.

How (fixed row blocks with per-shape padding found at load; vLLM's batch-invariant mode and SGLang's
deterministic inference fix one tile configuration for every M on GPUs to the same end):
  - a product of m <= ROW_BLOCK rows is computed as ``pad[m]`` rows, zeros below the m real ones,
    where ``pad[m]`` is the fewest rows >= m whose results equal those of a full block (found at
    load by ``torch_kernel_plan``, per kernel, shape and dtype, and then checked);
  - a product of more rows with one token per row (a decode step of a big batch) runs in blocks of
    ROW_BLOCK rows, each padded the same way;
  - a product with several tokens per row (a prefill: one prompt per forward in this engine) runs as
    it is: its rows depend on that prompt alone.
Every decode row is thus computed as in a full block, whatever else is in the batch. ``RowPlan(1,
(1,))`` (each row alone) is the last resort where no padding makes a kernel invariant.

Kernels (``KERNELS``): "torch" is ``F.linear`` (MKL or oneDNN inside torch, cuBLAS on CUDA); "onednn"
multiplies by a weight reordered once into oneDNN's blocked layout (CPU only; the library vLLM's
CPU backend uses; 2-3x faster than MKL for decode-sized products on AMD, slower on Intel in bf16).
Which one serves each shape is measured at load (``torch_kernel_plan``), never assumed.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

log = logging.getLogger(__name__)
ROW_BLOCK = 32  # rows of the reference block; decode products of more rows run in blocks of it


@dataclass(frozen=True)
class RowPlan:
    """How many rows a product of m rows is computed as: ``pad[m - 1]`` (m <= block), blocks beyond."""

    block: int
    pad: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.pad) != self.block or any(not m <= p <= self.block for m, p in enumerate(self.pad, 1)):
            raise ValueError(f"bad row plan: block {self.block}, pad {self.pad}")

    @classmethod
    def unpadded(cls, block: int = ROW_BLOCK) -> RowPlan:
        return cls(block, tuple(range(1, block + 1)))

    def describe(self) -> str:
        if self.block == 1:
            return "each row alone"
        small = [f"{m}->{p}" for m, p in enumerate(self.pad[:8], 1) if p != m]
        large = sorted({p for m, p in enumerate(self.pad, 1) if m > 8 and p != m})
        parts = ([f"pad {' '.join(small)}"] if small else []) + (
            [f"products of 9+ rows padded to {'/'.join(map(str, large))}"] if large else [])
        return f"blocks of {self.block}, " + (", ".join(parts) or "no padding")


class LinearKernel(abc.ABC):
    """``y = x W^T + b`` for 2-D ``x``; built once per layer from its weight. Inference only."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why this kernel cannot run here (None: it can)."""

    @abc.abstractmethod
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None: ...

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TorchKernel(LinearKernel):
    name = "torch"

    @classmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        return None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight  # the layer's own tensor (tied weights stay shared)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def _onednn_ops():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is None or not torch.backends.mkldnn.is_available():
        return None, None
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None, None


class OneDNNKernel(LinearKernel):
    name = "onednn"
    _why_not: ClassVar[dict[torch.dtype, str | None]] = {}

    @classmethod
    def unavailable(cls, dtype: torch.dtype, device: torch.device) -> str | None:
        if device.type != "cpu":
            return "oneDNN's prepacked linear runs on the CPU only"
        if dtype not in (torch.float32, torch.bfloat16):
            return f"no oneDNN prepacked linear for {dtype}"
        if dtype not in cls._why_not:
            cls._why_not[dtype] = cls._probe(dtype)
        return cls._why_not[dtype]

    @classmethod
    def _probe(cls, dtype: torch.dtype) -> str | None:
        """A small product against F.linear in float32: the kernel exists here and computes the right thing."""
        if _onednn_ops()[0] is None:
            return "this torch build has no oneDNN linear kernel"
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(40, 48, generator=gen) / 7).to(dtype)
        b = torch.randn(40, generator=gen).to(dtype)
        x = torch.randn(5, 48, generator=gen).to(dtype)
        try:
            with torch.inference_mode():
                got = cls(w, b)(x).float()
        except RuntimeError as exc:  # e.g. bf16 on an AVX2-only CPU: oneDNN refuses the reorder
            return f"oneDNN refused it: {str(exc).splitlines()[0]}"
        want = torch.nn.functional.linear(x.float(), w.float(), b.float())
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
            return "oneDNN's result disagrees with F.linear (a broken build?)"
        return None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        reorder, self._linear = _onednn_ops()
        if reorder is None:
            raise RuntimeError("this torch build has no oneDNN linear kernel")
        with torch.no_grad():
            # Kept as a plain attribute: an opaque oneDNN tensor is not a parameter anyone should
            # save, hash or move (the engine fingerprints the weights before the swap).
            self.packed_weight = reorder(weight.detach().contiguous(), None)
        self.bias = None if bias is None else bias.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.packed_weight, self.bias, "none", [], "")


KERNELS: dict[str, type[LinearKernel]] = {k.name: k for k in (OneDNNKernel, TorchKernel)}


def kernel_unavailable(name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> str | None:
    if name not in KERNELS:
        return f"unknown linear kernel {name!r}"
    return KERNELS[name].unavailable(dtype, torch.device(device))


class PlannedLinear(torch.nn.Module):
    """An ``nn.Linear`` replaced by a kernel and the row plan that makes its rows batch-invariant."""

    def __init__(self, in_features: int, out_features: int, kernel: LinearKernel, plan: RowPlan) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.plan = plan

    @classmethod
    def of(cls, linear: torch.nn.Linear, kernel: str, plan: RowPlan | None = None) -> PlannedLinear:
        with torch.no_grad():
            k = KERNELS[kernel](linear.weight, linear.bias)
        return cls(linear.in_features, linear.out_features, k, plan or RowPlan.unpadded())

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        """At most ``plan.block`` rows, computed as ``pad`` rows."""
        rows = flat.shape[0]
        want = self.plan.pad[rows - 1]
        if want == rows:
            return self.kernel(flat)
        padded = torch.cat([flat, flat.new_zeros(want - rows, self.in_features)])
        return self.kernel(padded)[:rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        block = self.plan.block
        if rows == 0:
            out = self.kernel(flat)
        elif rows <= block:
            out = self._rows(flat)
        elif x.dim() < 3 or x.shape[-2] == 1:  # one token per row: a decode step of more than a block
            out = torch.cat([self._rows(flat[i:i + block]) for i in range(0, rows, block)])
        else:  # a prompt's tokens: its rows depend on that prompt only
            out = self.kernel(flat)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.kernel.bias is not None}, kernel={self.kernel.name}, {self.plan.describe()}")
