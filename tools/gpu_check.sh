#!/usr/bin/env bash
# The GPU check for a machine with an NVIDIA GPU (run from the repository root):
#   1. prefill and decode as two processes on GPU 0, torch engine, greedy output compared with the
#      colocated run on the same GPU (exactness), for the tiny random model and, if it is prepared,
#      SmolLM2;
#   2. KV hand-off bandwidth between the two processes, from the final messages' timings.
# Prints PASS/FAIL lines and exits non-zero on any mismatch. Needs the project installed
# (`make venv`, or `pip install -e '.[torch]'` in an environment that already has CUDA torch).
# DEVICE=cpu runs the same checks without a GPU (a dry run of this script); MODELS picks the models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export DEVICE=${DEVICE:-cuda:0} MODELS=${MODELS:-tiny-random smollm2}
if [[ $DEVICE == cuda* ]]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no GPU"; exit 2; }
fi
"$PY" - <<'PYEOF'
import os, subprocess, sys, time, random, urllib.request
from pdgrpc.bench.cluster import free_base
from pdgrpc.client import Client

DEVICE = os.environ["DEVICE"]

def cluster(mode, base, model):
    args = ["--mode", mode] if mode == "colocated" else ["--prefill", "1", "--decode", "1"]
    p = subprocess.Popen([sys.executable, "-m", "pdgrpc", "up", "--engine", "torch", "--model", model,
                          "--device", DEVICE, "--no-pin", "--port-base", str(base), *args],
                         stdout=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("cluster ready"):
            return p
    raise SystemExit(f"{mode} cluster did not start")

failed = False
for model in ("" if m == "smollm2" else m for m in os.environ["MODELS"].split()):
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
    taken = set()
    for mode in ("disaggregated", "colocated"):
        base = free_base(taken)
        p = cluster(mode, base, model)
        try:
            with Client(f"127.0.0.1:{base}") as c:
                res = [c.complete(token_ids=ids, max_tokens=16, ignore_eos=True) for ids in prompts]
            outs[mode] = res
            if mode == "disaggregated":  # which path the KV took: CUDA IPC handles are small JSON writes
                text = urllib.request.urlopen(f"http://127.0.0.1:{base + 1}/metrics", timeout=5).read().decode()
                writes = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("pdgrpc_store_writes_total{")}
                groups = sum(r.final.timings.kv_groups for r in res)
                on_gpu = writes.get("json", 0) >= groups and writes.get("shm", 0) == writes.get("binary", 0) == 0
                expect_gpu = DEVICE.startswith("cuda")
                failed |= on_gpu != expect_gpu
                print(f"{'PASS' if on_gpu == expect_gpu else 'FAIL'} {model or 'SmolLM2'}: store writes by path "
                      f"{writes} for {groups} KV groups ({'CUDA IPC' if on_gpu else 'host memory'})")
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
