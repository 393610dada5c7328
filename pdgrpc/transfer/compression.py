"""Opt-in KV compression for host-to-host hand-offs: int8 per head vector, with a float32 scale.

Why: between hosts the link, not memory, bounds a hand-off (a 1,000-token SmolLM2 prompt is 46 MB
of fp32 KV: 0.37 s at 1 Gbit/s). Each (layer, K|V, head, token) vector of ``head_dim`` values is
stored as int8 with one scale (max |x| / 127, symmetric, round to nearest), as KV-cache quantization
schemes do per token: 64 fp32 values take 68 bytes instead of 256 (3.8x fewer; bf16: 1.9x).

It changes the numbers, so it is never on by default and never used where the bytes do not cross
a link (same host: the shm arena carries the exact bytes). Its effect on greedy output and
log-probabilities is measured by ``tools/bench_kv_compression.py``.

Wire format (little-endian), the KV group's raw layout being [layer][k|v][kv_head][token][dim]:
  ``PDQ8`` magic, u8 version (1), u8 dtype (0 float32, 1 bfloat16, 2 float16), u16 reserved,
  u32 layers, u32 heads, u32 tokens, u32 head_dim,
  float32 scales [layers * 2 * heads * tokens], then int8 values [layers * 2 * heads * tokens * head_dim].
Only numpy is needed (bf16 is widened and narrowed by its bits), so a node without torch decodes it.
"""

from __future__ import annotations

import struct

import numpy as np

from pdgrpc.errors import DataLoss, InvalidArgument

MAGIC = b"PDQ8"
VERSION = 1
_HEADER = struct.Struct("<4sBBHIIII")
_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ENCODINGS = ("raw", "int8")  # what a descriptor's bytes are: as the engine wrote them, or this format


def compressed_nbytes(layers: int, heads: int, tokens: int, head_dim: int) -> int:
    vectors = layers * 2 * heads * tokens
    return _HEADER.size + 4 * vectors + vectors * head_dim


def _as_float32(raw: memoryview | bytes, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(raw, dtype="<f4")
    if dtype == "float16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16  # bf16 is the top half of an fp32
    return bits.view(np.float32)


def _from_float32(x: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """Write ``x`` into ``out`` (a uint8 view of the destination) in ``dtype``."""
    if dtype == "float32":
        out.view("<f4")[:] = x
    elif dtype == "float16":
        out.view("<f2")[:] = x
    else:  # round to nearest even, as torch's float -> bfloat16
        bits = x.view(np.uint32)
        out.view("<u2")[:] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def compress(raw: memoryview | bytes, dtype: str, layers: int, heads: int, tokens: int, head_dim: int) -> bytes:
    """The group's raw KV bytes as the int8 wire format."""
    if dtype not in _DTYPES:
        raise InvalidArgument(f"KV compression takes {sorted(_DTYPES)}, not {dtype!r}")
    vectors = layers * 2 * heads * tokens
    if len(raw) != vectors * head_dim * _ITEMSIZE[dtype]:
        raise InvalidArgument(f"KV group of {len(raw)} bytes does not match [{layers}, 2, {heads}, {tokens}, "
                              f"{head_dim}] {dtype}")
    x = _as_float32(raw, dtype).reshape(vectors, head_dim)
    scale = np.abs(x).max(axis=1) / 127.0
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.rint(x * inv[:, None]).astype(np.int8)  # |x| / scale <= 127: no clipping needed
    header = _HEADER.pack(MAGIC, VERSION, _DTYPES[dtype], 0, layers, heads, tokens, head_dim)
    return b"".join((header, scale.astype("<f4").tobytes(), q.tobytes()))


def parse_header(blob: memoryview | bytes) -> tuple[str, int, int, int, int]:
    """(dtype, layers, heads, tokens, head_dim) of a compressed group; DataLoss when it is not one."""
    if len(blob) < _HEADER.size:
        raise DataLoss("compressed KV shorter than its header")
    magic, version, code, _, layers, heads, tokens, head_dim = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or code not in _DTYPE_NAMES:
        raise DataLoss(f"not a compressed KV group (magic {magic!r}, version {version}, dtype code {code})")
    if len(blob) != compressed_nbytes(layers, heads, tokens, head_dim):
        raise DataLoss(f"compressed KV of {len(blob)} bytes, its header says "
                       f"{compressed_nbytes(layers, heads, tokens, head_dim)}")
    return _DTYPE_NAMES[code], layers, heads, tokens, head_dim


def raw_nbytes(blob: memoryview | bytes) -> int:
    dtype, layers, heads, tokens, head_dim = parse_header(blob)
    return layers * 2 * heads * tokens * head_dim * _ITEMSIZE[dtype]


def decompress_into(blob: memoryview | bytes, out: memoryview) -> None:
    """Expand a compressed group into ``out`` (its raw layout and dtype, exactly ``raw_nbytes`` long)."""
    dtype, layers, heads, tokens, head_dim = parse_header(blob)
    vectors = layers * 2 * heads * tokens
    dst = np.frombuffer(out, dtype=np.uint8)
    if dst.size != vectors * head_dim * _ITEMSIZE[dtype]:
        raise InvalidArgument(f"destination of {dst.size} bytes for {vectors * head_dim} {dtype} values")
    scale = np.frombuffer(blob, dtype="<f4", count=vectors, offset=_HEADER.size)
    q = np.frombuffer(blob, dtype=np.int8, offset=_HEADER.size + 4 * vectors).reshape(vectors, head_dim)
    x = q.astype(np.float32)
    x *= scale[:, None]
    _from_float32(x.reshape(-1), dtype, dst)


def decompress(blob: memoryview | bytes) -> bytearray:
    out = bytearray(raw_nbytes(blob))
    decompress_into(blob, memoryview(out))
    return out
