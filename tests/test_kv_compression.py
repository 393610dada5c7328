"""Opt-in int8 KV compression (pdgrpc.transfer.compression): sizes, error bounds, dtypes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdgrpc.errors import DataLoss, InvalidArgument
from pdgrpc.transfer import compression as kvc

pytestmark = pytest.mark.fast


def _kv(layers, heads, tokens, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.rand(layers, 2, heads, tokens, 1, generator=gen) * 8 - 4)
    x = (torch.randn(layers, 2, heads, tokens, dim, generator=gen) * scale).to(dtype)
    return x, x.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_within_half_a_step_of_each_vectors_scale(dtype):
    x, raw = _kv(3, 2, 17, 64, dtype)
    name = str(dtype).removeprefix("torch.")
    blob = kvc.compress(raw, name, 3, 2, 17, 64)
    assert len(blob) == kvc.compressed_nbytes(3, 2, 17, 64) == 24 + 3 * 2 * 2 * 17 * (4 + 64)
    back = torch.frombuffer(kvc.decompress(blob), dtype=dtype).reshape(x.shape).float()
    exact = x.float()
    step = exact.abs().amax(dim=-1, keepdim=True) / 127
    # Half a quantization step, plus the destination dtype's own rounding of the result.
    rounding = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert bool(((back - exact).abs() <= step / 2 * (1 + 1e-5) + exact.abs() * rounding + 1e-30).all())
    assert kvc.raw_nbytes(blob) == len(raw)


def test_fp32_is_3_8x_smaller_and_zero_vectors_stay_zero():
    raw = np.zeros((1, 2, 3, 5, 64), dtype=np.float32)
    raw[0, 1, 2, 4] = np.linspace(-1, 1, 64)
    blob = kvc.compress(raw.tobytes(), "float32", 1, 3, 5, 64)
    assert len(raw.tobytes()) / len(blob) > 3.7
    back = np.frombuffer(kvc.decompress(blob), dtype=np.float32).reshape(raw.shape)
    assert not back[0, 0].any() and np.abs(back[0, 1, 2, 4] - raw[0, 1, 2, 4]).max() <= 1 / 254 + 1e-7


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 3), heads=st.integers(1, 3), tokens=st.integers(1, 9), dim=st.sampled_from([1, 8, 64]),
       dtype=st.sampled_from(["float32", "bfloat16"]), seed=st.integers(0, 10**6))
def test_drawn_groups_round_trip_into_a_destination(layers, heads, tokens, dim, dtype, seed):
    x, raw = _kv(layers, heads, tokens, dim, getattr(torch, dtype), seed)
    blob = kvc.compress(raw, dtype, layers, heads, tokens, dim)
    out = bytearray(len(raw))
    kvc.decompress_into(blob, memoryview(out))
    assert kvc.parse_header(blob) == (dtype, layers, heads, tokens, dim)
    back = torch.frombuffer(out, dtype=getattr(torch, dtype)).float().reshape(x.shape)
    assert torch.allclose(back, x.float(), rtol=0.02, atol=float(x.float().abs().max()) / 100)


def test_bad_input_is_refused_with_its_status():
    _, raw = _kv(1, 1, 2, 8, torch.float32)
    with pytest.raises(InvalidArgument, match="does not match"):
        kvc.compress(raw[:-4], "float32", 1, 1, 2, 8)
    with pytest.raises(InvalidArgument, match="takes"):
        kvc.compress(raw, "int4", 1, 1, 2, 8)
    blob = kvc.compress(raw, "float32", 1, 1, 2, 8)
    for bad in (b"", blob[:10], b"XXXX" + blob[4:], blob[:-1], blob + b"\0"):
        with pytest.raises(DataLoss):
            kvc.decompress(bad)
    with pytest.raises(InvalidArgument, match="destination"):
        kvc.decompress_into(blob, memoryview(bytearray(len(raw) - 1)))
