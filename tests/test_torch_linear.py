"""The torch engine's linear layers (``torch_linear``) and their choice at load (``torch_kernel_plan``).

Nothing here assumes what a CPU does: each kernel that runs here is either checked batch-invariant
(and then re-checked here on other inputs and more rows) or rejected with its reason, and at least
one kernel must pass for SmolLM2's shapes in both dtypes, or the test fails naming what failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pdgrpc.engine import torch_kernel_plan as kp
from pdgrpc.engine import torch_linear
from pdgrpc.engine.torch_linear import KERNELS, ROW_BLOCK, PlannedLinear, RowPlan, kernel_unavailable

pytestmark = pytest.mark.fast
SMOL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]  # q/o, k/v, gate/up, down
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _plans_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PDGRPC_KERNEL_PLAN_DIR", str(tmp_path / "plans"))


def _linear(n_in: int, n_out: int, bias: bool = False, dtype: torch.dtype = torch.float32,
            seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3.0)
    return lin.to(dtype)


def _available(dtype: torch.dtype) -> list[str]:
    return [k for k in KERNELS if kernel_unavailable(k, dtype) is None]


def _assert_rows_independent_of_batch(layer: PlannedLinear, n_in: int, dtype: torch.dtype, rows: int = 64) -> None:
    """Inputs unlike the load check's (another seed, heavy tails), products of 1..rows rows."""
    gen = torch.Generator().manual_seed(12345)
    x = (torch.randn(rows + 5, 1, n_in, generator=gen) * torch.rand(rows + 5, 1, 1, generator=gen) * 4).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([layer(x[i:i + 1]) for i in range(rows + 5)])
        for m in range(1, rows + 1):
            for s in {0, (3 * m) % 6}:
                assert torch.equal(layer(x[s:s + m]), alone[s:s + m]), f"{layer}: a {m}-row product at row {s}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n_in,n_out", SMOL_SHAPES)
def test_each_kernel_is_invariant_as_planned_or_rejected_and_one_passes(dtype, n_in, n_out):
    """The property the engine's exactness rests on, on whatever CPU this runs: a kernel the check
    passes gives a row the same bits in every batch (re-checked here up to 64 rows, past the block),
    and for every SmolLM2 shape at least one kernel passes, or this fails saying why each was rejected."""
    lin = _linear(n_in, n_out, dtype=dtype)
    passed, why_not = [], {}
    for name in KERNELS:
        why = kernel_unavailable(name, dtype)
        if why is None:
            layer, why = kp.check_layer(lin, name, max_batch=48)
            if layer is not None:
                _assert_rows_independent_of_batch(layer, n_in, dtype)
                passed.append(name)
                continue
        why_not[name] = why
    assert passed, f"no batch-invariant linear kernel for {n_in}x{n_out} {dtype} on this CPU: {why_not}"


