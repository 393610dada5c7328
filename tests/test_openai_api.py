"""The OpenAI-compatible HTTP front, driven by clients nobody here wrote: the official ``openai``
package and raw HTTP (httpx) against real clusters on the mock engine; schema, conversion and
error-table checks in process. The real model and ``vllm bench serve`` are in test_openai_model.py."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from conftest import mock_reference, start_local_cluster, wait_until
from pydantic import ValidationError

from pdgrpc import errors as perr
from pdgrpc.client import Client
from pdgrpc.openai_api import convert
from pdgrpc.openai_api import models as m
from pdgrpc.openai_api.errors import HTTP_FOR_CODE, from_domain, from_validation
from pdgrpc.types import FinishReason, GenerateDelta, GenerateFinal

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


# ---- in process ------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("body, param", [
    ({"messages": CHAT}, "model"),
    ({"model": "mock", "messages": [{"role": "tool", "content": "x"}]}, "messages.[0].role"),
    ({"model": "mock", "messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.[0].name"),
    ({"model": "mock", "messages": CHAT, "foo": 1}, "foo"),
    ({"model": "mock", "messages": []}, "messages"),
    ({"model": "mock", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.[0].content.[0].type"),
    ({"model": "mock", "messages": CHAT, "max_tokens": "5"}, "max_tokens"),
    ({"model": "mock", "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "mock", "messages": CHAT, "temperature": 3}, "temperature"),
    ({"model": "mock", "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": "mock", "messages": CHAT, "n": 0}, "n"),
    ({"model": "mock", "messages": CHAT, "stop": [""]}, "stop"),
    ({"model": "mock", "messages": CHAT, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
])
def test_schema_errors_name_the_field(body, param):
    with pytest.raises(ValidationError) as info:
        m.ChatCompletionRequest.model_validate_json(json.dumps(body))
    err = from_validation(info.value)
    assert err.status == 400 and err.body.error.param == param, err.body
    assert param in err.body.error.message


@pytest.mark.fast
def test_bad_json_and_nan_are_400():
    for raw in ('{"model": "mock", "prompt": ', '{"model": "mock", "prompt": "a", "temperature": NaN}'):
        with pytest.raises(ValidationError) as info:
            m.CompletionRequest.model_validate_json(raw)
        assert from_validation(info.value).status == 400


@pytest.mark.fast
@pytest.mark.parametrize("extra, param", [
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1.0}, "presence_penalty"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 0}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"n": 16, "max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
])
def test_unimplemented_parameters_are_refused_by_name(extra, param):
    req = m.ChatCompletionRequest.model_validate_json(json.dumps({"model": "mock", "messages": CHAT, **extra}))
    with pytest.raises(Exception) as info:
        convert.generate_requests(req, "chatcmpl-x")
    assert info.value.status == 400 and info.value.body.error.param == param


@pytest.mark.fast
def test_off_values_of_unimplemented_parameters_are_accepted():
    body = {"model": "mock", "prompt": "a", "frequency_penalty": 0, "presence_penalty": 0.0, "repetition_penalty": 1,
            "logit_bias": {}, "echo": False, "best_of": 1, "logprobs": 0}
    req = m.CompletionRequest.model_validate_json(json.dumps(body))
    (one,) = convert.generate_requests(req, "cmpl-x")
    assert one.sampling.logprobs and one.sampling.temperature == 1.0 and one.sampling.max_tokens == 16
    for bad, param in (({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"),
                       ({"logprobs": 2}, "logprobs")):
        req = m.CompletionRequest.model_validate_json(json.dumps({**body, **bad}))
        with pytest.raises(Exception) as info:
            convert.generate_requests(req, "cmpl-x")
        assert info.value.body.error.param == param


@pytest.mark.fast
def test_one_domain_request_per_choice_with_its_own_seed():
    req = m.CompletionRequest.model_validate_json(json.dumps(
        {"model": "mock", "prompt": ["a", "b"], "n": 2, "seed": 7, "stop": "x", "top_k": -1, "ignore_eos": True,
         "temperature": 0}))
    reqs = convert.generate_requests(req, "cmpl-1")
    assert [(r.prompt.text, r.sampling.seed, r.request_id) for r in reqs] == [
        ("a", 7, "cmpl-1-0"), ("a", 8, "cmpl-1-1"), ("b", 7, "cmpl-1-2"), ("b", 8, "cmpl-1-3")]
    assert all(r.sampling.stop == ("x",) and r.sampling.top_k == 0 and r.sampling.ignore_eos for r in reqs)
    ids = convert.generate_requests(m.CompletionRequest(model="m", prompt=[[1, 2], [3]]), "c")
    assert [r.prompt.token_ids for r in ids] == [(1, 2), (3,)]
    too_many = m.CompletionRequest(model="m", prompt=["a"] * 5, n=4)
    with pytest.raises(Exception) as info:
        convert.generate_requests(too_many, "c")
    assert info.value.body.error.param == "n"
    chat = m.ChatCompletionRequest(model="m", messages=[{"role": "developer", "content": [
        {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}, {"role": "user", "content": "hi"}])
    (c,) = convert.generate_requests(chat, "chatcmpl-1")
    assert [(x.role, x.content) for x in c.prompt.chat] == [("system", "be brief"), ("user", "hi")]
    assert c.sampling.max_tokens == m.DEFAULT_CHAT_MAX_TOKENS


@pytest.mark.fast
def test_every_status_has_its_http_code():
    assert set(HTTP_FOR_CODE) == set(perr.Code)
    expected = {perr.InvalidArgument: 400, perr.Unauthenticated: 401, perr.ResourceExhausted: 429,
                perr.Unavailable: 503, perr.DeadlineExceeded: 504, perr.Internal: 500}
    for cls, status in expected.items():
        assert from_domain(cls("x")).status == status
    full = from_domain(perr.ResourceExhausted("full", retry_after_s=0.5))
    assert full.headers() == {"Retry-After": "1"} and full.body.error.code == "rate_limit_exceeded"
    bad = from_domain(perr.InvalidArgument("prefill node p0: prompt of 9 tokens plus max_tokens 9000 exceeds"))
    assert bad.body.error.param == "max_tokens"


def _chat_responder(**kw) -> convert.Responder:
    req = m.ChatCompletionRequest(model="mock", messages=CHAT, stream=True, **kw)
    return convert.Responder(req, "chatcmpl-1", "mock", "fp", 1, 1)


@pytest.mark.fast
def test_chat_chunks_are_openai_chunks():
    r = _chat_responder(stream_options={"include_usage": True}, logprobs=True)
    first = json.loads(r.first_chunks()[0])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}
    assert first["usage"] is None
    tok = json.loads(r.on_event(0, GenerateDelta("Par", (5,), (-0.25,))))
    assert tok["choices"][0]["delta"] == {"content": "Par"} and tok["choices"][0]["finish_reason"] is None
    assert tok["choices"][0]["logprobs"]["content"][0] == {"token": "Par", "logprob": -0.25,
                                                           "bytes": list(b"Par"), "top_logprobs": []}
    end = json.loads(r.on_event(0, GenerateFinal("x", FinishReason.EOS, 7, 1)))
    assert end["choices"][0]["delta"] == {} and end["choices"][0]["finish_reason"] == "stop"
    usage = json.loads(r.usage_chunk())
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 7, "completion_tokens": 1,
                                                         "total_tokens": 8}
    whole = r.response()
    assert whole.choices[0].message.content == "Par" and whole.choices[0].finish_reason == "stop"


@pytest.mark.fast
def test_a_stream_that_can_only_end_by_length_says_so_on_its_last_token():
    req = m.CompletionRequest(model="mock", prompt="a", max_tokens=2, ignore_eos=True, stream=True)
    r = convert.Responder(req, "cmpl-1", "mock", None, 1, 1)
    assert json.loads(r.on_event(0, GenerateDelta("a", (1,))))["choices"][0]["finish_reason"] is None
    last = json.loads(r.on_event(0, GenerateDelta("b", (2,))))
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last
    assert r.on_event(0, GenerateFinal("x", FinishReason.LENGTH, 3, 2)) is None
    assert r.usage_chunk() is None


# ---- against a cluster -------------------------------------------------------------------------

def _base_url(lc) -> str:
    return f"http://127.0.0.1:{lc.base + 2}/v1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    lc = start_local_cluster(tmp_path_factory.mktemp("openai"), decode_args=("--mock-decode-cost-per-step-s", "0.002"))
    yield lc
    lc.stop()


@pytest.fixture
def sdk(cluster):
    with openai.OpenAI(base_url=_base_url(cluster), api_key="unused", max_retries=0) as client:
        yield client


@pytest.mark.e2e
def test_openai_sdk_chat_streams_what_grpc_answers(cluster, sdk):
    with Client(cluster.coordinator) as grpc_client:
        expected = grpc_client.complete(messages=CHAT, max_tokens=20)
    stream = sdk.chat.completions.create(model="mock", messages=CHAT, max_completion_tokens=20, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == {"length": "length",
                                                                             "eos": "stop"}[
        expected.final.finish_reason.value]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected.final.completion_tokens
    assert chunks[-1].usage.prompt_tokens == expected.final.prompt_tokens
    whole = sdk.chat.completions.create(model="mock", messages=CHAT, max_tokens=20, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.content == expected.text
    assert whole.usage.total_tokens == expected.final.prompt_tokens + expected.final.completion_tokens


@pytest.mark.e2e
def test_openai_sdk_completions_text_ids_lists_n_and_logprobs(cluster, sdk):
    ref_ids, ref_text = mock_reference("Hello there", 12)
    out = sdk.completions.create(model="mock", prompt="Hello there", max_tokens=12, temperature=0, logprobs=0)
    assert out.choices[0].text == ref_text and out.choices[0].finish_reason == "length"
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 12 and "".join(lp.tokens) == ref_text and lp.text_offset[0] == 0
    streamed = sdk.completions.create(model="mock", prompt="Hello there", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref_text
    many = sdk.completions.create(model="mock", prompt=["Hello there", "x"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.text for c in many.choices] == [mock_reference("Hello there", 6)[1]] * 2 + [mock_reference("x", 6)[1]] * 2
    assert many.usage.completion_tokens == 24
    texts: dict[int, str] = {}
    for chunk in sdk.completions.create(model="mock", prompt=["Hello there", "x"], n=2, max_tokens=6, temperature=0,
                                        stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {i: c.text for i, c in enumerate(many.choices)}
    with Client(cluster.coordinator) as grpc_client:
        ids = grpc_client.complete("Hello there", max_tokens=3).final
    by_ids = sdk.completions.create(model="mock", prompt=[7, 8, 9], max_tokens=5, temperature=0)
    assert by_ids.usage.prompt_tokens == 3 and by_ids.usage.completion_tokens == 5 and ids.prompt_tokens > 0


@pytest.mark.e2e
def test_models_health_and_metrics(cluster, sdk):
    with Client(cluster.coordinator) as grpc_client:
        spec = next(n.info.model for n in grpc_client.cluster_status().nodes if n.info)
    (card,) = sdk.models.list().data
    assert card.id == "mock" and card.root == spec.fingerprint
    http = httpx.get(f"http://127.0.0.1:{cluster.base + 2}/health")
    assert http.status_code == 200 and http.json()["serving_nodes"]["prefill"] == 1
    sdk.completions.create(model="mock", prompt="count me", max_tokens=2)
    text = httpx.get(f"http://127.0.0.1:{cluster.base + 2}/metrics").text
    assert 'pdgrpc_requests_total{api="openai",model="mock",outcome="ok"}' in text
    assert 'pdgrpc_requests_total{api="grpc",model="mock",outcome="ok"}' in text


BAD = [
    ("/chat/completions", {"model": "mock", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.[0].role"),
    ("/chat/completions", {"model": "mock", "messages": CHAT, "unknown_field": True}, 400, "unknown_field"),
    ("/chat/completions", {"model": "mock", "messages": CHAT, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/chat/completions", {"model": "mock", "messages": CHAT, "frequency_penalty": 1}, 400, "frequency_penalty"),
    ("/completions", {"model": "mock", "prompt": ""}, 400, "prompt"),
    ("/completions", {"model": "mock", "prompt": [10 ** 8]}, 400, None),
    ("/completions", {"model": "mock", "prompt": "a", "stream": True, "max_tokens": 10 ** 9}, 400, "max_tokens"),
    ("/completions", {"model": "no-such-model", "prompt": "a"}, 404, "model"),
    ("/completions", "{not json", 400, None),
    ("/nowhere", {}, 404, None),
]


@pytest.mark.e2e
@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_openai_errors_and_nothing_dies(cluster, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(_base_url(cluster) + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert all(p.alive() for p in cluster.procs.values())


@pytest.mark.e2e
def test_sdk_raises_its_own_exceptions(sdk):
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="mock", messages=CHAT, extra_body={"guided_json": {}})
    assert info.value.body["param"] == "guided_json"


def _running(lc) -> int:
    with Client(lc.coordinator) as c:
        return sum(n.info.running_requests + n.info.queued_requests for n in c.cluster_status().nodes if n.info)


@pytest.mark.e2e
def test_client_disconnect_mid_stream_cancels_both_nodes_and_frees_kv(local_cluster):
    lc = local_cluster(prefill_args=("--mock-prefill-cost-per-token-s", "0.004"),
                       decode_args=("--mock-decode-cost-per-step-s", "0.05"))
    body = {"model": "mock", "messages": [{"role": "user", "content": "cancel me " * 30}], "max_tokens": 500,
            "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", _base_url(lc) + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 4:
                break
    # The connection is closed: the coordinator cancels both calls and releases the KV.
    assert wait_until(lambda: _running(lc) == 0, 10)
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)
    text = httpx.get(f"http://127.0.0.1:{lc.base + 1000}/metrics").text
    assert 'pdgrpc_requests_total{api="openai",model="mock",outcome="cancelled"} 1.0' in text
    with openai.OpenAI(base_url=_base_url(lc), api_key="x", max_retries=0) as sdk:
        assert sdk.completions.create(model="mock", prompt="still alive", max_tokens=4).usage.completion_tokens == 4
    assert all(p.alive() for p in lc.procs.values())


@pytest.mark.e2e
def test_429_with_retry_after_then_503_then_504(local_cluster):
    lc = local_cluster(decode_args=("--mock-decode-cost-per-step-s", "0.05"), coordinator={"max_inflight": 1})
    url = _base_url(lc) + "/completions"
    slow = {"model": "mock", "prompt": "busy", "max_tokens": 60}
    started = threading.Event()

    def hold() -> None:
        with httpx.stream("POST", url, json={**slow, "stream": True}, timeout=30) as r:
            for line in r.iter_lines():
                started.set()
                if line == "data: [DONE]":
                    return

    holder = threading.Thread(target=hold)
    holder.start()
    assert started.wait(10)
    busy = httpx.post(url, json={**slow, "max_tokens": 2}, timeout=10)
    holder.join(30)
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1, busy.text
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"

    late = httpx.post(url, json=slow, headers={"x-pdgrpc-timeout-s": "0.5"}, timeout=10)
    assert late.status_code == 504 and late.json()["error"]["code"] == "timeout", late.text
    with httpx.stream("POST", url, json={**slow, "stream": True}, headers={"x-pdgrpc-timeout-s": "0.5"},
                      timeout=10) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "timeout" and events[-1] == "data: [DONE]"
    assert wait_until(lambda: lc.store_stats()["total_keys"] == 0, 10)

    lc.kill("decode-0")
    assert wait_until(lambda: httpx.post(url, json={**slow, "max_tokens": 2}, timeout=10).status_code == 503, 10)
    gone = httpx.post(url, json={**slow, "max_tokens": 2}, timeout=10)
    assert gone.json()["error"]["type"] == "server_error" and "decode" in gone.json()["error"]["message"]
    assert all(p.alive() for name, p in lc.procs.items() if name != "decode-0")


@pytest.mark.e2e
def test_api_key_is_the_cluster_token(local_cluster):
    lc = local_cluster(env={"PDGRPC_AUTH_TOKEN": "s3cret"})
    with openai.OpenAI(base_url=_base_url(lc), api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError):
            sdk.completions.create(model="mock", prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()
    with openai.OpenAI(base_url=_base_url(lc), api_key="s3cret", max_retries=0) as sdk:
        assert sdk.completions.create(model="mock", prompt="a", max_tokens=2).usage.completion_tokens == 2
    assert httpx.get(f"http://127.0.0.1:{lc.base + 2}/health").status_code == 200
