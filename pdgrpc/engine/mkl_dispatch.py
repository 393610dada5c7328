"""Let the MKL inside PyTorch choose its kernels by CPU features instead of CPU vendor (``mkl_dispatch``).

PyTorch's CPU build links MKL, which runs torch's CPU flash attention (SDPA calls its sgemm) and
``F.linear``. MKL asks first whether the CPU is an Intel one; on any other vendor it takes generic
code paths, even where the CPU has AVX-512. On the AMD EPYC (Zen 5 class) machines measured here
that halves the speed: one core ran a [1000 x 576] x [576 x 1536] sgemm at ~100 GFLOPS, ~220 with the
vendor test answered "yes", and SDPA over 514 causal tokens in 6.9 instead of 3.5 ms. A 514-token
SmolLM2 prefill went from 724 to 616 ms, 1,000 tokens from 1562 to 1257 ms (fp32, oneDNN linears).

The answer comes from a two-function C shim (``pdgrpc/native/mkl_feature_dispatch.c``, built at
install when a C compiler is there). libtorch_cpu.so calls MKL's vendor test through its PLT, so a
definition already in the global symbol scope wins: ``enable()`` loads the shim with RTLD_GLOBAL, which
must happen before torch is imported (``build_engine`` calls it first). MKL still checks every
instruction set it uses through CPUID; only the vendor test is skipped. On Intel CPUs, other
architectures, without the shim, or once torch is loaded, nothing changes. ``check()`` compares an
MKL product with a float64 reference after torch is loaded, so a wrong kernel stops the node at start
instead of serving wrong tokens.

Both choices give float32 results; nodes compared for token-exactness use the same choice (like
``linear_kernel``).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import platform
import sys

from pdgrpc.engine import cpuinfo

log = logging.getLogger(__name__)
SHIM = "pdgrpc.native.mkl_feature_dispatch"
_state = {"enabled": False}


def cpu_vendor() -> str:
    """The CPU vendor string (``GenuineIntel``, ``AuthenticAMD``, ...) or "" where unknown."""
    return cpuinfo.vendor()


def shim_path() -> str:
    """The built shim's file, or "" where it was not built (no C compiler at install)."""
    spec = importlib.util.find_spec(SHIM)
    return spec.origin if spec is not None and spec.origin else ""


def enable() -> str:
    """Load the shim if it can change anything here; returns what happened, for the start-up log."""
    if _state["enabled"]:
        return "by CPU features (MKL's vendor test skipped)"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"MKL's own ({platform.machine()}: no vendor test to skip)"
    vendor = cpu_vendor()
    if vendor == "GenuineIntel":
        return "MKL's own (Intel CPU: already by features)"
    if "torch" in sys.modules:
        return "MKL's own (torch was loaded first, too late to change)"
    path = shim_path()
    if not path:
        return "MKL's own (the shim was not built: no C compiler at install?)"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"MKL's own (the shim did not load: {exc})"
    _state["enabled"] = True
    return f"by CPU features (MKL's vendor test skipped on this {vendor or 'unknown-vendor'} CPU)"


def enabled() -> bool:
    return _state["enabled"]


def check() -> None:
    """Raise RuntimeError when torch's MKL products are wrong (float64 reference; call after torch is
    loaded). Shapes of a linear layer and of an attention block, which take different MKL kernels."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m, k, n in ((67, 576, 192), (1, 64, 515), (128, 64, 64)):
            a = torch.randn(m, k, generator=gen)
            b = torch.randn(k, n, generator=gen)
            got = (a @ b).double()
            want = a.double() @ b.double()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if not err < 1e-5:
                raise RuntimeError(f"MKL's float32 product is off by {err:.2e} (relative) with mkl_dispatch "
                                   "'features'; start the node with mkl_dispatch 'vendor'")
        q = torch.randn(1, 3, 70, 64, generator=gen)
        got = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).double()
        want = torch.nn.functional.scaled_dot_product_attention(q.double(), q.double(), q.double(), is_causal=True)
        err = (got - want).abs().max().item()
        if not err < 1e-4:
            raise RuntimeError(f"torch's CPU attention is off by {err:.2e} with mkl_dispatch 'features'; "
                               "start the node with mkl_dispatch 'vendor'")
