"""The torch engine's linear kernels side by side, SmolLM2 on one core, in one run.

Builds one engine per (dtype, kernel): the kernel chosen at load ("auto") and each kernel forced,
in float32 and bfloat16, all in this process on one thread, then interleaves the measurements
round by round (machine noise hits all alike) and prints medians:
  prefill    one prompt of --prompt-tokens tokens (its KV packed, as a prefill node does)
  decode 1   one decode step of 1 sequence
  decode 8   one decode step of 8 sequences
with what each engine's load-time plan chose, the plan's time, and the bf16 note.

    python tools/bench_kernels.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=130)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("PDGRPC_KERNEL_PLAN_DIR", tempfile.mkdtemp(prefix="bench-kernels-"))  # fresh plans

    import torch

    from pdgrpc.engine.base import EngineOptions
    from pdgrpc.engine.colocated import prefill_in_memory, start_sequence
    from pdgrpc.engine.registry import build_engine
    from pdgrpc.engine.torch_linear import kernel_unavailable
    from pdgrpc.types import SamplingParams

    greedy = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    engines = {}
    for dtype in args.dtypes:
        for kernel in ("", "onednn", "torch"):
            if kernel and kernel_unavailable(kernel, getattr(torch, dtype)):
                print(f"{dtype} {kernel}: not available here", flush=True)
                continue
            e = build_engine(EngineOptions(name="torch", model="", dtype=dtype, threads=1, linear_kernel=kernel,
                                           max_batch=32))
            engines[(dtype, kernel or "auto")] = e
            print(f"{dtype} {kernel or 'auto'}: {e.kernel_report.summary()}", flush=True)
    note = next(iter(engines.values())).kernel_report.bf16_note

    def prefill(e, ids):
        t0 = time.perf_counter()
        prefill_in_memory(e, "b", ids, greedy)
        return time.perf_counter() - t0

    def sequences(e, n):
        seqs = []
        for i in range(n):
            ids = [(11 + 37 * (i + 1) * k) % 49000 + 3 for k in range(40 + i)]
            groups, first = prefill_in_memory(e, f"s{i}", ids, greedy)
            seqs.append(start_sequence(e, f"s{i}", ids, greedy, groups, first))
        return seqs

    ids = [(7 + 131 * k) % 49000 + 3 for k in range(args.prompt_tokens)]
    results = {key: {"prefill": [], "decode 1": [], "decode 8": []} for key in engines}
    live = {key: {1: sequences(e, 1), 8: sequences(e, 8)} for key, e in engines.items()}
    for _ in range(args.rounds):
        for key, e in engines.items():
            results[key]["prefill"].append(prefill(e, ids))
            for n in (1, 8):
                e.decode_step(live[key][n])  # the batch of this size in place before timing
                t0 = time.perf_counter()
                for _ in range(3):
                    e.decode_step(live[key][n])
                results[key][f"decode {n}"].append((time.perf_counter() - t0) / 3)
    rows = []
    print(f"\nSmolLM2-135M, one core, {args.prompt_tokens}-token prompt, medians of {args.rounds} rounds "
          f"({os.uname().machine}, {engines and next(iter(engines.values())).kernel_report.cpu})")
    print(f"{'dtype':9} {'kernel':14} {'prefill ms':>11} {'decode 1 ms':>12} {'decode 8 ms':>12}  plan")
    for (dtype, kernel), r in results.items():
        e = engines[(dtype, kernel)]
        med = {k: statistics.median(v) * 1e3 for k, v in r.items()}
        chosen = e.linear_kernel if kernel == "auto" else kernel
        label = f"auto={chosen}" if kernel == "auto" else kernel
        print(f"{dtype:9} {label:14} {med['prefill']:11.1f} {med['decode 1']:12.1f} {med['decode 8']:12.1f}  "
              f"{'invariant' if e.batch_invariant else 'NOT invariant'}, {e.kernel_report.seconds:.1f} s at load")
        rows.append({"dtype": dtype, "kernel": label, **med, "invariant": e.batch_invariant,
                     "plan_seconds": e.kernel_report.seconds, "plan": e.kernel_report.lines()})
    print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "bf16_note": note}, f, indent=1)
    for key, e in engines.items():
        for seqs in live[key].values():
            for s in seqs:
                e.free_sequence(s)
        e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
