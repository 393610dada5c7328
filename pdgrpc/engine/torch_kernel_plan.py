"""Which linear kernel serves each weight shape, chosen at load: batch-invariant first, then fastest.

At load, for every distinct linear shape of the model (SmolLM2 has 6: q/o, k/v, gate/up, down, the
output head) and the dtype it serves, ``plan_linears``:
  1. tries every kernel that runs here (``torch_linear.KERNELS``; ``linear_kernel`` forces one);
  2. finds the row padding that makes it invariant (``discover_plan``: which product sizes of up to
     ROW_BLOCK rows sum a row as a full block does) and then *checks* it on the layer's own weights
     (``first_difference``): a row's result must be bit-identical in products of every size from 1
     to ``max_batch`` rows, at shifting positions, to the same row in a larger product; a kernel
     that fails even so is tried with each row alone, and one that fails that too is rejected;
  3. times the kernels that passed (a decode step of 1 and of 8 rows, a 128-token prefill; the
     output head only ever sees decode-sized products) and keeps the fastest, by the sum of each
     regime's time over the best one's;
  4. swaps every ``nn.Linear`` for a ``PlannedLinear`` with the chosen kernel and row plan.
Where no kernel passes, the fastest one serves and the report says so: ``KernelReport.invariant``
is False, the node logs a warning, sets ``pdgrpc_engine_batch_invariant`` to 0 and puts the detail
in its NodeInfo; exactness tests assert it first, so they fail saying why instead of passing by luck.

The choice is cached per machine (CPU model and flags, torch version, MKL dispatch, dtype, shapes)
under ``$PDGRPC_KERNEL_PLAN_DIR`` (default ``$XDG_CACHE_HOME`` or ``~/.cache``, then
``pdgrpc/kernel-plans``; "off": no cache), with a
file lock: nodes of one host make the same choice, whatever the noise of their own timing, since
kernels differ in their bits and disaggregated must equal colocated. The check of step 2 runs at
every load, cached or not; a cached plan that fails it is measured again.

The report also says how bf16 fares on this CPU (native: AMX or AVX512-BF16; emulated: neither) and
which of the two dtypes is faster here; the dtype stays the user's choice (it changes the numbers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from pdgrpc.engine import cpuinfo, mkl_dispatch
from pdgrpc.engine.torch_linear import KERNELS, ROW_BLOCK, PlannedLinear, RowPlan, kernel_unavailable
from pdgrpc.engine.torch_options import LINEAR_KERNELS

log = logging.getLogger(__name__)
PLAN_FORMAT = 1
EXTRA_ROWS = 9  # rows beyond max_batch in the check's input: windows start at shifting positions
# Outputs compared per product size, at least. In bf16 a sum taken in another order differs from the
# first only where its fp32 value lies near a bf16 rounding step: ~1 output in 1,000-2,000 at K = 1536
# (measured: a 3-row product agreed with 1 row on one 32 x 576 sample, not on another), so a few
# rows are not enough; 65,536 outputs find such a kernel with near certainty.
CHECK_VALUES = 1 << 16
# The row counts a product may be padded to (so at most these sizes reach the kernel; padding costs
# at most a quarter more rows); a full block is always among them.
PAD_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
TIMING_REPS = 5


# ---- what was chosen --------------------------------------------------------------------------

@dataclass
class ShapeChoice:
    """One weight shape: the kernel and row plan serving it, and why."""

    shape: str                      # "576x1536" (in x out), "+bias" where it has one
    layers: int
    kernel: str
    plan: RowPlan
    invariant: bool
    timings_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # kernel -> regime -> ms
    rejected: dict[str, str] = field(default_factory=dict)                 # kernel -> why not

    def describe(self) -> str:
        times = "; ".join(f"{k} " + " / ".join(f"{r} {t:.3g} ms" for r, t in regimes.items())
                          for k, regimes in self.timings_ms.items())
        why_not = "; ".join(f"{k}: {why}" for k, why in self.rejected.items())
        return (f"linear {self.shape} ({self.layers} layers): {self.kernel}, {self.plan.describe()}"
                + ("" if self.invariant else ", NOT batch-invariant")
                + (f"; timed {times}" if times else "") + (f"; rejected {why_not}" if why_not else ""))


@dataclass
class KernelReport:
    dtype: str
    device: str
    max_batch: int
    source: str                      # "measured", "cached" or "forced KERNEL"
    choices: list[ShapeChoice]
    cpu: str = ""
    bf16_note: str = ""
    seconds: float = 0.0             # what the plan (check and timing, or the check alone) took at this load

    @property
    def invariant(self) -> bool:
        return all(c.invariant for c in self.choices)

    @property
    def kernels(self) -> list[str]:
        return sorted({c.kernel for c in self.choices})

    def summary(self) -> str:
        per_kernel = ", ".join(f"{k} for {sum(c.kernel == k for c in self.choices)} shape(s)" for k in self.kernels)
        state = ("batch-invariant" if self.invariant
                 else "NOT batch-invariant: " + "; ".join(f"{c.shape}: {'; '.join(c.rejected.values())}"
                                                           for c in self.choices if not c.invariant))
        return (f"linear kernels ({self.dtype}, {self.source}, {self.seconds:.1f} s): {per_kernel}; {state} "
                f"up to {self.max_batch} rows")

    def lines(self) -> list[str]:
        return [self.summary(), *(c.describe() for c in self.choices), *([self.bf16_note] if self.bf16_note else [])]


# ---- checks -----------------------------------------------------------------------------------

def _windows(n: int, m: int, n_out: int, first: int) -> list[int]:
    """Start rows of the m-row windows compared for one product size: enough of them that
    CHECK_VALUES outputs are compared, at offsets that move the rows within their blocks."""
    count = max(1, -(-CHECK_VALUES // (m * n_out)))
    return [(first + j * m) % (n - m + 1) for j in range(count)]


def _differing_rows(got: torch.Tensor, want: torch.Tensor) -> list[int]:
    return (got != want).reshape(got.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


def discover_plan(kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, block: int = ROW_BLOCK) -> RowPlan:
    """Pad each product of m <= block rows up to the fewest rows among PAD_SIZES whose results equal
    those of full blocks (fewer distinct sizes: a shorter check, and fewer kernels for oneDNN to build).
    ``x``: [n, K] with n a multiple of ``block``."""
    n = x.shape[0]
    ref = torch.cat([kernel(x[i:i + block]) for i in range(0, n, block)])
    sizes = [q for q in PAD_SIZES if q < block]
    agree = [q for q in sizes if all(torch.equal(kernel(x[s:s + q]), ref[s:s + q])
                                     for s in _windows(n, q, ref.shape[1], 0))] + [block]
    return RowPlan(block, tuple(next(q for q in agree if q >= m) for m in range(1, block + 1)))


def first_difference(layer: torch.nn.Module, x: torch.Tensor, max_batch: int) -> str | None:
    """None when every row of products of 1 to ``max_batch`` rows (decode-shaped, [rows, 1, K], at
    shifting offsets in ``x``) equals, bit for bit, the same row in the product of all of ``x``;
    else what differed. (Every size agreeing with one reference: all agree, 1-row products too.)"""
    n = x.shape[0]
    ref = layer(x)
    n_out = ref.shape[-1]
    for m in range(1, max_batch + 1):
        for s in _windows(n, m, n_out, 5 * m):
            rows = _differing_rows(layer(x[s:s + m]), ref[s:s + m])
            if rows:
                return (f"in a {m}-row product, {len(rows)} row(s) (first: row {rows[0]}) differ from the same "
                        f"row in a product of {n} rows")
    return None


def wrong_result(layer: torch.nn.Module, linear: torch.nn.Linear, x: torch.Tensor) -> str | None:
    """None when the layer computes ``x W^T + b`` to the dtype's rounding (float64 reference)."""
    w = linear.weight.detach().double()
    b = None if linear.bias is None else linear.bias.detach().double()
    want = torch.nn.functional.linear(x.double(), w, b)
    got = layer(x).double()
    scale = want.abs().max().clamp_min(1e-12)
    err = float((got - want).abs().max() / scale)
    tol = 1e-4 if x.dtype == torch.float32 else 3e-2
    return None if err <= tol else f"result off by {err:.2g} of its scale (limit {tol:g})"


