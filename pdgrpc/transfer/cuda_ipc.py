"""Same-host GPU hand-off of KV groups through CUDA IPC (location ``device:N``).

The bytes never leave GPU memory: the prefill process keeps each published group as a GPU tensor,
and the store holds only a small JSON entry at ``device:N`` whose value is the group's CUDA IPC
handle (gswarm's ``read_pointer`` idea). Protocol, in call order:

  prefill  ``DeviceExports.publish``: export the tensor's IPC handle -> store ``/write`` of
           ``{"cuda_ipc": handle, "size": n}`` at ``device:N`` with the request as owner and a lease
  decode   ``fetch_device_group``: store ``/read/{key}`` -> open the handle -> copy GPU -> GPU into
           its own cache -> release the key (as for every other location)
  prefill  ``DeviceExports.reap`` (a background task): once the store no longer has a key
           (released, expired, owner released) the tensor reference is dropped and its memory freed

The handle is encoded as JSON (base64 for the opaque CUDA handles); nothing is unpickled. Only a
decode process on the same host can open the handle; it checks that at descriptor time (its own
device must be CUDA). Tested by tools/gpu_check.sh on a GPU machine, not in CPU CI.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

from pdgrpc.errors import FailedPrecondition, InvalidArgument, NotFound, PdgrpcError
from pdgrpc.transfer.base import KVTransfer, register
from pdgrpc.types import KVDescriptor

log = logging.getLogger(__name__)
REAP_INTERVAL_S = 0.5


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(value: Any, what: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"cuda_ipc.{what} must be base64 text")
    return base64.b64decode(value, validate=True)


def export_handle(tensor) -> dict:
    """The JSON-safe description of a CUDA tensor that another process can open."""
    import torch
    from torch.multiprocessing.reductions import reduce_tensor

    if not tensor.is_cuda:
        raise InvalidArgument("only CUDA tensors have IPC handles")
    _, args = reduce_tensor(tensor.detach())
    (_tensor_cls, size, stride, offset, storage_cls, dtype, device, handle, storage_bytes, storage_offset,
     _requires_grad, ref_handle, ref_offset, event_handle, event_sync) = args
    return {
        "size": list(size), "stride": list(stride), "offset": int(offset),
        "storage": "untyped" if storage_cls is torch.UntypedStorage else "typed",
        "dtype": str(dtype).removeprefix("torch."), "device": int(device), "handle": _b64(handle),
        "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
        "ref_handle": _b64(ref_handle), "ref_offset": int(ref_offset), "event_handle": _b64(event_handle),
        "event_sync": bool(event_sync),
    }


def open_handle(h: dict):
    """The tensor an exported handle names, mapped into this process (no copy)."""
    import torch
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        dtype = getattr(torch, str(h["dtype"]))
        if not isinstance(dtype, torch.dtype):
            raise InvalidArgument(f"cuda_ipc.dtype {h['dtype']!r} is not a torch dtype")
        storage_cls = torch.UntypedStorage if h["storage"] == "untyped" else torch.storage.TypedStorage
        args = (torch.Tensor, torch.Size([int(x) for x in h["size"]]), tuple(int(x) for x in h["stride"]),
                int(h["offset"]), storage_cls, dtype, int(h["device"]), _unb64(h["handle"], "handle"),
                int(h["storage_bytes"]), int(h["storage_offset"]), False, _unb64(h["ref_handle"], "ref_handle"),
                int(h["ref_offset"]), _unb64(h["event_handle"], "event_handle"), bool(h["event_sync"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"malformed cuda_ipc handle: {exc}") from None
    try:
        return rebuild_cuda_tensor(*args)
    except RuntimeError as exc:  # another host, a dead producer, no CUDA here
        raise FailedPrecondition(f"cannot open the CUDA IPC handle: {exc}") from None


class DeviceExports:
    """The prefill side: GPU tensors published by handle, kept alive until the store lets go."""

    def __init__(self, store) -> None:
        self.store = store
        self._tensors: dict[str, Any] = {}
        self._task: asyncio.Task | None = None

    def __len__(self) -> int:
        return len(self._tensors)

    async def publish(self, key: str, tensor, *, owner: str, lease_s: float) -> tuple[int, int]:
        """Register the tensor; return (device index, size in bytes)."""
        tensor = tensor.contiguous()
        handle = export_handle(tensor)
        size = tensor.numel() * tensor.element_size()
        self._tensors[key] = tensor
        try:
            await self.store.write_json(key, {"cuda_ipc": handle, "size": size}, location=f"device:{handle['device']}",
                                        owner=owner, lease_s=lease_s)
        except BaseException:
            self._tensors.pop(key, None)
            raise
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.reap())
        return handle["device"], size

    async def reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            for key in list(self._tensors):
                try:
                    if not await self.store.exists(key):
                        self._tensors.pop(key, None)
                except PdgrpcError as exc:  # store unreachable: keep the tensor, try again
                    log.debug("reap of %s deferred: %s", key, exc)


async def fetch_device_group(store, key: str, size: int):
    """The decode side: the producer's GPU tensor for ``key`` (the caller copies it into its cache)."""
    value = await store.read_json(key)
    if not isinstance(value, dict) or "cuda_ipc" not in value:
        raise NotFound(f"KV key {key!r} has no CUDA IPC handle in the store")
    if value.get("size") != size:
        raise InvalidArgument(f"KV key {key!r}: handle is for {value.get('size')} bytes, descriptor says {size}")
    return await asyncio.to_thread(open_handle, value["cuda_ipc"])


@register("cuda_ipc")
class CudaIpcTransfer(KVTransfer):
    """Location ``device``: ``read`` returns the producer's GPU tensor (the engine copies it GPU to GPU
    on load). Only from this node's own store: a handle opens on its own host only."""

    def accepts(self, d: KVDescriptor) -> bool:
        return d.location == "device" and self.ctx.is_own(d.store_address)

    async def read(self, d: KVDescriptor):
        return await fetch_device_group(self.ctx.store, d.key, d.size_bytes)

    async def read_into(self, d: KVDescriptor, dst) -> None:
        raise FailedPrecondition(f"descriptor {d.key!r}: KV in GPU memory is loaded from its tensor, not copied "
                                 "into a host buffer")
