"""MKL's kernels chosen by CPU features (pdgrpc.engine.mkl_dispatch): the shim takes effect only when
loaded before torch, through the engine's own start path, and a wrong kernel is caught at start.

Which code path MKL took is read from MKL_VERBOSE, which names it on its first line; these tests run
in fresh interpreters, since the test process itself loaded the shim at start (conftest)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pdgrpc.engine import cpuinfo, mkl_dispatch

pytestmark = pytest.mark.fast


AMD_WITH_AVX512 = mkl_dispatch.cpu_vendor() == "AuthenticAMD" and "avx512f" in cpuinfo.flags()
needs_amd_avx512 = pytest.mark.skipif(not AMD_WITH_AVX512, reason="needs an AMD CPU with AVX-512")

# Builds the torch engine as a node does (registry.build_engine), then one MKL product under MKL_VERBOSE.
_NODE_START = """
import logging, sys
logging.basicConfig(level="INFO", stream=sys.stderr)
from pdgrpc.engine.base import EngineOptions
from pdgrpc.engine.registry import build_engine
engine = build_engine(EngineOptions(name="torch", model="tiny-random", threads=1, mkl_dispatch=sys.argv[1]))
import torch  # noqa: E402 -- loaded by the engine already
a = torch.randn(64, 64)
with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
    a @ a
engine.close()
"""


def _start(how: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", _NODE_START, how], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _mkl_path(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("MKL_VERBOSE oneMKL"))


@needs_amd_avx512
def test_features_gives_mkl_its_avx512_path_on_amd_and_vendor_keeps_the_generic_one():
    features, vendor = _start("features"), _start("vendor")
    assert "AVX-512" in _mkl_path(features.stdout)
    assert "MKL kernels: by CPU features" in features.stderr
    assert "AVX-512" not in _mkl_path(vendor.stdout)
    assert "MKL kernels: MKL's own (mkl_dispatch 'vendor')" in vendor.stderr


def test_too_late_once_torch_is_loaded():
    code = ("import torch, sys; from pdgrpc.engine import mkl_dispatch as m; "
            "print(m.enable()); print(m.enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    if AMD_WITH_AVX512:
        assert out.splitlines() == ["MKL's own (torch was loaded first, too late to change)", "False"]
    else:
        assert out.splitlines()[-1] == "False" or mkl_dispatch.cpu_vendor() not in ("GenuineIntel", "")


def test_check_passes_here_and_catches_a_wrong_product_or_attention(monkeypatch):
    mkl_dispatch.check()
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",  # float32 off by 0.1 %, the float64 reference exact
                        lambda a, b: real(a, b) * (1.001 if a.dtype == torch.float32 else 1.0))
    with pytest.raises(RuntimeError, match="product is off"):
        mkl_dispatch.check()
    monkeypatch.undo()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def off(q, k, v, **kw):
        out = sdpa(q, k, v, **kw)
        return out + 0.01 if out.dtype == torch.float32 else out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", off)
    with pytest.raises(RuntimeError, match="attention is off"):
        mkl_dispatch.check()