def _inputs(n_in: int, rows: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Normal values, each row scaled by its own factor in [1/8, 8] (activations differ in scale)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.rand(rows, 1, 1, generator=gen) * 6 - 3)
    return (torch.randn(rows, 1, n_in, generator=gen) * scale).to(dtype=dtype, device=device)


def check_layer(linear: torch.nn.Linear, kernel: str, max_batch: int,
                plan: RowPlan | None = None) -> tuple[PlannedLinear | None, str | None]:
    """(the planned layer, None) when ``kernel`` with ``plan`` (found here when None) is right and
    batch-invariant for this layer; (None, why) when it is not, even with each row alone."""
    w = linear.weight
    rows = max(max_batch, ROW_BLOCK) + EXTRA_ROWS + -(-CHECK_VALUES // linear.out_features)
    rows = -(-rows // ROW_BLOCK) * ROW_BLOCK
    x = _inputs(linear.in_features, rows, w.dtype, w.device, linear.in_features)
    try:
        with torch.inference_mode():
            k = KERNELS[kernel](w, linear.bias)
            plans = [plan] if plan is not None else [discover_plan(k, x[:, 0]), RowPlan(1, (1,))]
            why = "no plan"
            for p in plans:
                layer = PlannedLinear(linear.in_features, linear.out_features, k, p)
                why = wrong_result(layer, linear, x[:ROW_BLOCK]) or first_difference(layer, x, max_batch)
                if why is None:
                    return layer, None
            return None, why
    except RuntimeError as exc:
        return None, f"failed: {str(exc).splitlines()[0]}"


# ---- timing -----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(layers: dict[str, PlannedLinear], n_in: int, dtype: torch.dtype, device: torch.device,
                max_batch: int, decode_only: bool) -> dict[str, dict[str, float]]:
    """Median ms of each layer in each regime, the kernels interleaved (a noisy machine hits all alike)."""
    regimes = {"1 row": (1, 1), f"{min(8, max_batch)} rows": (min(8, max_batch), 1)}
    if not decode_only:
        regimes["128 tokens"] = (1, 128)
    gen = torch.Generator().manual_seed(1)
    out: dict[str, dict[str, list[float]]] = {k: {r: [] for r in regimes} for k in layers}
    with torch.inference_mode():
        inputs = {r: torch.randn(b, t, n_in, generator=gen).to(dtype=dtype, device=device)
                  for r, (b, t) in regimes.items()}
        for layer in layers.values():  # first calls allocate and pick code paths
            for x in inputs.values():
                layer(x)
        for _ in range(TIMING_REPS):
            for name, layer in layers.items():
                for r, x in inputs.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    layer(x)
                    _sync(device)
                    out[name][r].append((time.perf_counter() - t0) * 1e3)
    return {k: {r: statistics.median(ts) for r, ts in regimes_.items()} for k, regimes_ in out.items()}


def fastest(timings: dict[str, dict[str, float]]) -> str:
    """The kernel with the least sum over regimes of its time over the best time (ties: LINEAR_KERNELS order)."""
    regimes = next(iter(timings.values())).keys()
    best = {r: min(t[r] for t in timings.values()) for r in regimes}
    order = {k: i for i, k in enumerate(LINEAR_KERNELS)}
    return min(timings, key=lambda k: (sum(timings[k][r] / max(best[r], 1e-9) for r in regimes), order.get(k, 99)))


# ---- the machine, bf16, the cache ------------------------------------------------------------

def bf16_instructions() -> list[str]:
    """The CPU's bf16 instructions oneDNN uses (empty: bf16 is emulated in fp32 arithmetic)."""
    flags = cpuinfo.flags()
    names = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "avx_ne_convert": "AVX-NE-CONVERT"}
    return [label for flag, label in names.items() if flag in flags]


