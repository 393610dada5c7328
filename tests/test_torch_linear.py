"""The oneDNN linear kernel of the torch engine (``pdgrpc.engine.torch_linear``): same results as
``F.linear`` to fp32 rounding, row results independent of the batch, the swap in a model, the fallback."""

from __future__ import annotations

import pytest
import torch

from pdgrpc.engine import torch_linear
from pdgrpc.engine.torch_linear import PackedLinear, kernel_works, pack_linears

pytestmark = pytest.mark.fast

needs_onednn = pytest.mark.skipif(not kernel_works(), reason="no oneDNN linear kernel in this torch build")


def _linear(n_in: int, n_out: int, bias: bool, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    return lin


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (130, 576), (2, 9, 576), (3, 1, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_to_fp32_rounding(shape, bias):
    lin = _linear(576, 1536, bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = torch.nn.functional.linear(x.double(), lin.weight.double(),
                                          None if lin.bias is None else lin.bias.double())
        got = PackedLinear(lin)(x)
        stock = lin(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    scale = want.abs().max()
    # fp32 accumulation over 576 products: both kernels land within a few ulps of float64.
    assert (got.double() - want).abs().max() / scale < 1e-5
    assert (stock.double() - want).abs().max() / scale < 1e-5


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_in,n_out", [(576, 576), (1536, 576), (576, 1536)])  # SmolLM2's shapes
def test_a_row_gets_the_same_bits_whatever_the_batch(dtype, n_in, n_out):
    """Decode batches change size as sequences come and go: a row's result must not depend on it.
    oneDNN sums 1 row (fp32) or 1-2 rows (bf16) in another order than more at K = 1536 (the MLP's
    down projection); PackedLinear pads those (MIN_ROWS). Without the padding the fp32 case fails."""
    lin = PackedLinear(_linear(n_in, n_out, False).to(dtype))
    x = torch.randn(64, 1, n_in).to(dtype)  # [rows, 1 token, features], as a decode step
    with torch.inference_mode():
        whole = lin(x)
        for rows in (1, 2, 3, 4, 17, 33):
            assert torch.equal(lin(x[:rows]), whole[:rows]), f"{rows} rows"
        assert torch.equal(lin(x[5:6]), whole[5:6])
        assert lin(x[:2]).shape == (2, 1, n_out)


@needs_onednn
def test_non_contiguous_input():
    lin = _linear(64, 32, True)
    x = torch.randn(64, 10).t()  # [10, 64], not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_linears_swaps_every_linear_and_keeps_greedy_tokens():
    from pdgrpc.engine.torch_engine import load_tiny_random

    stock, _ = load_tiny_random(torch.float32)
    packed, _ = load_tiny_random(torch.float32)
    n_linear = sum(type(m) is torch.nn.Linear for m in packed.modules())
    assert pack_linears(packed) == n_linear > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())
    ids = torch.randint(3, 500, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        a = stock(input_ids=ids).logits
        b = packed(input_ids=ids).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        gen = [m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24)[0, 40:].tolist() for m in (stock, packed)]
    assert gen[0] == gen[1]


def test_pack_linears_leaves_the_model_alone_without_the_kernel(monkeypatch):
    from pdgrpc.engine.torch_engine import load_tiny_random

    monkeypatch.setattr(torch_linear, "_op", lambda: (None, None))
    model, _ = load_tiny_random(torch.float32)
    assert not kernel_works()
    assert pack_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())


def test_pack_linears_leaves_the_model_alone_when_the_kernel_is_wrong(monkeypatch):
    """A kernel that computes something else (a broken build) fails the check at load: no swap."""
    from pdgrpc.engine.torch_engine import load_tiny_random

    reorder, linear = torch_linear._op()
    if reorder is None:
        pytest.skip("no oneDNN linear kernel in this torch build")
    monkeypatch.setattr(torch_linear, "_op", lambda: (reorder, lambda *a: linear(*a) * 1.01))
    model, _ = load_tiny_random(torch.float32)
    assert pack_linears(model) == 0


def test_engine_option_picks_the_kernel():
    from pdgrpc.engine.mock import ByteTokenizer
    from pdgrpc.engine.torch_engine import TorchEngine, load_tiny_random

    engines = {}
    for kernel in ("torch", "onednn"):
        model, config_text = load_tiny_random(torch.float32)
        engines[kernel] = TorchEngine(model, ByteTokenizer(), name="tiny-random", config_text=config_text,
                                      eos_token_ids=(2,), linear_kernel=kernel)
    try:
        assert engines["torch"].linear_kernel == "torch"
        assert any(type(m) is torch.nn.Linear for m in engines["torch"].model.modules())
        if kernel_works():
            assert engines["onednn"].linear_kernel == "onednn"
        # The fingerprint is over the weights: nodes with either kernel accept each other's KV.
        assert engines["torch"].spec.fingerprint == engines["onednn"].spec.fingerprint
    finally:
        for e in engines.values():
            e.close()
    model, config_text = load_tiny_random(torch.float32)
    with pytest.raises(ValueError, match="linear_kernel"):
        TorchEngine(model, ByteTokenizer(), name="tiny-random", config_text=config_text, linear_kernel="blas")


@needs_onednn
def test_bf16_weights_pack_too():
    lin = _linear(64, 48, True).to(torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    assert kernel_works(torch.bfloat16)
    with torch.inference_mode():
        got = PackedLinear(lin)(x)
        want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
