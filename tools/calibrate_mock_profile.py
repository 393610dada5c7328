"""Fit a mock engine cost profile (pdgrpc.engine.mock_profile) and write it as JSON.

Two sources of points, one fit (least squares in relative error, numpy; a coefficient the fit
makes negative is dropped and the rest refitted, so every coefficient is >= 0):

  torch (default)  measures the torch engine on this machine: one prompt prefilled at each of
                   --prompt-lengths (--reps times, KV packed as a prefill node does), and decode steps
                   of --batches sequences at each of --contexts prompt lengths, on --prefill-threads
                   and --decode-threads threads (default 1 and 1: the demo's nodes, pinned to a core
                   each; on a shared machine a 2-thread OpenMP team stalls whenever one core is taken).
  --from-vidur CSV per-operator GPU timings published by Microsoft's Vidur simulator
                   (data/profiling/compute/<gpu>/<model>/mlp.csv): one layer = the operators Vidur's
                   ExecutionTime adds for a block outside the attention kernels (norms, QKV and O
                   projections, rope, MLP up/act/down, add), times --layers; prefill points at
                   num_tokens = prompt length, decode points at num_tokens = batch size. The attention
                   kernels are in Vidur's attention.csv: without it the n**2 and context terms stay 0
                   unless --kv-bandwidth-bytes-s gives a bound for decode (KV bytes read per context
                   token / bandwidth), which the profile's notes then say.

    python tools/calibrate_mock_profile.py --out pdgrpc/engine/profiles/smollm2-135m-cpu-epyc2.json
    python tools/calibrate_mock_profile.py --from-vidur mlp.csv --name llama3-8b-a100-vidur ...
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pdgrpc.engine.mock_profile import MockProfile  # noqa: E402


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of relative error, columns whose coefficient comes out negative dropped."""
    keep = list(range(x.shape[1]))
    w = 1.0 / y
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, keep] * w[:, None], y * w, rcond=None)
        coef[keep] = sol
        if (sol >= 0).all() or len(keep) == 1:
            return np.maximum(coef, 0.0)
        keep.pop(int(np.argmin(sol)))


