"""What int8 KV compression (pdgrpc.transfer.compression) costs in quality and buys in time.

Quality: SmolLM2 prompts (--prompts, seeded, 8 to ~900 tokens) are prefilled once; each is then
decoded greedily twice in the same batches (batch-invariant engine), once from its exact KV and once
from its KV compressed and expanded again. Printed: the share of generated tokens equal to the exact
run's, the share of prompts whose whole output is equal, and the mean |logprob difference| of the
chosen tokens before the first divergence.

Time: compress and expand speed on a ~1,000-token prompt's KV, and the hand-off time that gives at a
link rate (--link-gbit): raw bytes / rate against compressed bytes / rate + compress + expand.

    python tools/bench_kv_compression.py --prompts 60 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SUBJECTS = ["the ocean", "a small village", "prime numbers", "the French revolution", "photosynthesis", "a robot",
            "the moon landing", "coffee", "a lost key", "jazz music", "volcanoes", "a chess game", "winter",
            "the internet", "a lighthouse"]
TASKS = ["Write a short story about {}.", "Explain {} to a child.", "List three facts about {}.",
         "Write a poem about {}.", "What is the history of {}?", "Give me a recipe inspired by {}."]


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = rng.choice(TASKS).format(rng.choice(SUBJECTS))
        if i % 5 == 4:  # some long ones: a context paragraph repeated
            text = (f"Context: {rng.choice(SUBJECTS)} and {rng.choice(SUBJECTS)} are discussed here. " * rng.randint(
                10, 60)) + text
        out.append(text)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--link-gbit", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from pdgrpc.engine.base import EngineOptions, KVGroup
    from pdgrpc.engine.colocated import prefill_in_memory, start_sequence
    from pdgrpc.engine.registry import build_engine
    from pdgrpc.transfer import compression as kvc
    from pdgrpc.types import SamplingParams

    engine = build_engine(EngineOptions(name="torch", model="", dtype=args.dtype))
    spec = engine.spec
    sampling = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    texts = prompts(args.prompts, args.seed)

    def squeeze(g: KVGroup) -> KVGroup:
        blob = kvc.compress(g.data, spec.dtype, g.layer_end - g.layer_start, spec.num_kv_heads,
                            g.token_end - g.token_start, spec.head_dim)
        return KVGroup(g.layer_start, g.layer_end, g.token_start, g.token_end, kvc.decompress(blob))

    runs: list[tuple[int, bool, object]] = []  # (prompt index, compressed, sequence)
    firsts = []
    for i, text in enumerate(texts):
        ids = engine.tokenizer.encode(text)
        groups, first = prefill_in_memory(engine, f"p{i}", ids, sampling)
        firsts.append((len(ids), first.token_id))
        for compressed in (False, True):
            kv = [squeeze(g) for g in groups] if compressed else groups
            runs.append((i, compressed, start_sequence(engine, f"p{i}-{compressed}", ids, sampling, kv, first)))
    outputs: dict[tuple[int, bool], list[tuple[int, float]]] = {(i, c): [] for i, c, _ in runs}
    for start in range(0, len(runs), 32):
        batch = runs[start:start + 32]
        for _ in range(args.tokens - 1):
            for (i, c, _), tok in zip(batch, engine.decode_step([s for _, _, s in batch])):
                outputs[i, c].append((tok.token_id, tok.logprob))
        for _, _, s in batch:
            engine.free_sequence(s)

    equal = total = whole = 0
    lp_diffs = []
    for i in range(len(texts)):
        exact, approx = outputs[i, False], outputs[i, True]
        same = [a[0] == b[0] for a, b in zip(exact, approx)]
        equal += sum(same)
        total += len(same)
        whole += all(same)
        for a, b in zip(exact, approx):
            if a[0] != b[0]:
                break
            lp_diffs.append(abs(a[1] - b[1]))

    # Speed on one long prompt's KV (all layers in one group, as a short-prompt hand-off).
    ids = engine.tokenizer.encode(" ".join(texts) * 4)[:1000]
    raw = b"".join(bytes(g.data) for g in prefill_in_memory(engine, "speed", ids, sampling)[0])
    layers, tokens = spec.num_layers, len(ids)
    per_group = len(raw) // layers  # bytes of one layer
    reps_c, reps_d = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        blobs = [kvc.compress(raw[k * per_group:(k + 1) * per_group], spec.dtype, 1, spec.num_kv_heads, tokens,
                              spec.head_dim) for k in range(layers)]
        t1 = time.perf_counter()
        out = bytearray(len(raw))
        view = memoryview(out)
        for k, b in enumerate(blobs):
            kvc.decompress_into(b, view[k * per_group:(k + 1) * per_group])
        reps_c.append(t1 - t0)
        reps_d.append(time.perf_counter() - t1)
    packed = sum(len(b) for b in blobs)
    c_s, d_s = statistics.median(reps_c), statistics.median(reps_d)
    result = {
        "prompts": len(texts), "tokens_per_prompt": args.tokens, "dtype": spec.dtype,
        "prompt_tokens": [n for n, _ in firsts],
        "token_agreement": equal / total, "prompts_identical": whole / len(texts),
        "mean_abs_logprob_diff": statistics.mean(lp_diffs) if lp_diffs else None,
        "kv_bytes": len(raw), "compressed_bytes": packed, "ratio": len(raw) / packed,
        "compress_s": c_s, "expand_s": d_s, "links": {},
    }
    print(f"SmolLM2 {spec.dtype}, {len(texts)} prompts of {min(result['prompt_tokens'])}-"
          f"{max(result['prompt_tokens'])} tokens, {args.tokens} greedy tokens each")
    print(f"  tokens equal to exact: {result['token_agreement']:.1%}; prompts identical: "
          f"{result['prompts_identical']:.1%}; mean |logprob diff| before divergence: "
          f"{result['mean_abs_logprob_diff']:.2g}")
    print(f"  {tokens}-token KV: {len(raw) / 1e6:.1f} MB -> {packed / 1e6:.1f} MB ({result['ratio']:.2f}x); "
          f"compress {c_s * 1e3:.1f} ms, expand {d_s * 1e3:.1f} ms (one core each)")
    for rate in args.link_gbit:
        plain = len(raw) * 8 / (rate * 1e9)
        squeezed = packed * 8 / (rate * 1e9) + c_s + d_s
        result["links"][str(rate)] = {"raw_s": plain, "compressed_s": squeezed, "ratio": squeezed / plain}
        print(f"  at {rate:g} Gbit/s: raw {plain * 1e3:.0f} ms, compressed {squeezed * 1e3:.0f} ms "
              f"({squeezed / plain:.2f}x; computed from the line rate, not a link)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
