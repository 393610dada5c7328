#!/usr/bin/env bash
# The GPU check for a machine with an NVIDIA GPU (run from the repository root):
#   1. prefill and decode as two processes on GPU 0, torch engine, greedy output compared with the
#      colocated run on the same GPU (exactness), for the tiny random model and, if it is prepared,
#      SmolLM2;
#   2. KV hand-off bandwidth between the two processes, from the final messages' timings.
# Prints PASS/FAIL lines and exits non-zero on any mismatch. Needs the project installed
# (`make venv`, or `pip install -e '.[torch]'` in an environment that already has CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 2; }
"$PY" - <<'PYEOF'
import subprocess, sys, time, random
from pdgrpc.client import Client

def cluster(mode, base, model):
    args = ["--mode", mode] if mode == "colocated" else ["--prefill", "1", "--decode", "1"]
    p = subprocess.Popen([sys.executable, "-m", "pdgrpc", "up", "--engine", "torch", "--model", model,
                          "--device", "cuda:0", "--no-pin", "--port-base", str(base), *args],
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("cluster ready"):
            return p
    raise SystemExit(f"{mode} cluster did not start")

failed = False
for model in ("tiny-random", ""):
    if model == "":
        try:
            from pdgrpc.model_prep import resolve_model
            resolve_model("", "float32")
        except Exception as exc:  # SmolLM2 not available here
            print(f"SKIP SmolLM2: {exc}")
            continue
    rng = random.Random(0)
    vocab = 500 if model == "tiny-random" else 49000
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 16, 128, 512, 1500)]
    outs = {}
    for mode, base in (("disaggregated", 47000), ("colocated", 47100)):
        p = cluster(mode, base, model)
        try:
            with Client(f"127.0.0.1:{base}") as c:
                res = [c.complete(token_ids=ids, max_tokens=16, ignore_eos=True) for ids in prompts]
            outs[mode] = res
        finally:
            p.terminate(); p.wait()
    name = model or "SmolLM2"
    for ids, a, b in zip(prompts, outs["disaggregated"], outs["colocated"]):
        ok = a.token_ids == b.token_ids
        failed |= not ok
        t = a.final.timings
        print(f"{'PASS' if ok else 'FAIL'} {name} prompt {len(ids):5d} tokens: disaggregated == colocated; "
              f"TTFT {t.first_token_seconds*1000:.1f} ms, KV groups {t.kv_groups}, "
              f"hand-off after prefill {t.kv_transfer_seconds*1000:.2f} ms")
sys.exit(1 if failed else 0)
PYEOF
