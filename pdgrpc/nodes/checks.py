"""What a decode node checks before it fetches anything, shared by every engine's decode service.

A descriptor must belong to the stream's request, name this node's store (or a peer store it may
read: another host's), come from the same model (fingerprint, dtype, geometry) in a known block
layout, cover exactly the prompt's tokens within the model's layers, have the size its layout
implies, sit in a location this node can read, and name a pdgrpc shared-memory segment if any.
Errors carry the status a caller can act on: FAILED_PRECONDITION
for "wrong model, layout, store or location", INVALID_ARGUMENT for inconsistent descriptors.
"""

from __future__ import annotations

from collections.abc import Callable

from pdgrpc.errors import FailedPrecondition, InvalidArgument
from pdgrpc.kvstore.arena import ALIGN as ARENA_ALIGN
from pdgrpc.kvstore.arena import is_arena_name
from pdgrpc.kvstore.shm import SHM_NAME_RE
from pdgrpc.nodes.prefill_service import validate_prompt_ids
from pdgrpc.types import REQUEST_ID_RE, DecodeStart, KVDescriptor, ModelSpec

MAX_KV_GROUPS = 1024
WIRE_LAYOUT = "layer,kv,head,token,dim"


def check_decode_start(start: DecodeStart, spec: ModelSpec) -> None:
    if not REQUEST_ID_RE.match(start.request_id):
        raise InvalidArgument("request_id must be 1-64 of letters, digits, '-', '_', '.'")
    if start.model_fingerprint != spec.fingerprint:
        raise FailedPrecondition(
            f"KV was computed by model {start.model_fingerprint!r}; this node serves {spec.fingerprint!r}")
    start.sampling.validate(spec.max_model_len, spec.vocab_size)
    validate_prompt_ids(list(start.prompt_token_ids), spec, start.sampling.max_tokens)


def check_descriptor(d: KVDescriptor, start: DecodeStart, spec: ModelSpec, store_address: str, seen: set[int],
                     *, gpu: bool = False, store_allowed: Callable[[str], bool] | None = None) -> None:
    """Raise unless ``d`` can be fetched into this node; record its group index in ``seen``.
    ``gpu``: the node runs on CUDA and can open KV held in GPU memory (location ``device``).
    ``store_allowed``: which other stores (other hosts') this node may read from (none by default)."""
    lay = d.layout
    if d.request_id != start.request_id:
        raise InvalidArgument(f"descriptor of request {d.request_id!r} on the stream of {start.request_id!r}")
    if not d.key:
        raise InvalidArgument("descriptor has no key")
    if d.store_address != store_address and not (store_allowed is not None and store_allowed(d.store_address)):
        raise FailedPrecondition(f"descriptor names store {d.store_address!r}; this node uses {store_address}")
    if lay.model_fingerprint != spec.fingerprint:
        raise FailedPrecondition(
            f"descriptor {d.key!r} is from model {lay.model_fingerprint!r}; this node serves {spec.fingerprint!r}")
    if (lay.dtype, lay.num_kv_heads, lay.head_dim) != (spec.dtype, spec.num_kv_heads, spec.head_dim):
        raise FailedPrecondition(f"descriptor {d.key!r} layout {lay.dtype}/{lay.num_kv_heads}x{lay.head_dim} "
                                 f"does not match the model's {spec.dtype}/{spec.num_kv_heads}x{spec.head_dim}")
    if lay.block_layout != WIRE_LAYOUT:
        raise FailedPrecondition(f"descriptor {d.key!r}: block layout {lay.block_layout!r} is not supported")
    if not 0 <= lay.layer_start < lay.layer_end <= spec.num_layers:
        raise InvalidArgument(f"descriptor {d.key!r}: layers [{lay.layer_start}, {lay.layer_end}) "
                              f"outside [0, {spec.num_layers})")
    if (lay.token_start, lay.token_end) != (0, len(start.prompt_token_ids)):
        raise InvalidArgument(f"descriptor {d.key!r}: tokens [{lay.token_start}, {lay.token_end}) "
                              f"do not cover the prompt's {len(start.prompt_token_ids)}")
    expected = spec.kv_bytes(lay.layer_end - lay.layer_start, lay.token_end - lay.token_start)
    if d.size_bytes != expected:
        raise InvalidArgument(f"descriptor {d.key!r}: size {d.size_bytes} bytes, layout needs {expected}")
    if d.location == "device" and not gpu:
        raise FailedPrecondition(f"descriptor {d.key!r}: KV in GPU memory needs a CUDA decode node on the same "
                                 "host; this node runs on the CPU")
    if d.location not in ("dram", "device"):
        raise FailedPrecondition(f"descriptor {d.key!r}: location {d.location} is not readable by this node")
    if d.shm_name and not SHM_NAME_RE.match(d.shm_name):
        raise InvalidArgument(f"descriptor {d.key!r}: shared-memory name {d.shm_name!r} is not a pdgrpc segment")
    if d.shm_offset and not (is_arena_name(d.shm_name) and d.shm_offset % ARENA_ALIGN == 0):
        raise InvalidArgument(f"descriptor {d.key!r}: shm offset {d.shm_offset} needs a shm arena and a "
                              f"multiple of {ARENA_ALIGN}")
    if d.group_index in seen or not 0 <= d.group_index < MAX_KV_GROUPS:
        raise InvalidArgument(f"descriptor {d.key!r}: group_index {d.group_index} repeated or out of range")
    seen.add(d.group_index)
