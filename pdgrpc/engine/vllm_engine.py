"""The vLLM engine of a pdgrpc node: vLLM's AsyncLLM with the GswarmConnector, and what nodes need of it.

A node with ``--engine vllm`` runs one AsyncLLM (vLLM's asyncio-native front end) in its own process;
vLLM starts its engine-core and worker processes (spawn) beside it. Roles:

* prefill:   ``kv_role="kv_producer"``: requests that opt in save their prompt KV to the store
* decode:    ``kv_role="kv_consumer"``, ``kv_load_failure_policy="recompute"``: requests that carry
             descriptors load the prompt KV from the store; a failed load is recomputed
* colocated: no connector (the baseline)

Settings (see README "vLLM"): fp32 by default, ``enforce_eager``, block size 32 (the CPU attention
kernels need a multiple of 32), ``max_model_len`` 2048, prefix caching off (so greedy output does not
depend on what ran before), KV cache ``VLLM_CPU_KVCACHE_SPACE`` GiB (default 1). vLLM's OpenMP
threads are bound to the CPUs the node may run on (``VLLM_CPU_OMP_THREADS_BIND``), or to the first
``--threads`` of them: two engines sharing cores must be pinned apart (vLLM's worker spins for a
second after each step).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from pdgrpc.engine.base import EngineOptions
from pdgrpc.errors import InvalidArgument
from pdgrpc.types import ModelSpec, Prompt, Role, SamplingParams

# vLLM logs to stdout by default; a node's stdout carries its one "listening" line (the launcher
# and the demo relay it), so vLLM and its engine processes (which inherit this) log to stderr.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

BLOCK_SIZE = 32
WIRE_LAYOUT = "layer,kv,head,token,dim"  # KVLayout.block_layout of the connector's store entries
PARAMS_KEY = "pdgrpc"                    # our key in vLLM's kv_transfer_params
MAX_MODEL_LEN = 2048
CONNECTOR = "GswarmConnector"
CONNECTOR_MODULE = "pdgrpc.engine.vllm_connector"


def cpu_list(cpus: list[int]) -> str:
    """0,1,2,5 -> "0-2,5" (the syntax of VLLM_CPU_OMP_THREADS_BIND)."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def model_fingerprint(folder: str, dtype: str) -> str:
    """sha256 of config.json, the dtype and every weight file: the same on every node serving the
    same model, and never equal to a torch-engine fingerprint (the KV differs in the last bits)."""
    h = hashlib.sha256()
    with open(os.path.join(folder, "config.json"), "rb") as f:
        h.update(f.read())
    h.update(dtype.encode())
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin")):
            with open(os.path.join(folder, name), "rb") as f:
                while chunk := f.read(8 << 20):
                    h.update(chunk)
    return "vllm-" + h.hexdigest()[:32]


@dataclass
class VllmEngine:
    """The AsyncLLM plus the model facts the node's services check requests against."""

    llm: object          # vllm.v1.engine.async_llm.AsyncLLM
    spec: ModelSpec
    tokenizer: object    # pdgrpc Tokenizer (HF tokenizer of the model folder)
    role: Role
    folder: str

    def tokenize(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.chat is not None:
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in prompt.chat])
        return self.tokenizer.encode(prompt.text)

    def sampling_params(self, s: SamplingParams, max_tokens: int, transfer: dict | None = None):
        """vLLM's SamplingParams for pdgrpc's: stop strings and text are pdgrpc's (OutputTracker), so
        vLLM gets stop token ids only, EOS among them unless ignore_eos."""
        from vllm import SamplingParams as VSP
        from vllm.sampling_params import RequestOutputKind

        stop_ids = list(s.stop_token_ids) + ([] if s.ignore_eos else list(self.spec.eos_token_ids))
        return VSP(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                   seed=s.seed, stop_token_ids=stop_ids, ignore_eos=True, logprobs=0 if s.logprobs else None,
                   detokenize=False, output_kind=RequestOutputKind.DELTA,
                   extra_args={"kv_transfer_params": transfer} if transfer else None)

    def shutdown(self) -> None:
        self.llm.shutdown()
        self.llm.shutdown = lambda *a, **k: None  # AsyncLLM.__del__ would run it again at interpreter exit


def _eos_ids(folder: str, tok) -> tuple[int, ...]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(folder, name)) as f:
                v = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids += v if isinstance(v, list) else [v] if isinstance(v, int) else []
    if getattr(tok, "eos_token_id", None) is not None:
        ids.append(int(tok.eos_token_id))
    return tuple(dict.fromkeys(ids))


def build_vllm_engine(opts: EngineOptions, role: Role, store: str, use_shm: bool, node: str = "",
                      stat_loggers: list | None = None) -> VllmEngine:
    """Start vLLM for a node (blocking, ~30-40 s on CPU). Call it in a thread with the node already pinned."""
    from transformers import AutoConfig, AutoTokenizer

    from pdgrpc.engine.torch_engine import HFTokenizer
    from pdgrpc.model_prep import resolve_model

    dtype = opts.dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidArgument(f"dtype must be float32, bfloat16 or float16, not {dtype!r}")
    folder = resolve_model(opts.model, dtype)
    allowed = sorted(os.sched_getaffinity(0))
    threads = opts.threads if 0 < opts.threads <= len(allowed) else len(allowed)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list(allowed[:threads]))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    from vllm.config import KVTransferConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    config = AutoConfig.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    max_len = min(MAX_MODEL_LEN, int(getattr(config, "max_position_embeddings", MAX_MODEL_LEN)))
    transfer = None
    if role is not Role.COLOCATED:
        transfer = KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=CONNECTOR_MODULE,
            kv_role="kv_producer" if role is Role.PREFILL else "kv_consumer",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"store": store, "use_shm": use_shm})
    args = AsyncEngineArgs(model=folder, dtype=dtype, enforce_eager=True, block_size=BLOCK_SIZE,
                           max_model_len=max_len, enable_prefix_caching=False, kv_transfer_config=transfer,
                           seed=0)
    llm = AsyncLLM.from_engine_args(args, stat_loggers=stat_loggers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    spec = ModelSpec(name=os.path.basename(folder.rstrip("/")), fingerprint=model_fingerprint(folder, dtype),
                     num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                     head_dim=head_dim, dtype=dtype, vocab_size=config.vocab_size, max_model_len=max_len,
                     engine="vllm", eos_token_ids=_eos_ids(folder, tok))
    return VllmEngine(llm, spec, HFTokenizer(tok), role, folder)
