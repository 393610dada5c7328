"""CPU linear layers through oneDNN with prepacked weights (the torch engine's ``linear_kernel``).

PyTorch's CPU ``F.linear`` calls MKL's sgemm. On the AMD EPYC machines measured here MKL takes a
slower code path than the CPU supports: a [1000 x 576] x [576 x 1536] product ran at ~100 GFLOPS on
one core, while oneDNN (bundled with PyTorch, the library vLLM's CPU backend also uses) with the weight
reordered once into its blocked layout ran the same product at ~240 GFLOPS, and decode-sized products
(4-32 rows) 2.5-3x faster. Results stay fp32 (max relative error against float64 ~1e-6, as MKL's) and,
unlike MKL's, a row's result does not depend on how many rows are in the batch (products of 1-2 rows
are padded to 3: oneDNN sums those in another order).

``pack_linears(model)`` swaps every ``nn.Linear`` of a CPU model for a ``PackedLinear`` that holds the
reordered weight (the original weights stay reachable through other modules where they are tied,
e.g. the input embedding). It checks the kernel against ``F.linear`` first and leaves the model
alone where the kernel is missing or wrong, so a build of torch without oneDNN still runs.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_DTYPES = (torch.float32, torch.bfloat16)
MIN_ROWS = 3  # products of fewer rows are padded to this many (see PackedLinear.forward) ...
PAD_MIN_IN_FEATURES = 1024  # ... where K is this large (576 never differed; padding every layer cost ~10 %
#                             of a batch-1 decode step, these layers alone ~2-3 %)


def _op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is None or not torch.backends.mkldnn.is_available():
        return None, None
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None, None


class PackedLinear(torch.nn.Module):
    """``y = x W^T + b`` with W reordered once for oneDNN. Inference only (no autograd)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        reorder, self._linear = _op()
        if reorder is None:
            raise RuntimeError("this torch build has no oneDNN linear kernel")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._pads_small_products = self.in_features >= PAD_MIN_IN_FEATURES
        with torch.no_grad():
            w = linear.weight.detach().contiguous()
            # Kept as plain attributes: an opaque oneDNN tensor is not a parameter anyone should
            # save, hash or move (the engine fingerprints the weights before packing).
            self.packed_weight = reorder(w, None)
            self.bias = None if linear.bias is None else linear.bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        if self._pads_small_products:
            rows = x.numel() // self.in_features
            if 0 < rows < MIN_ROWS:
                # oneDNN sums a product of 1 row (fp32) or 1-2 rows (bf16) in another order than one
                # of more rows (seen at K = 1536, the MLP's down projection); padded, a decode row gets
                # the same bits alone as in a batch, which keeps disaggregated = colocated when they
                # batch differently (bf16 parted at token 17 without it). A batch-1 step: ~2-3 % more.
                flat = x.reshape(rows, self.in_features)
                padded = torch.cat([flat, flat.new_zeros(MIN_ROWS - rows, self.in_features)])
                out = self._linear(padded, self.packed_weight, self.bias, "none", [], "")[:rows]
                return out.reshape(*x.shape[:-1], self.out_features)
        return self._linear(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, onednn"


def kernel_works(dtype: torch.dtype = torch.float32) -> bool:
    """True when the oneDNN kernel exists here and agrees with ``F.linear`` (shapes of a decode step
    and of a prefill, with and without bias)."""
    if _op()[0] is None:
        return False
    gen = torch.Generator().manual_seed(0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    try:
        for rows, bias in ((1, False), (5, True), (67, False)):
            lin = torch.nn.Linear(48, 40, bias=bias)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(40, 48, generator=gen) / 7)
                if bias:
                    lin.bias.copy_(torch.randn(40, generator=gen))
            lin = lin.to(dtype)
            x = torch.randn(2, rows, 48, generator=gen).to(dtype)
            with torch.inference_mode():
                want = torch.nn.functional.linear(x.float(), lin.weight.float(),
                                                  None if lin.bias is None else lin.bias.float())
                got = PackedLinear(lin)(x).float()
            if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
                return False
    except RuntimeError as exc:
        log.warning("oneDNN linear kernel failed its check: %s", exc)
        return False
    return True


def pack_linears(model: torch.nn.Module) -> int:
    """Swap the model's ``nn.Linear`` modules for ``PackedLinear``; returns how many were swapped
    (0 where the model is not on the CPU, its dtype is not fp32/bf16, or the kernel fails its check)."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    if not linears:
        return 0
    w = linears[0][1].weight
    if w.device.type != "cpu" or w.dtype not in _DTYPES:
        return 0
    if not kernel_works(w.dtype):
        log.warning("oneDNN linear kernel unavailable or wrong here; keeping torch's F.linear")
        return 0
    for name, m in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(m))
    return len(linears)
