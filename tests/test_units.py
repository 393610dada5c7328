"""Fast unit tests: no processes, no sockets."""

from __future__ import annotations

import math
import pathlib
import re

import pytest

from pdgrpc import config as cfgmod
from pdgrpc import convert
from pdgrpc import types as t
from pdgrpc.engine.colocated import generate_colocated
from pdgrpc.engine.detok import IncrementalDetokenizer, StopChecker
from pdgrpc.engine.mock import MockEngine, MockEngineConfig
from pdgrpc.errors import InvalidArgument

pytestmark = pytest.mark.fast
ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_detokenizer_holds_back_incomplete_characters():
    engine = MockEngine()
    tok = engine.tokenizer
    ids = tok.encode("héllo wörld ✓")[1:]
    detok = IncrementalDetokenizer(tok.decode, tok.encode("prompt "))
    text = "".join(detok.add(i) for i in ids)
    assert text == "héllo wörld ✓"
    assert "\ufffd" not in text


@pytest.mark.parametrize("deltas,stops,expected", [
    (["hel", "lo wo", "rld"], ("o w",), "hell"),
    (["abc", "def"], ("zz",), "abcdef"),
    (["ab", "c"], ("bc",), "a"),
    (["STOP"], ("STOP",), ""),
    (["a", "b", "x"], ("abc",), "abx"),
])
def test_stop_checker_cuts_at_the_stop_string(deltas, stops, expected):
    checker = StopChecker(stops)
    out = ""
    for d in deltas:
        emitted, stopped = checker.feed(d)
        out += emitted
        if stopped:
            break
    else:
        out += checker.flush()
    assert out == expected


def test_mock_engine_is_deterministic_and_depends_on_the_kv():
    engine = MockEngine()
    ids = engine.tokenizer.encode("hello")
    a = generate_colocated(engine, ids, t.SamplingParams(max_tokens=12))
    b = generate_colocated(engine, ids, t.SamplingParams(max_tokens=12))
    assert a == b and len(a[0]) == 12
    c = generate_colocated(engine, engine.tokenizer.encode("hellp"), t.SamplingParams(max_tokens=12))
    assert c[0] != a[0]


def test_mock_seeded_sampling_is_reproducible():
    engine = MockEngine()
    ids = engine.tokenizer.encode("seeded")
    s = t.SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    assert generate_colocated(engine, ids, s) == generate_colocated(engine, ids, s)
    other = generate_colocated(engine, ids, t.SamplingParams(max_tokens=16, temperature=0.8, seed=8))
    assert other[0] != generate_colocated(engine, ids, s)[0]


def _mock_decode(engine, ids, groups, first_token, steps):
    from pdgrpc.engine.base import DecodeWork

    seq = engine.begin_sequence(DecodeWork("r", ids, t.SamplingParams(max_tokens=steps + 1)))
    for g in groups:
        engine.load_kv(seq, g)
    engine.start_decoding(seq, first_token)
    return [first_token] + [engine.decode_step([seq])[0].token_id for _ in range(steps)]


def test_mock_decode_from_handed_off_kv_matches_colocated_and_wrong_kv_does_not():
    """The mock's digest reads a sample of the KV (every 16th value): it must still tell the right KV
    from another prompt's, from groups loaded at the wrong layers, and from a group's bytes at the
    wrong tokens."""
    from pdgrpc.engine.base import KVGroup, PrefillWork, SampledToken

    engine = MockEngine(MockEngineConfig(layers_per_group=10))
    ids, other = engine.tokenizer.encode("hand off"), engine.tokenizer.encode("hand of!")

    def prefill(prompt):
        items = [item for _, item in engine.prefill([PrefillWork("r", prompt, t.SamplingParams())])]
        return [i for i in items if isinstance(i, KVGroup)], next(i for i in items if isinstance(i, SampledToken))

    groups, first = prefill(ids)
    expected = list(generate_colocated(engine, ids, t.SamplingParams(max_tokens=12))[0])
    assert _mock_decode(engine, ids, groups, first.token_id, 11) == expected
    wrong_prompt = prefill(other)[0]
    assert _mock_decode(engine, ids, wrong_prompt, first.token_id, 11) != expected
    shifted = [KVGroup(g.layer_start, g.layer_end, g.token_start, g.token_end, groups[(k + 1) % len(groups)].data)
               for k, g in enumerate(groups)]
    assert _mock_decode(engine, ids, shifted, first.token_id, 11) != expected
    rolled = bytearray(groups[1].data)
    rolled = rolled[64 * 4:] + rolled[:64 * 4]  # every head vector moved by one token
    bad = [groups[0], KVGroup(10, 20, 0, len(ids), bytes(rolled)), groups[2]]
    assert _mock_decode(engine, ids, bad, first.token_id, 11) != expected