def fit_profile(prefill_points: list[tuple[int, float]], decode_points: list[tuple[int, int, float]],
                quadratic: bool = True, context: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """Coefficients and the largest relative error of each fit on its own points."""
    n = np.array([p[0] for p in prefill_points], dtype=float)
    yp = np.array([p[1] for p in prefill_points])
    xp = np.stack([np.ones_like(n), n] + ([n * n] if quadratic else []), axis=1)
    cp = fit_nonnegative(xp, yp)
    b = np.array([p[0] for p in decode_points], dtype=float)
    ctx = np.array([p[1] for p in decode_points], dtype=float)
    yd = np.array([p[2] for p in decode_points])
    xd = np.stack([np.ones_like(b), b] + ([ctx] if context else []), axis=1)
    cd = fit_nonnegative(xd, yd)
    coef = {"prefill_base_s": cp[0], "prefill_per_token_s": cp[1],
            "prefill_per_token2_s": cp[2] if quadratic else 0.0,
            "decode_base_s": cd[0], "decode_per_seq_s": cd[1], "decode_per_context_token_s": cd[2] if context else 0.0}
    errors = {"prefill": float(np.max(np.abs(xp @ cp - yp) / yp)), "decode": float(np.max(np.abs(xd @ cd - yd) / yd))}
    return {k: float(f"{v:.4g}") for k, v in coef.items()}, errors


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine


def measure_torch(args) -> tuple[dict, list, list, str]:
    import torch

    from pdgrpc.engine.base import EngineOptions
    from pdgrpc.engine.colocated import prefill_in_memory, start_sequence
    from pdgrpc.engine.registry import build_engine
    from pdgrpc.types import SamplingParams

    load0 = os.getloadavg()[0]
    greedy = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    cpus = len(os.sched_getaffinity(0))
    e = build_engine(EngineOptions(name="torch", model=args.model, dtype=args.dtype, threads=args.prefill_threads,
                                   max_batch=max(args.batches)))

    def prompt(length: int, salt: int) -> list[int]:
        return [(7 + 131 * k + 977 * salt) % (e.spec.vocab_size - 3) + 3 for k in range(length)]

    def prefill(ids: list[int]):
        return prefill_in_memory(e, "c", ids, greedy)

    prefill(prompt(32, 0))  # warm
    prefill_points = []
    for _ in range(args.reps):
        for length in args.prompt_lengths:
            t0 = time.perf_counter()
            prefill(prompt(length, length))
            prefill_points.append((length, time.perf_counter() - t0))
    e.compute.run(torch.set_num_threads, args.decode_threads)
    decode_points = []
    for context in args.contexts:
        seqs = []
        for i in range(max(args.batches)):
            ids = prompt(context, i)
            seqs.append(start_sequence(e, f"s{i}", ids, greedy, *prefill(ids)))
        for batch in args.batches:
            live = seqs[:batch]
            e.decode_step(live)  # the batch of this size in place before timing
            for _ in range(args.steps):
                ctx = sum(s.length + 1 for s in live)  # cache plus the token fed, as the mock counts it
                t0 = time.perf_counter()
                e.decode_step(live)
                decode_points.append((batch, ctx, time.perf_counter() - t0))
        for s in seqs:
            e.free_sequence(s)
    spec = e.spec
    e.close()
    geometry = {"num_layers": spec.num_layers, "num_kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                "dtype": spec.dtype}
    load = os.getloadavg()[0]
    source = (f"measured here with tools/calibrate_mock_profile.py on {datetime.date.today().isoformat()}, "
              f"{cpu_name()}, {cpus} CPUs, torch {torch.__version__}: prefill on {args.prefill_threads} thread(s), "
              f"decode on {args.decode_threads}; 1-minute load average {load0:.1f} at the start, "
              f"{load:.1f} at the end (a shared machine: other work slows what is measured)")
    return geometry, prefill_points, decode_points, source


def vidur_points(path: str, layers: int) -> tuple[dict[int, float], list[str]]:
    """Seconds of one forward's non-attention operators by num_tokens, from Vidur's mlp.csv (ms)."""
    ops = ["input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add"]
    out: dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if int(row.get("num_tensor_parallel_workers", 1)) != 1:
                continue
            per_layer_ms = sum(float(row[f"time_stats.{op}.median"]) for op in ops)
            out[int(row["num_tokens"])] = per_layer_ms * layers * 1e-3
    return out, ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the profile JSON to write")
    ap.add_argument("--name", default="smollm2-135m-cpu-epyc2")
    ap.add_argument("--hardware", default="")
    ap.add_argument("--model", default="", help="torch: model folder (default SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 64, 128, 256, 512, 768])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefill-threads", type=int, default=1)
    ap.add_argument("--decode-threads", type=int, default=1)
    ap.add_argument("--from-vidur", default="", help="fit Vidur's published mlp.csv instead of measuring")
    ap.add_argument("--vidur-citation", default="", help="--from-vidur: where the file came from (repo, path, commit)")
    ap.add_argument("--model-name", default="", help="--from-vidur: the model the file describes")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--kv-bandwidth-bytes-s", type=float, default=0.0,
                    help="--from-vidur: bound decode attention by KV bytes / this bandwidth (0: leave it 0)")
    ap.add_argument("--kv-bandwidth-source", default="")
    args = ap.parse_args()

    notes = ""
    if args.from_vidur:
        times, ops = vidur_points(args.from_vidur, args.layers)
        missing = [n for n in args.prefill_tokens + args.decode_batches if n not in times]
        if missing:
            print(f"num_tokens {missing} not in {args.from_vidur}", file=sys.stderr)
            return 1
        geometry = {"num_layers": args.layers, "num_kv_heads": args.kv_heads, "head_dim": args.head_dim,
                    "dtype": args.dtype}
        prefill_points = [(n, times[n]) for n in args.prefill_tokens]
        decode_points = [(b, 0, times[b]) for b in args.decode_batches]
        coef, errors = fit_profile(prefill_points, decode_points, quadratic=False, context=False)
        model = args.model_name
        source = (f"published: Vidur (Agrawal et al., 'Vidur: A Large-Scale Simulation Framework For LLM "
                  f"Inference', MLSys 2024, arXiv:2405.05465) profiling data, {args.vidur_citation}: median "
                  f"per-operator times ({', '.join(ops)}) x {args.layers} layers, fitted by "
                  f"tools/calibrate_mock_profile.py --from-vidur on {datetime.date.today().isoformat()}")
        notes = ("Linear layers, norms, rope and residual adds only: Vidur's attention kernel timings "
                 "(attention.csv) were not in the snapshot available here, so prefill_per_token2_s is 0 "
                 "(prefill attention not modelled) and the LM head, sampling and CPU overheads are left out.")
        if args.kv_bandwidth_bytes_s:
            kv = MockProfile(name="x", model="x", hardware="x", source="x", **geometry).kv_bytes_per_token
            coef["decode_per_context_token_s"] = float(f"{kv / args.kv_bandwidth_bytes_s:.4g}")
            notes += (f" decode_per_context_token_s is not measured: it is a lower bound, the {kv} KV bytes "
                      f"per context token read once at {args.kv_bandwidth_bytes_s:.4g} B/s "
                      f"({args.kv_bandwidth_source}).")
        else:
            notes += " decode_per_context_token_s is 0 (decode attention not modelled)."
        measurements = {"prefill_s_by_tokens": {str(n): round(t, 6) for n, t in prefill_points},
                        "decode_step_s_by_batch": {str(b): round(t, 6) for b, _, t in decode_points},
                        "max_relative_error": errors}
    else:
        t0 = time.monotonic()
        geometry, prefill_points, decode_points, source = measure_torch(args)
        # Other work on the machine only ever adds time: the fastest of the repeats is the cost.
        prefill_fit = [(n, min(t for m, t in prefill_points if m == n)) for n in args.prompt_lengths]
        decode_fit = []
        for i in range(0, len(decode_points), args.steps):
            run = decode_points[i:i + args.steps]
            decode_fit.append((run[0][0], round(statistics.mean(c for _, c, _ in run)), min(t for *_, t in run)))
        coef, errors = fit_profile(prefill_fit, decode_fit)
        model = "SmolLM2-135M-Instruct (torch engine)" if not args.model else args.model
        measurements = {
            "fitted": "the fastest of each prompt length's --reps prefills and of each decode batch's --steps steps",
            "prefill_s_by_tokens": {str(n): [round(t, 6) for m, t in prefill_points if m == n]
                                    for n in args.prompt_lengths},
            "decode_step_s": [[b, c, round(t, 6)] for b, c, t in decode_points],
            "decode_step_s_columns": ["batch", "context_tokens", "seconds"],
            "max_relative_error": errors, "measured_in_s": round(time.monotonic() - t0, 1)}
    profile = MockProfile(name=args.name, model=model, hardware=args.hardware or cpu_name(), source=source,
                          notes=notes, measurements=measurements, **geometry, **coef)
    with open(args.out, "w") as f:
        f.write(profile.to_json())
    print(f"wrote {args.out}: {coef}; largest relative error {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
