"""Engines by name, so nodes and the launcher pick one with `--engine NAME`."""

from __future__ import annotations

from dataclasses import dataclass

from pdgrpc.engine.base import Engine


@dataclass(frozen=True)
class EngineOptions:
    """What a node knows about the engine it should build (validated by the engine)."""

    name: str = "mock"
    model: str = ""          # model folder or name; engine-specific default when empty
    device: str = "cpu"
    dtype: str = ""          # engine default when empty
    threads: int = 0         # 0: one per CPU the process may run on
    mock_prefill_cost_per_token_s: float = 0.0
    mock_decode_cost_per_step_s: float = 0.0
    mock_layers_per_group: int = 6
    prefill_chunk_tokens: int = 0  # torch: prompts longer than this prefill in chunks of it (0: off)
    linear_kernel: str = ""        # torch on CPU: "onednn" (prepacked weights; the default) or "torch"
    mkl_dispatch: str = ""         # torch on x86: "features" (MKL's kernels by CPU features; the default) or "vendor"


ENGINES = ("mock", "torch", "vllm")
LINEAR_KERNELS = ("onednn", "torch")
MKL_DISPATCHES = ("features", "vendor")  # pdgrpc.engine.mkl_dispatch (kept here: that module is loaded lazily)


def check_torch_options(opts: EngineOptions, where: str, error: type[Exception]) -> None:
    """The torch-only options (``prefill_chunk_tokens``, ``linear_kernel``, ``mkl_dispatch``) hold valid values and are
    set only for the torch engine (vLLM chunks prefill in its own scheduler and has its own kernels).
    One check for the config file and a node's command line, raising ``error``."""
    if opts.prefill_chunk_tokens < 0:
        raise error(f"{where}prefill_chunk_tokens must be >= 0 (0: no chunks)")
    if opts.linear_kernel and opts.linear_kernel not in LINEAR_KERNELS:
        raise error(f"{where}linear_kernel must be one of {LINEAR_KERNELS}, not {opts.linear_kernel!r}")
    if opts.mkl_dispatch and opts.mkl_dispatch not in MKL_DISPATCHES:
        raise error(f"{where}mkl_dispatch must be one of {MKL_DISPATCHES}, not {opts.mkl_dispatch!r}")
    for key in ("prefill_chunk_tokens", "linear_kernel", "mkl_dispatch"):
        if getattr(opts, key) and opts.name != "torch":
            raise error(f"{where}{key} is a torch engine option, not {opts.name}'s")


def build_engine(opts: EngineOptions) -> Engine:
    if opts.name == "mock":
        from pdgrpc.engine.mock import MockEngine, MockEngineConfig

        return MockEngine(MockEngineConfig(
            dtype=opts.dtype or "float32",
            layers_per_group=opts.mock_layers_per_group,
            prefill_cost_per_token_s=opts.mock_prefill_cost_per_token_s,
            decode_cost_per_step_s=opts.mock_decode_cost_per_step_s,
        ))
    if opts.name == "torch":
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
    if opts.name == "vllm":  # asynchronous: nodes build it with their own services (pdgrpc.nodes.vllm_services)
        raise ValueError("the vllm engine runs behind its own node services; start a node with --engine vllm")
    raise ValueError(f"unknown engine {opts.name!r}; choose one of {ENGINES}")