def test_mock_kv_size_matches_the_configured_shape():
    engine = MockEngine(MockEngineConfig(num_layers=4, num_kv_heads=2, head_dim=8, dtype="bfloat16"))
    data = engine.kv_bytes([5, 6, 7], 0, 4)
    assert len(data) == engine.spec.kv_bytes(4, 3) == 4 * 2 * 2 * 3 * 8 * 2


@pytest.mark.parametrize("params,field", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=-3), "max_tokens"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.2), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(stop=("",)), "stop"),
])
def test_sampling_validation_names_the_field(params, field):
    with pytest.raises(InvalidArgument, match=field):
        t.SamplingParams(**{"max_tokens": 4, **params}).validate(100)


def test_convert_round_trips_a_generate_request():
    req = t.GenerateRequest(t.Prompt(chat=(t.ChatMessage("user", "hi"),)),
                            t.SamplingParams(max_tokens=5, temperature=0.5, seed=3, stop=("x",)), "r1")
    assert convert.generate_request_from_pb(convert.generate_request_to_pb(req)) == req


def test_convert_rejects_unknown_fields():
    from pdgrpc.v1 import coordinator_pb2

    raw = convert.generate_request_to_pb(t.GenerateRequest(t.Prompt(text="x"), t.SamplingParams())).SerializeToString()
    msg = coordinator_pb2.GenerateRequest.FromString(raw + b"\xa8\x06\x01")  # field 101, varint 1
    with pytest.raises(InvalidArgument, match="unknown fields"):
        convert.generate_request_from_pb(msg)


def test_convert_carries_several_tokens_per_message_and_reads_old_single_tokens():
    from pdgrpc.v1 import decode_pb2

    out = t.TokenOut.one(5, "a", -0.5).merged(t.TokenOut.one(6, "b", -0.25))
    assert out == t.TokenOut((5, 6), "ab", (-0.5, -0.25))
    assert convert.decode_event_from_pb(convert.decode_event_to_pb(out)) == out
    assert convert.colocated_event_from_pb(convert.colocated_event_to_pb(out)) == out
    legacy = decode_pb2.DecodeResponse(token=decode_pb2.DecodeToken(token_id=7, text="c", logprob=-1.0))
    assert convert.decode_event_from_pb(legacy) == t.TokenOut((7,), "c", (-1.0,))
    for bad in (decode_pb2.DecodeTokens(), decode_pb2.DecodeTokens(token_ids=[1, 2], logprobs=[0.0])):
        with pytest.raises(InvalidArgument, match="DecodeTokens"):
            convert.decode_event_from_pb(decode_pb2.DecodeResponse(tokens=bad))