@pytest.mark.parametrize("shape", [(1, 576), (7, 576), (130, 576), (2, 9, 576), (3, 1, 576), (40, 1, 576)])
@pytest.mark.parametrize("bias", [False, True])
def test_planned_linear_equals_f_linear_to_fp32_rounding(shape, bias):
    lin = _linear(576, 1536, bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = torch.nn.functional.linear(x.double(), lin.weight.double(),
                                          None if lin.bias is None else lin.bias.double())
        for name in _available(torch.float32):
            layer, why = kp.check_layer(lin, name, max_batch=8)
            assert layer is not None, why
            got = layer(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            # fp32 accumulation over 576 products: every kernel lands within a few ulps of float64.
            assert (got.double() - want).abs().max() / want.abs().max() < 1e-5, name


def test_bf16_layers_keep_their_dtype():
    lin = _linear(64, 48, True, torch.bfloat16)
    x = torch.randn(5, 64).to(torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    for name in _available(torch.bfloat16):
        with torch.inference_mode():
            got = PlannedLinear.of(lin, name)(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_non_contiguous_input():
    lin = _linear(64, 32, True)
    x = torch.randn(64, 10).t()  # [10, 64], not contiguous
    with torch.inference_mode():
        for name in _available(torch.float32):
            torch.testing.assert_close(PlannedLinear.of(lin, name)(x), lin(x), rtol=1e-5, atol=1e-5)


# ---- the plan on kernels that misbehave on purpose ------------------------------------------

class _SmallProductsSumOtherwise(torch_linear.TorchKernel):
    """Products of fewer than 5 rows sum in another order (float64 then rounded), as GEMV paths do."""

    name = "torch"

    def __call__(self, x):
        if x.shape[0] < 5:
            return torch.nn.functional.linear(x.double(), self.weight.double()).to(x.dtype)
        return super().__call__(x)


class _RowPositionMatters(torch_linear.TorchKernel):
    """The last row of every product of 2+ rows sums otherwise: no padding fixes that."""

    name = "torch"

    def __call__(self, x):
        out = super().__call__(x)
        if x.shape[0] > 1:
            out[-1] = torch.nn.functional.linear(x[-1:].double(), self.weight.double()).to(x.dtype)[0]
        return out


class _Noisy(torch_linear.TorchKernel):
    """Different bits on every call: nothing makes it invariant."""

    name = "torch"

    def __call__(self, x):
        return super().__call__(x) * (1 + torch.rand(()) * 1e-6)


def test_discover_plan_pads_small_products_to_the_first_size_that_sums_as_a_block():
    k = _SmallProductsSumOtherwise(_linear(96, 40).weight, None)
    x = torch.randn(ROW_BLOCK, 96)
    plan = kp.discover_plan(k, x)
    assert plan.pad[:5] == (5, 5, 5, 5, 5) and plan.pad[5:8] == (6, 7, 8)
    assert set(plan.pad) <= set(kp.PAD_SIZES) and all(p >= m for m, p in enumerate(plan.pad, 1))
    assert "pad 1->5 2->5 3->5 4->5" in plan.describe()


@pytest.mark.parametrize("kernel,plan_text", [(_SmallProductsSumOtherwise, "pad 1->5"),
                                              (_RowPositionMatters, "each row alone")])
def test_check_layer_finds_a_plan_that_makes_a_bad_kernel_invariant(monkeypatch, kernel, plan_text):
    monkeypatch.setitem(KERNELS, "torch", kernel)
    lin = _linear(96, 40)
    layer, why = kp.check_layer(lin, "torch", max_batch=40)
    assert why is None and plan_text in layer.plan.describe()
    _assert_rows_independent_of_batch(layer, 96, torch.float32, rows=40)


def test_a_kernel_nothing_makes_invariant_is_rejected_and_the_report_says_so(monkeypatch):
    """The node must say so, not serve by luck: report.invariant False, and what failed."""
    from pdgrpc.engine.torch_engine import load_tiny_random

    monkeypatch.setitem(KERNELS, "torch", _Noisy)
    monkeypatch.setattr(torch_linear.OneDNNKernel, "unavailable", classmethod(lambda cls, d, dev: "switched off"))
    model, _ = load_tiny_random(torch.float32)
    report = kp.plan_linears(model, max_batch=8)
    assert not report.invariant
    assert "NOT batch-invariant" in report.summary() and "differ from the same row" in report.summary()
    assert all(c.rejected == {"onednn": "switched off", "torch": c.rejected["torch"]} for c in report.choices)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())  # it still serves


def test_a_wrong_kernel_is_rejected(monkeypatch):
    class Wrong(torch_linear.TorchKernel):
        def __call__(self, x):
            return super().__call__(x) * 1.01

    monkeypatch.setitem(KERNELS, "torch", Wrong)
    layer, why = kp.check_layer(_linear(64, 48), "torch", max_batch=4)
    assert layer is None and "off by" in why


def test_without_onednn_the_plan_uses_torch_and_a_forced_onednn_falls_back(monkeypatch, caplog):
    from pdgrpc.engine.torch_engine import load_tiny_random

    monkeypatch.setattr(torch_linear, "_onednn_ops", lambda: (None, None))
    monkeypatch.setattr(torch_linear.OneDNNKernel, "_why_not", {})
    assert "no oneDNN" in kernel_unavailable("onednn", torch.float32)
    model, _ = load_tiny_random(torch.float32)
    report = kp.plan_linears(model, max_batch=4)
    assert report.kernels == ["torch"] and report.invariant
    assert all("no oneDNN" in c.rejected["onednn"] for c in report.choices)
    model, _ = load_tiny_random(torch.float32)
    report = kp.plan_linears(model, max_batch=4, forced="onednn")
    assert report.kernels == ["torch"] and "cannot run here" in caplog.text


# ---- the cache: one choice per machine -------------------------------------------------------

def test_the_choice_is_cached_and_checked_again(tmp_path, monkeypatch):
    from pdgrpc.engine.torch_engine import load_tiny_random

    model, _ = load_tiny_random(torch.float32)
    first = kp.plan_linears(model, max_batch=8)
    assert first.source == "measured" and first.invariant and first.choices[0].timings_ms
    files = list((tmp_path / "plans").glob("*.json"))
    assert len(files) == 1
    model, _ = load_tiny_random(torch.float32)
    again = kp.plan_linears(model, max_batch=8)
    assert again.source.startswith("cached") and again.invariant
    assert [(c.shape, c.kernel, c.plan) for c in again.choices] == [(c.shape, c.kernel, c.plan) for c in first.choices]
    # A cached plan that no longer passes (here: padding taken away from a kernel that needs it) is measured again.
    monkeypatch.setitem(KERNELS, "torch", _SmallProductsSumOtherwise)
    monkeypatch.setattr(torch_linear.OneDNNKernel, "unavailable", classmethod(lambda cls, d, dev: "switched off"))
    data = json.loads(files[0].read_text())
    for c in data["choices"]:
        c["kernel"], c["plan"] = "torch", {"block": ROW_BLOCK, "pad": list(range(1, ROW_BLOCK + 1))}
    files[0].write_text(json.dumps(data))
    model, _ = load_tiny_random(torch.float32)
    redone = kp.plan_linears(model, max_batch=8)
    assert redone.source == "measured" and redone.invariant
    assert all(c.kernel == "torch" and c.plan.pad[0] >= 5 for c in redone.choices)
    files[0].write_text("{not json")
    model, _ = load_tiny_random(torch.float32)
    assert kp.plan_linears(model, max_batch=8).source == "measured"


def test_processes_of_one_host_make_the_same_choice(tmp_path):
    code = ("import json; from pdgrpc.engine.base import EngineOptions; from pdgrpc.engine.registry import "
            "build_engine; e = build_engine(EngineOptions(name='torch', model='tiny-random', threads=1)); "
            "print(json.dumps([[c.shape, c.kernel, list(c.plan.pad)] for c in e.kernel_report.choices]), "
            "e.kernel_report.source, e.batch_invariant, sep='|')")
    env = {**os.environ, "PDGRPC_KERNEL_PLAN_DIR": str(tmp_path / "shared-plans")}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    lines = [o[0].strip().splitlines()[-1].split("|") for o in outs]
    assert lines[0][0] == lines[1][0]
    assert sorted(line[1].split(":")[0] for line in lines) == ["cached", "measured"]
    assert all(line[2] == "True" for line in lines)


def test_row_plan_validates():
    with pytest.raises(ValueError):
        RowPlan(4, (1, 1, 3, 4))
    with pytest.raises(ValueError):
        RowPlan(4, (1, 2, 3))
    assert RowPlan.unpadded(4).describe() == "blocks of 4, no padding"
