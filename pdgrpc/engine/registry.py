"""Engines by name, so nodes and the launcher pick one with `--engine NAME`.

The registry only maps a name to the function that builds it and to the check of its options; each
engine keeps its own options and kernels (``torch_options``, ``torch_kernel_plan``). Builders import
their engine lazily: a mock node never loads torch.
"""

from __future__ import annotations

from collections.abc import Callable

from pdgrpc.engine.base import Engine, EngineOptions


def _build_mock(opts: EngineOptions) -> Engine:
    from pdgrpc.engine.mock import MockEngine, MockEngineConfig

    if opts.mock_profile:
        from pdgrpc.engine.mock_profile import load_profile

        profile = load_profile(opts.mock_profile)
        return MockEngine(MockEngineConfig.for_profile(profile, layers_per_group=opts.mock_layers_per_group))
    return MockEngine(MockEngineConfig(
        dtype=opts.dtype or "float32",
        layers_per_group=opts.mock_layers_per_group,
        prefill_cost_per_token_s=opts.mock_prefill_cost_per_token_s,
        decode_cost_per_step_s=opts.mock_decode_cost_per_step_s,
    ))


def _build_torch(opts: EngineOptions) -> Engine:
    # Before torch is imported (torch_engine imports it): see pdgrpc.engine.mkl_dispatch.
    from pdgrpc.engine import mkl_dispatch

    if (opts.mkl_dispatch or "features") == "features":
        mkl_note = mkl_dispatch.enable()
    elif mkl_dispatch.enabled():
        mkl_note = "by CPU features (enabled earlier in this process; 'vendor' cannot undo it)"
    else:
        mkl_note = "MKL's own (mkl_dispatch 'vendor')"
    from pdgrpc.engine.torch_engine import build_torch_engine

    return build_torch_engine(opts, mkl_note=mkl_note)


def _build_vllm(opts: EngineOptions) -> Engine:
    # Asynchronous: nodes build it with their own services (pdgrpc.nodes.vllm_services).
    raise ValueError("the vllm engine runs behind its own node services; start a node with --engine vllm")


BUILDERS: dict[str, Callable[[EngineOptions], Engine]] = {"mock": _build_mock, "torch": _build_torch,
                                                           "vllm": _build_vllm}
ENGINES = tuple(BUILDERS)


def check_options(opts: EngineOptions, where: str, error: type[Exception]) -> None:
    """Engine-specific options hold valid values and belong to the engine named (raises ``error``)."""
    from pdgrpc.engine.mock_profile import check_mock_options
    from pdgrpc.engine.torch_options import check_torch_options

    check_torch_options(opts, where, error)
    check_mock_options(opts, where, error)


def build_engine(opts: EngineOptions) -> Engine:
    builder = BUILDERS.get(opts.name)
    if builder is None:
        raise ValueError(f"unknown engine {opts.name!r}; choose one of {ENGINES}")
    return builder(opts)