def test_config_fills_ports_from_the_base_and_rejects_mistakes(tmp_path):
    cfg = cfgmod.from_dict({"prefill": [{}, {}], "decode": [{}]}, 40000)
    assert cfg.coordinator.port == 40000 and cfg.store.port == 40001
    assert [n.port for n in cfg.nodes] == [40010, 40011, 40040]
    assert cfg.nodes[0].metrics_port == 41010
    with pytest.raises(cfgmod.ConfigError, match="unknown"):
        cfgmod.from_dict({"prefill": [{"bogus": 1}], "decode": [{}]})
    with pytest.raises(cfgmod.ConfigError, match="at least one"):
        cfgmod.from_dict({"prefill": [{}]})
    with pytest.raises(cfgmod.ConfigError, match="both use"):
        cfgmod.from_dict({"prefill": [{"port": 41000}], "decode": [{"port": 41000}]})
    two = cfgmod.from_dict({"coordinator": {"processes": 2}, "prefill": [{}], "decode": [{}]}, 40000)
    assert [two.coordinator.worker_metrics_port(k) for k in range(2)] == [41000, 41001]
    for bad in (0, cfgmod.MAX_COORDINATOR_PROCESSES + 1):
        with pytest.raises(cfgmod.ConfigError, match="processes"):
            cfgmod.from_dict({"coordinator": {"processes": bad}, "prefill": [{}], "decode": [{}]})
    with pytest.raises(cfgmod.ConfigError, match="and coordinator 1 metrics both use"):  # worker 1's port taken
        cfgmod.from_dict({"coordinator": {"processes": 2}, "prefill": [{"metrics_port": 41001}], "decode": [{}]},
                         40000)
    assert cfgmod.load(str(ROOT / "deploy" / "local.toml")).store.port == 9015
    chunked = cfgmod.from_dict({"defaults": {"engine": "torch", "prefill_chunk_tokens": 256},
                                "prefill": [{}], "decode": [{}]}, 40000)
    assert [n.engine.prefill_chunk_tokens for n in chunked.nodes] == [256, 256]
    from pdgrpc.launcher import node_command

    cmd = node_command(chunked.nodes[0], chunked, [])
    assert cmd[cmd.index("--prefill-chunk-tokens") + 1] == "256"
    for bad, fragment in (({"engine": "torch", "prefill_chunk_tokens": -1}, ">= 0"),
                          ({"engine": "mock", "prefill_chunk_tokens": 64}, "torch engine option"),
                          ({"engine": "torch", "linear_kernel": "blas"}, "must be one of"),
                          ({"engine": "vllm", "linear_kernel": "torch"}, "torch engine option"),
                          ({"engine": "torch", "mkl_dispatch": "intel"}, "must be one of"),
                          ({"engine": "mock", "mkl_dispatch": "vendor"}, "torch engine option")):
        with pytest.raises(cfgmod.ConfigError, match=fragment):
            cfgmod.from_dict({"defaults": bad, "prefill": [{}], "decode": [{}]}).validate()
    kernel = cfgmod.from_dict({"defaults": {"engine": "torch"}, "prefill": [{"linear_kernel": "torch"}],
                               "decode": [{}]}, 40000)
    assert [n.engine.linear_kernel for n in kernel.nodes] == ["torch", ""]
    cmds = [node_command(n, kernel, []) for n in kernel.nodes]
    assert cmds[0][cmds[0].index("--linear-kernel") + 1] == "torch" and "--linear-kernel" not in cmds[1]
    mkl = cfgmod.from_dict({"defaults": {"engine": "torch"}, "prefill": [{}],
                            "decode": [{"mkl_dispatch": "vendor"}]}, 40000)
    cmds = [node_command(n, mkl, []) for n in mkl.nodes]
    assert "--mkl-dispatch" not in cmds[0] and cmds[1][cmds[1].index("--mkl-dispatch") + 1] == "vendor"
    streamed = cfgmod.from_dict({"prefill": [{}], "decode": [{"stream_interval": 4}]}, 40000)
    cmds = [node_command(n, streamed, []) for n in streamed.nodes]
    assert [c[c.index("--stream-interval") + 1] for c in cmds] == ["1", "4"]
    with pytest.raises(cfgmod.ConfigError, match="stream_interval"):
        cfgmod.from_dict({"defaults": {"stream_interval": 0}, "prefill": [{}], "decode": [{}]})
    assert cfgmod.parse_size("2GB") == 2 * 10**9 and cfgmod.parse_size("1GiB") == 2**30


def test_decode_nodes_on_cores_of_their_own_use_them_all():
    from pdgrpc.launcher import node_command

    def threads(raw):
        cluster = cfgmod.from_dict(raw, 40000)
        cmds = {n.name: node_command(n, cluster, []) for n in cluster.nodes}
        return {k: int(v[v.index("--threads") + 1]) if "--threads" in v else 0 for k, v in cmds.items()}

    # Own cores: all of them; shared with prefill, or unpinned: 0 (the node takes half its allowed cores).
    assert threads({"prefill": [{"cpus": [0]}], "decode": [{"cpus": [1]}]}) == {"prefill-0": 0, "decode-0": 1}
    assert threads({"prefill": [{"cpus": [0, 1]}], "decode": [{"cpus": [1]}]})["decode-0"] == 0
    assert threads({"prefill": [{}], "decode": [{"cpus": [1]}]})["decode-0"] == 0
    assert threads({"prefill": [{"cpus": [0]}], "decode": [{"cpus": [1], "threads": 3}]})["decode-0"] == 3