def bf16_note(n_in: int, n_out: int) -> str:
    """How bf16 fares against fp32 here: one 128-token product of the model's widest layer, best kernel each."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    best: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        layers = {k: PlannedLinear(n_in, n_out, KERNELS[k](w.to(dtype), None), RowPlan.unpadded())
                  for k in LINEAR_KERNELS if kernel_unavailable(k, dtype) is None}
        times = time_layers(layers, n_in, dtype, torch.device("cpu"), 1, decode_only=False)
        best[str(dtype).removeprefix("torch.")] = min(t["128 tokens"] for t in times.values())
    isa = bf16_instructions()
    how = f"native ({', '.join(isa)})" if isa else "emulated (no bf16 instructions on this CPU: slower)"
    ratio = best["float32"] / best["bfloat16"]
    faster = (f"bf16 is {ratio:.2g}x faster" if ratio >= 1 else f"fp32 is {1 / ratio:.2g}x faster")
    return (f"bf16 on this CPU: {how}; a 128-token {n_in}x{n_out} product takes {best['bfloat16']:.3g} ms in "
            f"bf16, {best['float32']:.3g} ms in fp32: {faster} (fp32 is the exactness reference)")


def plan_dir() -> str | None:
    where = os.environ.get("PDGRPC_KERNEL_PLAN_DIR", "")
    if where == "off":
        return None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return where or os.path.join(cache, "pdgrpc", "kernel-plans")  # the systemd units set XDG_CACHE_HOME


def plan_key(dtype: torch.dtype, device: torch.device, shapes: list[str], forced: str) -> str:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = {"format": PLAN_FORMAT, "torch": torch.__version__, "device": dev, "cpu": cpuinfo.model(),
           "isa": torch.backends.cpu.get_cpu_capability(),
           "flags": hashlib.sha256(" ".join(sorted(cpuinfo.flags())).encode()).hexdigest()[:16],
           "mkl_dispatch": mkl_dispatch.enabled(), "dtype": str(dtype), "shapes": sorted(shapes),
           "block": ROW_BLOCK, "forced": forced}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@contextlib.contextmanager
def _locked(directory: str | None) -> Iterator[None]:
    if directory is None:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write(path: str | None, data: dict) -> None:
    if path is None:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# ---- the plan ---------------------------------------------------------------------------------

def _shape_of(m: torch.nn.Linear) -> str:
    return f"{m.in_features}x{m.out_features}" + ("+bias" if m.bias is not None else "")


def _choose(linear: torch.nn.Linear, candidates: list[str], max_batch: int, decode_only: bool,
            layers: int) -> tuple[ShapeChoice, PlannedLinear]:
    """Check every candidate kernel on this layer, time those that pass, keep the fastest."""
    w = linear.weight
    passed: dict[str, PlannedLinear] = {}
    rejected: dict[str, str] = {}
    for k in candidates:
        why = kernel_unavailable(k, w.dtype, w.device)
        layer = None
        if why is None:
            layer, why = check_layer(linear, k, max_batch)
        if layer is not None:
            passed[k] = layer
        else:
            rejected[k] = why or "?"
    if passed:
        timings = time_layers(passed, linear.in_features, w.dtype, w.device, max_batch, decode_only)
        best = fastest(timings)
        layer = passed[best]
        return ShapeChoice(_shape_of(linear), layers, best, layer.plan, True, timings, rejected), layer
    # None is invariant here: serve with the first kernel that runs at all, unpadded, and say so.
    runnable = [k for k in candidates if kernel_unavailable(k, w.dtype, w.device) is None] or ["torch"]
    layer = PlannedLinear.of(linear, runnable[0])
    return ShapeChoice(_shape_of(linear), layers, runnable[0], layer.plan, False, {}, rejected), layer


def plan_linears(model: torch.nn.Module, max_batch: int, forced: str = "") -> KernelReport:
    """Swap the model's ``nn.Linear`` modules for ``PlannedLinear`` ones (see the module docstring)."""
    linears = [(name, m) for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    if not linears:
        return KernelReport("", "", max_batch, "no linear layers", [])
    w = linears[0][1].weight
    dtype, device = w.dtype, w.device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    by_shape: dict[str, list[torch.nn.Linear]] = {}
    for _, m in linears:
        by_shape.setdefault(_shape_of(m), []).append(m)
    if forced and (why := kernel_unavailable(forced, dtype, device)):
        log.warning("linear kernel %s was asked for but cannot run here (%s): using torch", forced, why)
        forced = "torch"
    candidates = [forced] if forced else list(LINEAR_KERNELS)
    t0 = time.monotonic()
    directory = plan_dir()
    path = None if directory is None else os.path.join(
        directory, plan_key(dtype, device, list(by_shape), forced) + ".json")
    report, swaps = None, None
    with _locked(directory):
        cached = _read(path)
        if cached is not None:
            report, swaps = _from_cache(cached, by_shape, max_batch)
        if report is None:
            report, swaps = _measure(by_shape, candidates, max_batch, head, forced)
            report.cpu = cpuinfo.model()
            if device.type == "cpu":
                n_in, n_out = max((m.in_features, m.out_features) for ms in by_shape.values() for m in ms
                                  if m is not head)
                report.bf16_note = bf16_note(n_in, n_out)
            _write(path, {"choices": [{**asdict(c), "plan": asdict(c.plan)} for c in report.choices],
                          "bf16_note": report.bf16_note, "cpu": report.cpu, "source": report.source})
    report.dtype, report.device, report.max_batch = str(dtype).removeprefix("torch."), str(device), max_batch
    report.seconds = time.monotonic() - t0
    for name, m in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        first = swaps[_shape_of(m)]  # built on the first layer of its shape, which it was checked on
        setattr(parent, attr, first if m is by_shape[_shape_of(m)][0] else PlannedLinear.of(m, first.kernel.name,
                                                                                              first.plan))
    return report


def _measure(by_shape: dict[str, list[torch.nn.Linear]], candidates: list[str], max_batch: int,
             head: torch.nn.Module | None, forced: str) -> tuple[KernelReport, dict[str, PlannedLinear]]:
    choices, swaps = [], {}
    for shape, ms in by_shape.items():
        choice, layer = _choose(ms[0], candidates, max_batch, decode_only=any(m is head for m in ms), layers=len(ms))
        choices.append(choice)
        swaps[shape] = layer
    return KernelReport("", "", max_batch, f"forced {forced}" if forced else "measured", choices), swaps


def _from_cache(cached: dict, by_shape: dict[str, list[torch.nn.Linear]],
                max_batch: int) -> tuple[KernelReport | None, dict[str, PlannedLinear] | None]:
    """The cached choices, each checked again on this model's weights; (None, None) if any fails."""
    try:
        entries = {c["shape"]: c for c in cached["choices"]}
        choices, swaps = [], {}
        for shape, ms in by_shape.items():
            c = entries[shape]
            plan = RowPlan(int(c["plan"]["block"]), tuple(int(p) for p in c["plan"]["pad"]))
            if c["invariant"]:
                layer, why = check_layer(ms[0], c["kernel"], max_batch, plan)
                if layer is None:
                    log.warning("cached kernel plan for %s fails its check now (%s): measuring again", shape, why)
                    return None, None
            else:
                layer = PlannedLinear.of(ms[0], c["kernel"], plan)
            choices.append(ShapeChoice(shape, len(ms), c["kernel"], plan, bool(c["invariant"]),
                                       c.get("timings_ms", {}), c.get("rejected", {})))
            swaps[shape] = layer
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("unreadable kernel plan cache (%s): measuring again", exc)
        return None, None
    source = "cached: " + str(cached.get("source", "measured"))
    return KernelReport("", "", max_batch, source, choices, cached.get("cpu", ""), cached.get("bf16_note", "")), swaps
