"""The torch engine's own options: which linear kernel, which MKL dispatch (no torch import here,
so a config file or a command line is checked without loading torch).

``linear_kernel``: "" (the default) lets the engine choose per weight shape at load, by measurement,
among the kernels whose results are batch-invariant on this machine (see ``torch_kernel_plan``);
"onednn" or "torch" forces one for every shape (still checked, and padded where that makes it
invariant). ``mkl_dispatch``: see ``mkl_dispatch``.
"""

from __future__ import annotations

from pdgrpc.engine.base import EngineOptions

# Kernels by name, the order in which ties are broken: torch_linear.KERNELS holds the implementations.
LINEAR_KERNELS = ("onednn", "torch")
MKL_DISPATCHES = ("features", "vendor")
TORCH_ONLY_OPTIONS = ("prefill_chunk_tokens", "linear_kernel", "mkl_dispatch")


def check_torch_options(opts: EngineOptions, where: str, error: type[Exception]) -> None:
    """The torch-only options hold valid values and are set only for the torch engine (vLLM chunks
    prefill in its own scheduler and has its own kernels). One check for the config file and a
    node's command line, raising ``error``."""
    if opts.prefill_chunk_tokens < 0:
        raise error(f"{where}prefill_chunk_tokens must be >= 0 (0: no chunks)")
    if opts.linear_kernel and opts.linear_kernel not in LINEAR_KERNELS:
        raise error(f"{where}linear_kernel must be one of {LINEAR_KERNELS} (or empty: chosen at load), "
                    f"not {opts.linear_kernel!r}")
    if opts.mkl_dispatch and opts.mkl_dispatch not in MKL_DISPATCHES:
        raise error(f"{where}mkl_dispatch must be one of {MKL_DISPATCHES}, not {opts.mkl_dispatch!r}")
    if opts.max_batch <= 0:
        raise error(f"{where}max_batch must be > 0")
    for key in TORCH_ONLY_OPTIONS:
        if getattr(opts, key) and opts.name != "torch":
            raise error(f"{where}{key} is a torch engine option, not {opts.name}'s")