def test_only_servicers_and_convert_import_pb2_messages():
    allowed = {"convert.py", "servicers.py", "servicer.py"}
    offenders = []
    for path in (ROOT / "pdgrpc").rglob("*.py"):
        if "v1" in path.parts:
            continue
        text = path.read_text()
        if re.search(r"from pdgrpc\.v1 import [a-z_]+_pb2\b(?!_grpc)", text) and path.name not in allowed:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


@pytest.mark.parametrize("handle", [{}, {"dtype": "float32"}, {"dtype": "not_a_dtype", "storage": "typed"},
                                    {"dtype": "float32", "storage": "typed", "size": ["x"]}])
def test_malformed_cuda_ipc_handles_are_invalid_not_fatal(handle):
    pytest.importorskip("torch")
    from pdgrpc.transfer.cuda_ipc import open_handle

    with pytest.raises(InvalidArgument, match="cuda_ipc"):
        open_handle(handle)


def test_cuda_ipc_refuses_cpu_tensors():
    torch = pytest.importorskip("torch")
    from pdgrpc.transfer.cuda_ipc import export_handle

    with pytest.raises(InvalidArgument, match="CUDA"):
        export_handle(torch.zeros(4))


async def test_engine_thread_runs_calls_queued_during_an_item_before_the_next_item():
    """A colocated node's decode step submitted while a prefill chunk runs gets the engine thread
    before the next chunk does (iterate drives the generator one item per call)."""
    import asyncio
    import threading

    from pdgrpc.nodes.engine_thread import EngineThread

    thread = EngineThread("t")
    order: list[str] = []
    blocked, proceed = threading.Event(), threading.Event()

    def prefill():
        yield "first"
        blocked.set()
        assert proceed.wait(10)
        order.append("chunk done")
        yield None
        order.append("next chunk")
        yield "last"

    async def decode_step_meanwhile() -> None:
        while not blocked.is_set():
            await asyncio.sleep(0.005)
        call = asyncio.ensure_future(thread.call(order.append, "decode step"))
        await asyncio.sleep(0)  # the call is queued behind the running item
        proceed.set()
        await call

    side = asyncio.ensure_future(decode_step_meanwhile())
    items = [item async for item in thread.iterate(prefill)]
    await side
    assert items == ["first", None, "last"]
    assert order == ["chunk done", "decode step", "next chunk"]
    # A consumer that stops early (and closes the iteration) closes the generator in the thread.
    import contextlib

    closed: list[bool] = []

    def endless():
        try:
            while True:
                yield 1
        finally:
            closed.append(threading.current_thread() is not threading.main_thread())

    async with contextlib.aclosing(thread.iterate(endless)) as items_left:
        async for _ in items_left:
            break
    assert closed == [True]
    thread.shutdown()


