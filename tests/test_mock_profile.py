"""The mock engine's cost profiles (pdgrpc.engine.mock_profile): files parse and are checked, the
model is the documented formula, the mock sleeps what it says (wall time, not CPU), and a cluster
of nodes started with --mock-profile serves requests with the profile's KV geometry."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
import types

import pytest
from conftest import pdgrpc_cmd

from pdgrpc import config as cfgmod
from pdgrpc.engine import mock as mock_module
from pdgrpc.engine.base import EngineOptions, KVGroup, PrefillWork, SampledToken
from pdgrpc.engine.colocated import generate_colocated, prefill_in_memory, start_sequence
from pdgrpc.engine.mock import MockEngine, MockEngineConfig
from pdgrpc.engine.mock_profile import MockProfile, ProfileError, load_profile, shipped_profiles
from pdgrpc.engine.registry import build_engine, check_options
from pdgrpc.types import SamplingParams

SHIPPED = ("smollm2-135m-cpu-epyc2", "llama3-8b-a100-vidur")
GREEDY = SamplingParams(max_tokens=1 << 20, ignore_eos=True)


def _raw(**changes) -> dict:
    raw = json.loads(load_profile("smollm2-135m-cpu-epyc2").to_json())
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not _DROP}


_DROP = object()


def _profile(**coef) -> MockProfile:
    return MockProfile(name="t", model="m", hardware="h", source="test", num_layers=30, num_kv_heads=3,
                       head_dim=64, dtype="float32", **coef)


# ---- files ---------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load_and_say_where_their_numbers_came_from(name):
    p = load_profile(name)
    assert name in shipped_profiles() and p.name == name
    assert p.source.startswith("measured here with tools/calibrate_mock_profile.py" if "cpu" in name
                               else "published: ")
    assert p.kv_bytes_per_token == 2 * p.num_layers * p.num_kv_heads * p.head_dim * (4 if p.dtype == "float32" else 2)
    assert p.prefill_s(512) > p.prefill_s(16) > 0 and p.decode_step_s(8, 4000) >= p.decode_step_s(1, 100) > 0
    assert p.measurements  # the points the coefficients were fitted to travel with them


@pytest.mark.fast
@pytest.mark.parametrize("change, field", [
    ({"source": _DROP}, "source"),
    ({"source": " "}, "source"),
    ({"decode_base_s": -0.001}, "decode_base_s"),
    ({"prefill_per_token_s": "fast"}, "prefill_per_token_s"),
    ({"prefill_per_token2_s": float("nan")}, "prefill_per_token2_s"),
    ({"num_layers": 0}, "num_layers"),
    ({"head_dim": 64.5}, "head_dim"),
    ({"dtype": "int8"}, "dtype"),
    ({"kv_bytes_per_token": 12345}, "kv_bytes_per_token"),
    ({"decode_speed": 3}, "decode_speed"),
])
def test_bad_profile_files_are_refused_naming_the_field(tmp_path, change, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_raw(**change)))
    with pytest.raises(ProfileError, match=field) as err:
        load_profile(str(path))
    assert str(path) in str(err.value)


@pytest.mark.fast
def test_unreadable_profiles_are_refused_with_a_message(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(tmp_path / "broken.json"))
    with pytest.raises(ProfileError, match="JSON object"):
        load_profile(str(tmp_path / "list.json"))
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile(str(tmp_path / "absent.json"))
    with pytest.raises(ProfileError, match="no shipped mock profile 'gpt-9'.*smollm2-135m-cpu-epyc2"):
        load_profile("gpt-9")


# ---- the model -------------------------------------------------------------------------------------

@pytest.mark.fast
def test_modelled_times_follow_the_formula():
    p = _profile(prefill_base_s=0.01, prefill_per_token_s=0.002, prefill_per_token2_s=1e-6,
                 decode_base_s=0.005, decode_per_seq_s=0.0003, decode_per_context_token_s=2e-7)
    assert p.prefill_s(100) == pytest.approx(0.01 + 0.2 + 0.01)
    assert p.prefill_s(1000) == pytest.approx(0.01 + 2.0 + 1.0)
    assert p.decode_step_s(4, 2000) == pytest.approx(0.005 + 0.0012 + 0.0004)
    assert p.decode_step_s(32, 64000) == pytest.approx(0.005 + 0.0096 + 0.0128)
    assert p.prefill_s(0) == 0 and p.decode_step_s(0, 0) == 0


@pytest.mark.fast
def test_the_two_constants_are_a_trivial_profile():
    p = MockEngine(MockEngineConfig(prefill_cost_per_token_s=0.003, decode_cost_per_step_s=0.02)).profile
    assert p.prefill_s(10) == pytest.approx(0.03) and p.prefill_s(300) == pytest.approx(0.9)
    assert p.decode_step_s(1, 50) == pytest.approx(0.02) and p.decode_step_s(16, 9000) == pytest.approx(0.02)
    bf16 = MockEngine(MockEngineConfig(dtype="bfloat16", num_layers=12))
    assert bf16.profile.kv_bytes_per_token == bf16.spec.kv_bytes(12, 1) == 2 * 12 * 3 * 64 * 2


def _decoding(engine: MockEngine, prompts: list[list[int]]):
    return [start_sequence(engine, f"r{i}", ids, GREEDY, *prefill_in_memory(engine, f"r{i}", ids, GREEDY))
            for i, ids in enumerate(prompts)]


@pytest.mark.fast
def test_mock_sleeps_the_modelled_time_group_by_group_and_step_by_step(monkeypatch):
    p = _profile(prefill_base_s=0.01, prefill_per_token_s=0.002, prefill_per_token2_s=1e-6,
                 decode_base_s=0.005, decode_per_seq_s=0.0003, decode_per_context_token_s=2e-7)
    engine = MockEngine(MockEngineConfig.for_profile(p))
    slept: list[float] = []
    clock = [100.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    # A clock that only sleeping moves: the mock's own work takes no time, so it sleeps all of the model.
    monkeypatch.setattr(mock_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep,
                                                                    time_ns=time.time_ns))
    ids = list(range(3, 203))
    items = [item for _, item in engine.prefill([PrefillWork("p", ids, GREEDY)])]
    assert len(slept) == 5 == sum(isinstance(i, KVGroup) for i in items)  # one sleep before each group goes out
    assert sum(slept) == pytest.approx(p.prefill_s(200))
    seqs = _decoding(engine, [list(range(3, 53)), list(range(3, 153))])
    slept.clear()
    engine.decode_step(seqs)
    engine.decode_step(seqs)
    # Context: each sequence's cache plus the token fed: 50 + 150 at the first step, 2 more at the next.
    assert slept == pytest.approx([p.decode_step_s(2, 202), p.decode_step_s(2, 204)])


@pytest.mark.fast
def test_work_between_groups_counts_toward_the_modelled_time(monkeypatch):
    # The node publishes a group while the engine computes the next one, as on a GPU: time the caller
    # spends between two groups is not added to the model's.
    engine = MockEngine(MockEngineConfig.for_profile(_profile(prefill_per_token_s=0.001)))
    clock, slept = [0.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(mock_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep,
                                                                    time_ns=time.time_ns))
    group = 0.3 / 5  # 300 tokens at 1 ms, 5 groups
    for _ in engine.prefill([PrefillWork("p", list(range(3, 303)), GREEDY)]):
        clock[0] += group / 4  # the caller's work on each item
    assert slept[0] == pytest.approx(group) and slept[1:] == pytest.approx([group * 3 / 4] * 4)
    assert clock[0] == pytest.approx(0.3 + 2 * group / 4)  # the model's 0.3 s, then the caller on the last two items


@pytest.mark.fast
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mock_kv_values_are_the_documented_function_of_token_position_layer_kind_head(dtype):
    import numpy as np

    engine = MockEngine(MockEngineConfig(dtype=dtype, num_layers=8, num_kv_heads=4, head_dim=32))
    ids = [5, 300, 49000, 77]
    kv = engine._kv_array(ids, 2, 7, first_position=10)  # [layer][k|v][head][token][dim]
    expected = np.empty((5, 2, 4, 4, 32), dtype=np.float32)
    for li, layer in enumerate(range(2, 7)):
        for kind in range(2):
            for head in range(4):
                for t, tok in enumerate(ids):
                    v = np.float32((tok * 131 + (10 + t) * 7 + layer * 17 + kind * 3 + head) % 1009) / np.float32(1009)
                    expected[li, kind, head, t] = v + np.arange(32, dtype=np.float32) / np.float32(4096)
    want = {"float32": expected, "float16": expected.astype(np.float16),
            "bfloat16": (expected.view(np.uint32) >> 16).astype(np.uint16)}[dtype]
    assert kv.dtype == want.dtype and kv.tobytes() == want.tobytes()
    assert engine._kv_array(ids, 2, 7, 10, 16).tobytes() == want[..., ::16].tobytes()  # what the digest reads


@pytest.mark.fast
def test_a_profile_leaves_tokens_and_kv_as_the_mock_makes_them():
    profiled = MockEngine(MockEngineConfig.for_profile(_profile(decode_base_s=0.0001)))
    plain = MockEngine()
    assert profiled.spec == plain.spec
    ids = plain.tokenizer.encode("The quick brown fox")
    sampling = SamplingParams(max_tokens=12)
    assert generate_colocated(profiled, ids, sampling)[:2] == generate_colocated(plain, ids, sampling)[:2]


@pytest.mark.fast
def test_decode_steps_cost_wall_time_not_cpu_time():
    engine = MockEngine(MockEngineConfig.for_profile(_profile(decode_base_s=0.02, decode_per_seq_s=0.001)))
    seqs = _decoding(engine, [list(range(3, 40))] * 4)
    wall0, cpu0 = time.monotonic(), time.process_time()
    for _ in range(10):
        out = engine.decode_step(seqs)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    assert len(out) == 4 and all(isinstance(t, SampledToken) for t in out)
    assert wall >= 10 * 0.024 * 0.95, wall  # the modelled time did pass: it slept ...
    assert cpu < 0.3 * wall, (cpu, wall)     # ... and did not spin


# ---- options ---------------------------------------------------------------------------------------

@pytest.mark.fast
def test_engine_option_builds_the_profiles_model_geometry():
    engine = build_engine(EngineOptions(mock_profile="llama3-8b-a100-vidur"))
    p = load_profile("llama3-8b-a100-vidur")
    assert engine.profile == p
    spec = engine.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype) == (32, 8, 128, "bfloat16")
    assert spec.kv_bytes(spec.num_layers, 1) == p.kv_bytes_per_token == 131072
    assert spec.fingerprint != MockEngine().spec.fingerprint  # decode nodes check it against prefill's


@pytest.mark.fast
@pytest.mark.parametrize("opts, message", [
    (EngineOptions(mock_profile="nope"), "no shipped mock profile 'nope'"),
    (EngineOptions(name="torch", mock_profile="smollm2-135m-cpu-epyc2"), "mock engine option, not torch's"),
    (EngineOptions(mock_profile="smollm2-135m-cpu-epyc2", mock_decode_cost_per_step_s=0.01), "one or the other"),
    (EngineOptions(mock_profile="llama3-8b-a100-vidur", dtype="float32"), "differs from mock profile"),
])
def test_bad_mock_profile_options_are_refused_at_start(opts, message):
    with pytest.raises(ValueError, match=message):
        check_options(opts, "", ValueError)


@pytest.mark.fast
def test_config_key_and_launcher_flag(tmp_path):
    from pdgrpc.launcher import node_command

    cfg = cfgmod.from_dict({"defaults": {"mock_profile": "llama3-8b-a100-vidur"}, "prefill": [{}], "decode": [{}]})
    assert all(n.engine.mock_profile == "llama3-8b-a100-vidur" for n in cfg.nodes)
    cmd = node_command(cfg.nodes[0], cfg, [])
    assert cmd[cmd.index("--mock-profile") + 1] == "llama3-8b-a100-vidur"
    plain = cfgmod.from_dict({"prefill": [{}], "decode": [{}]})
    assert "--mock-profile" not in node_command(plain.nodes[0], plain, [])
    with pytest.raises(cfgmod.ConfigError, match="no shipped mock profile"):
        cfgmod.from_dict({"defaults": {"mock_profile": "typo"}, "prefill": [{}], "decode": [{}]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_raw(decode_per_seq_s=-1)))
    with pytest.raises(cfgmod.ConfigError, match="decode_per_seq_s"):
        cfgmod.from_dict({"defaults": {"mock_profile": str(bad)}, "prefill": [{}], "decode": [{}]})


# ---- processes -------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_node_with_a_bad_profile_refuses_to_start(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_raw(head_dim=0)))
    out = subprocess.run(pdgrpc_cmd("prefill", "--port", "1", "--mock-profile", str(bad)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "head_dim" in out.stderr, out.stderr


@pytest.mark.e2e
def test_cluster_with_mock_profile_serves_with_the_profiles_geometry(local_cluster):
    from pdgrpc.client import Client

    lc = local_cluster(node_args=("--mock-profile", "llama3-8b-a100-vidur"))
    prompt = "Profiles pace the mock like a GPU. " * 3
    with Client(lc.coordinator) as client:
        res = client.complete(prompt, max_tokens=10)
    engine = MockEngine(MockEngineConfig.for_profile(load_profile("llama3-8b-a100-vidur")))
    _, expected, _ = generate_colocated(engine, engine.tokenizer.encode(prompt), SamplingParams(max_tokens=10))
    assert res.text == expected
    assert res.final.timings.kv_groups == 6  # 32 layers in groups of 6: the profile's model, not the mock's 30
    assert res.final.completion_tokens == 10


@pytest.mark.fast
def test_profile_dataclass_round_trips():
    p = load_profile("smollm2-135m-cpu-epyc2")
    assert MockProfile.from_dict(json.loads(p.to_json())) == p
    assert dataclasses.replace(p, decode_base_s=0.5).decode_step_s(1, 0) == pytest.approx(0.5 + p.decode_per_seq_s)


@pytest.mark.fast
def test_calibration_fit_recovers_known_coefficients_and_keeps_them_nonnegative():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "calibrate_mock_profile.py"
    spec = importlib.util.spec_from_file_location("calibrate_mock_profile", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    truth = _profile(prefill_base_s=0.02, prefill_per_token_s=0.001, prefill_per_token2_s=2e-6,
                     decode_base_s=0.03, decode_per_seq_s=0.002, decode_per_context_token_s=1e-5)
    prefill = [(n, truth.prefill_s(n)) for n in (16, 64, 256, 512, 1024)]
    decode = [(b, c, truth.decode_step_s(b, c)) for b in (1, 4, 16) for c in (b * 32, b * 900)]
    coef, errors = tool.fit_profile(prefill, decode)
    for key, value in coef.items():
        assert value == pytest.approx(getattr(truth, key), rel=1e-3), key
    assert max(errors.values()) < 1e-3
    # Times that fall with the batch: the negative slope is dropped, not shipped.
    coef, _ = tool.fit_profile(prefill, [(1, 10, 0.05), (2, 20, 0.045), (4, 40, 0.04), (8, 80, 0.035)])
    assert min(coef.values()) >= 0