def test_event_loop_is_uvloop_unless_asked_otherwise(monkeypatch):
    import asyncio
    import os
    import subprocess
    import sys

    from pdgrpc import event_loop

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    monkeypatch.delenv(event_loop.ENV, raising=False)
    assert event_loop.run(loop_module()).startswith("uvloop")  # a dependency on Linux: "auto" finds it
    assert event_loop.run(loop_module(), "asyncio").startswith("asyncio")
    assert event_loop.loop_factory(" UVLOOP ")[0] == "uvloop"
    with pytest.raises(ValueError, match="PDGRPC_EVENT_LOOP='trio'"):
        event_loop.run(loop_module(), "trio")
    # A process started with a bad choice says so and exits 2 before it listens on anything.
    env = {**os.environ, event_loop.ENV: "trio"}
    for role in ("kvstore", "decode"):
        proc = subprocess.run([sys.executable, "-m", "pdgrpc", role, "--port", "1"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and "must be one of auto, uvloop, asyncio" in proc.stderr, proc.stderr


async def test_prefill_tokenizes_short_texts_on_the_loop_and_never_two_at_once():
    """A short text is encoded on the event loop while the tokenizer thread is idle; anything else
    goes to that thread; the tokenizer is never in two calls at once (it is not thread-safe)."""
    import asyncio
    import threading
    import time

    from pdgrpc.nodes.prefill_service import INLINE_TOKENIZE_CHARS, PrefillLimits, PrefillService

    engine = MockEngine()
    reference = engine.tokenize
    inside, overlaps, threads = [], [], []

    def tokenize(prompt):
        if inside:
            overlaps.append(prompt)
        inside.append(prompt)
        threads.append(threading.get_ident())
        try:
            time.sleep(0.002)
            return reference(prompt)
        finally:
            inside.pop()

    engine.tokenize = tokenize
    service = PrefillService("p", engine, None, None, PrefillLimits())
    try:
        short = t.Prompt(text="hi")
        assert await service._tokenize(short) == reference(short)
        assert threads == [threading.get_ident()]  # alone: on the loop
        prompts = [t.Prompt(text="x" * (INLINE_TOKENIZE_CHARS + 1 if i % 3 == 0 else 5)) for i in range(12)]
        prompts.append(t.Prompt(token_ids=(7, 8, 9)))
        got = await asyncio.gather(*(service._tokenize(p) for p in prompts))
        assert got == [reference(p) for p in prompts]
        assert not overlaps
        assert len(threads) == 13  # token ids are taken as they are
        assert threading.get_ident() not in threads[1:]  # the thread was busy: everything went there
    finally:
        await service.stop()


async def test_decode_scheduler_starts_a_sequence_in_its_first_steps_call_and_fails_only_it():
    """A new sequence is started in the same engine-thread call as its first step (a call of its
    own made it wait behind the running step and miss the next one); a sequence that cannot start
    gets its own error, and the others in the batch their tokens."""
    from pdgrpc.engine.base import DecodeWork, KVGroup, PrefillWork, SampledToken
    from pdgrpc.engine.output import OutputTracker
    from pdgrpc.errors import FailedPrecondition
    from pdgrpc.nodes.decode_scheduler import DecodeScheduler
    from pdgrpc.nodes.engine_thread import EngineThread

    engine = MockEngine(MockEngineConfig(layers_per_group=10))
    thread = EngineThread("t")
    calls = []
    real_call = thread.call

    async def counting_call(fn, *args):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return await real_call(fn, *args)

    thread.call = counting_call
    scheduler = DecodeScheduler("d", engine, thread, max_batch=8)
    scheduler.start()
    try:
        def prepared(text, groups_loaded):
            ids = engine.tokenizer.encode(text)
            items = [item for _, item in engine.prefill([PrefillWork("r", ids, t.SamplingParams())])]
            first = next(i for i in items if isinstance(i, SampledToken)).token_id
            seq = engine.begin_sequence(DecodeWork("r", ids, t.SamplingParams(max_tokens=4)))
            for g in [i for i in items if isinstance(i, KVGroup)][:groups_loaded]:
                engine.load_kv(seq, g)
            tracker = OutputTracker(engine.tokenizer, ids, t.SamplingParams(max_tokens=4), engine.spec.eos_token_ids)
            tracker.add(first)
            return ids, seq, tracker, first

        ids, seq, tracker, first = prepared("good one", 3)
        _, bad_seq, bad_tracker, bad_first = prepared("partial", 1)
        good = scheduler.add(seq, tracker, first)
        bad = scheduler.add(bad_seq, bad_tracker, bad_first)
        tokens = []
        while True:
            item = await good.out.get()
            tokens += item[0].token_ids
            if item[1] is not None:
                break
        assert [first] + tokens == generate_colocated(engine, ids, t.SamplingParams(max_tokens=4))[0]
        assert isinstance(await bad.out.get(), FailedPrecondition)
        assert calls == ["_start_and_step"] * 3  # 3 steps for 3 tokens; no call of its own to start
    finally:
        await scheduler.stop()
        thread.shutdown()


def test_status_table_says_which_nodes_are_batch_invariant():
    from pdgrpc.status_cli import table
    from pdgrpc.types import ClusterStatus, ModelSpec, NodeHealth, NodeInfo, NodeStatus, Role

    spec = ModelSpec("m", "fp", 2, 1, 8, "float32", 512, 64, "torch")
    nodes = tuple(NodeStatus(name, Role.DECODE, f"127.0.0.1:{port}", NodeHealth.SERVING, 0,
                             NodeInfo(name, Role.DECODE, spec, 0, 0, 8, invariant, "detail"), 0.1)
                  for name, port, invariant in (("d-ok", 1, True), ("d-bad", 2, False), ("d-mock", 3, None)))
    lines = table(ClusterStatus(nodes, "127.0.0.1:9", 0)).splitlines()
    assert lines[0].split()[-1] == "INVARIANT"
    assert {line.split()[0]: line.split()[-1] for line in lines[1:-1]} == {"d-ok": "yes", "d-bad": "NO", "d-mock": "-"}
