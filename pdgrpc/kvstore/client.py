"""Async client of the pdgrpc KV store, used by every node to publish and fetch KV bytes.

Data paths (the store's protocol is listed in ``pdgrpc.kvstore.server``):
  * same host (``use_shm``): ``put`` copies the bytes into a region of this client's shm arena
    (``pdgrpc.kvstore.arena``: pre-faulted pages, one copy, CRC while copying) and records it
    (POST /v1/kv/{key}/shm with the offset, sent before the copy so the store records it meanwhile;
    JSON calls go on the client's own keep-alive connections, ``json_channel``);
    ``get(shm_name=, shm_offset=)`` returns a zero-copy view of the region, no HTTP at all. Copies
    and checks of up to ``inline_max_bytes`` run on the caller's thread (the loop), the split
    helper thread sharing a big one; bigger ones in a worker thread. A payload the arena
    cannot hold goes to a /dev/shm segment of its own, which the store adopts;
  * otherwise: raw bytes over HTTP (PUT / GET /v1/kv/{key}), crc32 in X-Checksum-Crc32.
The crc32 is computed once, by the writer; readers verify it (DataLoss on mismatch).

Errors are pdgrpc.errors: 507 -> ResourceExhausted, 404 -> NotFound, 400/409/413 -> InvalidArgument,
401 -> FailedPrecondition, no answer at all -> Unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import mmap
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import numpy as np
import yarl

from pdgrpc.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PdgrpcError,
    ResourceExhausted,
    Unavailable,
    error_for,
)
from pdgrpc.kvstore import arena as arenas
from pdgrpc.kvstore import shm
from pdgrpc.kvstore.json_channel import JsonChannel

log = logging.getLogger(__name__)

DEFAULT_ARENA_BYTES = 256 << 20  # per writing client; 0 turns arenas off (one segment per put)
_ARENA_RETRY_S = 30.0  # after the store refused an arena, use plain segments this long
ARENA_MIN_BYTES = 4 << 10  # same host, from this size KV goes through the arena (a page per entry at least)
# Arena copies and CRC checks up to this size run on the caller's thread (the loop), with the split
# helper thread sharing the work from shm.SPLIT_MIN_BYTES: a hop to a worker thread and back costs ~0.3 ms
# on a 2-vCPU VM (two thread wake-ups), a third of what 16 MB takes, while the loop is held for at
# most ~2.5 ms (64 MB at ~25 GB/s over two threads). Above it the hop is cheap next to the work and
# the loop stays free. KVStoreClient(inline_max_bytes=) changes it (0: always a worker thread).
INLINE_MAX_BYTES = 64 << 20
SHM_MIN_BYTES = 256 << 10  # below this a segment costs more (create + adopt) than the HTTP body
_BIG = 8 << 20  # above this, checksums and segment I/O run in a thread so the caller's loop stays live
_SEND_CHUNK = 1 << 20  # request bodies above this are sent in pieces of this size


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    crc32: int
    location: str
    lease_expiry_unix: float
    shm_name: str  # "" unless the bytes went through a shared-memory segment or arena
    shm_offset: int = 0  # where in the arena (0 for a segment of its own)
    transfer_endpoint: str = ""  # the store's transfer engine, when it registered the arena with one
    transfer_address: int = 0  # the region's address in the store's registered memory


class _WriterArena:
    """This client's arena: its writable mapping and the regions it handed out."""

    def __init__(self, name: str, size: int, mapping: mmap.mmap, transfer: dict | None = None) -> None:
        self.name, self.size, self.mapping = name, size, mapping
        # The store registered the arena with its transfer engine (pdgrpc.transfer.mooncake): where.
        self.transfer_endpoint = str((transfer or {}).get("endpoint", ""))
        self.transfer_base = int((transfer or {}).get("address", 0))
        self.regions = arenas.RegionAllocator(size)
        self.view = memoryview(mapping)
        self.addr = _address(self.view)  # to recognise a buffer that is one of our reservations

    def reserved_offset(self, view: memoryview) -> int | None:
        """The offset of ``view`` if it is exactly a region we reserved and have not committed."""
        offset = _address(view) - self.addr
        if 0 <= offset < self.size and self.regions.pending_size(offset) == arenas.align_up(max(view.nbytes, 1)):
            return offset
        return None


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if view.nbytes else 0


async def _chunks(view: memoryview):
    """A big body in _SEND_CHUNK pieces: each write waits for the socket to drain. Handed to the
    transport whole, it is copied into asyncio's buffer and memmoved down after every partial send."""
    for start in range(0, view.nbytes, _SEND_CHUNK):
        yield view[start:start + _SEND_CHUNK]


async def _maybe_thread(fn, *args, size: int):
    # run_in_executor rather than to_thread: one event-loop iteration less on the way back (no
    # wrapping coroutine); nothing here needs the caller's context variables.
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args) if size > _BIG else fn(*args)


def _is_local_host(host: str) -> bool:
    """Whether ``host`` names this machine (loopback, our hostname, or one of our addresses).
    Blocking name lookups: call it in a thread."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if host == "localhost":
            return True
    else:
        if ip.is_loopback:
            return True
        # An address of one of this host's interfaces (in this network namespace): we can bind it.
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                                         socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
            return True
    names = {socket.gethostname(), socket.getfqdn()}
    if host in names:
        return True
    try:
        mine = {a for n in names for a in socket.gethostbyname_ex(n)[2]}
        theirs = set(socket.gethostbyname_ex(host)[2])
    except OSError:
        return False
    return bool(mine & theirs)


class KVStoreClient:
    def __init__(self, address: str, *, token: str | None = None, use_shm: bool | None = None,
                 timeout_s: float = 30.0, idle_timeout_s: float | None = None, shm_min_bytes: int = SHM_MIN_BYTES,
                 shm_arena_bytes: int = DEFAULT_ARENA_BYTES, inline_max_bytes: int = INLINE_MAX_BYTES) -> None:
        address = address.strip().removeprefix("http://").rstrip("/")
        if not address or address.startswith(":") or ":" not in address:
            raise InvalidArgument(f"kv store address {address!r} must be host:port")
        self.address = address
        self._base = f"http://{address}"
        self._host = address.rsplit(":", 1)[0].strip("[]")
        self._port = address.rsplit(":", 1)[1]
        if token and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in token):
            raise InvalidArgument("kv store token must not contain control characters")
        self._token = token
        self.token = token  # peer stores' clients are made with it (pdgrpc.transfer)
        self._use_shm = use_shm
        self.shm_min_bytes = shm_min_bytes
        self.shm_arena_bytes = shm_arena_bytes
        self.inline_max_bytes = inline_max_bytes
        self._arena: _WriterArena | None = None
        self._arena_task: asyncio.Future | None = None  # the arena being created, awaited by every put
        self._arena_retry_at = 0.0
        self._reader = arenas.ArenaReader()
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        # idle_timeout_s: a connect, or a read of a body, that makes no progress this long fails
        # (Unavailable) before the total: a store on another host that went away costs seconds.
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=idle_timeout_s, sock_read=idle_timeout_s)
        self._json_timeout_s = min(timeout_s, idle_timeout_s or timeout_s)  # small JSON answers
        self._session: aiohttp.ClientSession | None = None  # KV bytes over HTTP
        self._channel: JsonChannel | None = None  # everything else
        self._releasing: set[asyncio.Task] = set()  # release_soon's (asyncio keeps only weak references)

    async def __aenter__(self) -> KVStoreClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- public API --------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, owner: str, lease_s: float,
                  location: str = "dram") -> PutResult:
        try:
            view = memoryview(data).cast("B")
        except TypeError as exc:
            raise InvalidArgument(f"put {key!r}: data must be a contiguous bytes-like buffer ({exc})") from None
        size = view.nbytes
        arena = self._arena
        offset = arena.reserved_offset(view) if arena is not None and size >= ARENA_MIN_BYTES else None
        if offset is not None:  # packed straight into our arena (see reserve): no copy left to make
            return await self._commit_reserved(arena, offset, key, view, owner, lease_s, location)
        # Same host: an arena region costs one store call, like an HTTP PUT, and saves the reader's
        # GET; a segment of its own (when the arena has no room) costs more than HTTP below shm_min_bytes.
        if size >= min(self.shm_min_bytes, ARENA_MIN_BYTES) and await self.shm_enabled():
            put = await self._put_arena(key, view, owner=owner, lease_s=lease_s, location=location)
            if put is not None:
                return put
            if size >= self.shm_min_bytes:
                crc = await _maybe_thread(shm.checksum, view, size=size)
                return await self._put_shm(key, view, crc, owner=owner, lease_s=lease_s, location=location)
        crc = await _maybe_thread(shm.checksum, view, size=size)
        params = {"owner": owner, "lease_s": repr(float(lease_s)), "location": location}
        headers = {"X-Checksum-Crc32": str(crc), "Content-Type": "application/octet-stream"}
        if size > _SEND_CHUNK:  # in pieces, with the length up front (see _chunks)
            headers["Content-Length"] = str(size)
            body = await self._request("PUT", self._kv_url(key), params=params, data=_chunks(view), headers=headers)
        else:
            body = await self._request("PUT", self._kv_url(key), params=params, data=view, headers=headers)
        return self._put_result(body, shm_name="")

    async def _put_arena(self, key: str, view: memoryview, *, owner: str, lease_s: float,
                         location: str) -> PutResult | None:
        """Copy into a free region of our arena and record it; None when there is no arena or no
        room (the caller then uses a segment of its own)."""
        arena = await self._writer_arena()
        if arena is None or view.nbytes > arena.size:
            return None
        offset = arena.regions.alloc(view.nbytes)
        if offset is None:  # regions freed by other processes' releases: ask the store which
            await self._resync_arena(arena)
            offset = arena.regions.alloc(view.nbytes)
            if offset is None:
                return None
        region = arena.view[offset:offset + view.nbytes]
        return await self._commit_while(arena, offset, key, view.nbytes,
                                        lambda: arenas.start_copy_with_crc(region, view), owner, lease_s, location)

    async def open_arena(self) -> bool:
        """Get this client's shm arena now (a writer calls it at start), so the first put does not
        pay for allocating and mapping it; False when there is none (not on the store's host, store
        unreachable or full: puts then take the other paths and try again later)."""
        return await self.shm_enabled() and await self._writer_arena() is not None

    def reserve(self, nbytes: int) -> memoryview | None:
        """A writable region of our shm arena to build ``nbytes`` of KV in, for a later ``put`` of
        exactly this view (which then copies nothing); None when there is no arena yet, no room, or
        the size is not worth it. Callable from any thread. A reservation never put is reclaimed
        after a minute (``RegionAllocator.STALE_PENDING_S``)."""
        arena = self._arena
        if arena is None or not ARENA_MIN_BYTES <= nbytes <= arena.size:
            return None
        offset = arena.regions.alloc(nbytes)
        return None if offset is None else arena.view[offset:offset + nbytes]

    async def _commit_reserved(self, arena: _WriterArena, offset: int, key: str, view: memoryview, owner: str,
                               lease_s: float, location: str) -> PutResult:
        put = await self._commit_while(arena, offset, key, view.nbytes, lambda: shm.checksum_split(view), owner,
                                       lease_s, location)
        if put is None:  # the store lost the arena; the bytes are still in our mapping: send them another way
            return await self.put(key, bytes(view), owner=owner, lease_s=lease_s, location=location)
        return put

    async def _commit_while(self, arena: _WriterArena, offset: int, key: str, size: int,
                            start_work: Callable[[], shm.SplitCrc], owner: str, lease_s: float,
                            location: str) -> PutResult | None:
        """Record the region at ``offset`` under ``key`` while ``start_work()`` fills it (a copy) or
        checks it (the CRC of a reserved region filled in place): the commit is sent first, the store
        records it during the work, then its answer is read. Nobody can ask for the key before this
        put returns, and by then both are done. Sent after a 16 MB copy instead, the commit's answer
        took 0.45-0.55 ms more here (the store's process wakes from epoll with cold caches). The
        request is one write on a pooled connection (json_channel), ~0.09 ms before the work starts;
        through aiohttp it was ~0.36 ms. None when the store lost the arena (restarted, or reaped it
        while we were idle)."""
        # Written out before _send returns (a pooled connection; the first put connects meanwhile).
        commit = self._send("POST", self._kv_path(key, "/shm"), {
            "shm_name": arena.name, "offset": offset, "size": size, "owner": owner, "lease_s": lease_s,
            "location": location})  # no crc32 yet: the store computes it if a reader over HTTP asks
        try:
            crc = await self._arena_work(start_work(), size)
            answer = await self._answer(commit)
        except NotFound:  # the store has no such arena: it holds nothing of ours to release
            arena.regions.abandon(offset)
            self._drop_arena(arena)
            return None
        except (InvalidArgument, ResourceExhausted, FailedPrecondition):  # refused: the store recorded nothing
            arena.regions.abandon(offset)
            raise
        except BaseException:  # cancelled, or no answer: the commit may have been recorded
            if not commit.cancel() and not commit.cancelled():
                commit.exception()  # it already ended: its outcome is seen (no "never retrieved" warning)
            self._forget_arena_put(arena, offset, key)
            raise
        arena.regions.committed(offset, answer)
        return PutResult(key=answer["key"], size=int(answer["size"]), crc32=crc, location=answer["location"],
                         lease_expiry_unix=float(answer["lease_expiry_unix"]), shm_name=arena.name, shm_offset=offset,
                         transfer_endpoint=arena.transfer_endpoint,
                         transfer_address=arena.transfer_base + offset if arena.transfer_endpoint else 0)

    async def _arena_work(self, work: shm.SplitCrc, size: int) -> int:
        """``work.run()`` (a copy or check of arena bytes): on this thread up to inline_max_bytes (the
        loop is held meanwhile), else in a worker thread."""
        if size <= self.inline_max_bytes:
            return work.run()
        running = asyncio.get_running_loop().run_in_executor(None, work.run)
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):  # the thread runs on: its buffers are in use until it ends
                await running
            raise

    def _forget_arena_put(self, arena: _WriterArena, offset: int, key: str) -> None:
        """A put that failed or was cancelled after its commit may have gone out: keep the region
        counted as used (a resync frees it once the store does not hold it) and release the key in
        the background in case the store recorded it."""
        arena.regions.commit(offset)
        self.release_soon(key)

    async def _writer_arena(self) -> _WriterArena | None:
        if self._arena is not None or self.shm_arena_bytes <= 0 or time.monotonic() < self._arena_retry_at:
            return self._arena
        if self._arena_task is None:
            self._arena_task = asyncio.ensure_future(self._create_arena())
        # Shielded: a put cancelled now must not abandon an arena the store is creating for us.
        await asyncio.shield(self._arena_task)
        return self._arena

    async def _create_arena(self) -> None:
        try:
            body = await self._call("POST", "/v1/shm/arenas", {"size": self.shm_arena_bytes})
            name, size = body["arena"], int(body["size"])
            mapping = await asyncio.to_thread(arenas.map_arena, name, writable=True)
            self._arena = _WriterArena(name, size, mapping, body.get("transfer"))
        except (PdgrpcError, KeyError, TypeError, ValueError) as exc:
            log.warning("kv store %s: no shm arena (%s); one segment per put for %gs",
                        self.address, exc, _ARENA_RETRY_S)
            self._arena_retry_at = time.monotonic() + _ARENA_RETRY_S
        finally:
            self._arena_task = None

    async def _resync_arena(self, arena: _WriterArena) -> None:
        try:
            body = await self._call("GET", f"/v1/shm/arenas/{arena.name}")
        except NotFound:
            self._drop_arena(arena)
            return
        arena.regions.resync_from(body)

    def _drop_arena(self, arena: _WriterArena) -> None:
        if self._arena is arena:
            self._arena = None
        arena.view.release()
        with contextlib.suppress(BufferError):  # a copy still running holds a view: unmapped when it ends
            arena.mapping.close()

    async def _put_shm(self, key: str, view: memoryview, crc: int, *, owner: str, lease_s: float,
                       location: str) -> PutResult:
        name = shm.new_segment_name(self._port)
        create = asyncio.ensure_future(_maybe_thread(shm.create_segment, name, view, size=view.nbytes))
        try:
            await asyncio.shield(create)
        except asyncio.CancelledError:
            # A big segment is written in a thread that a cancel does not stop: let it finish,
            # then remove the segment, or it would stay in /dev/shm with no owner.
            with contextlib.suppress(BaseException):
                await create
            shm.unlink_segment(name)
            raise
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise ResourceExhausted(f"put {key!r}: /dev/shm is full ({view.nbytes} bytes): {exc}") from None
            raise FailedPrecondition(f"put {key!r}: cannot create shm segment {name}: {exc}") from None
        adopted = False
        try:
            body = await self._call("POST", self._kv_path(key, "/shm"), {
                "shm_name": name, "size": view.nbytes, "crc32": crc, "owner": owner,
                "lease_s": lease_s, "location": location})
            adopted = True
            return self._put_result(body, shm_name=name)
        finally:
            # Refused (or no answer): the segment is still ours, so remove it rather than leak RAM.
            # On a timeout the store may have adopted it after all; its reads then report the
            # segment gone, which is better than a leak nobody owns.
            if not adopted:
                shm.unlink_segment(name)

    async def get(self, key: str, *, shm_name: str = "", size: int | None = None,
                  crc32: int | None = None, shm_offset: int = 0) -> bytes | bytearray | memoryview:
        """The entry's bytes, checked against ``size`` and the CRC-32: a zero-copy read-only view of
        an arena region (valid until the key is released: copy out first), bytes from a segment of
        its own, a bytearray over HTTP."""
        if shm_name and arenas.is_arena_name(shm_name):
            view = self._arena_view(key, shm_name, shm_offset, size, crc32)
            # Two threads for a big region (shm.checksum_split): the verify is the whole cost of this read.
            self._check_crc(key, await self._arena_work(shm.checksum_split(view), view.nbytes), crc32)
            return view
        if shm_name:
            try:
                actual = shm.segment_size(shm_name)
            except NotFound:
                raise NotFound(f"key {key!r}: shm segment {shm_name} is gone (released or expired)") from None
            if size is not None and actual != size:
                raise DataLoss(f"key {key!r}: shm segment {shm_name} holds {actual} bytes, expected {size}")
            buf = await _maybe_thread(shm.read_segment, shm_name, actual, size=actual)
            header_crc = None
        else:
            buf, header_crc = await self._get_bytes(key)
        if size is not None and len(buf) != size:
            raise DataLoss(f"key {key!r}: got {len(buf)} bytes, expected {size}")
        expected = crc32 if crc32 is not None else header_crc
        if expected is not None:
            actual_crc = await _maybe_thread(shm.checksum, buf, size=len(buf))
            if actual_crc != expected:
                raise DataLoss(f"key {key!r}: crc32 {actual_crc} does not match the expected {expected}")
            if header_crc is not None and header_crc != expected:
                raise DataLoss(f"key {key!r}: store holds crc32 {header_crc}, the descriptor says {expected}")
        return buf

    async def get_into(self, key: str, dst, *, shm_name: str = "", size: int | None = None,
                       crc32: int | None = None, shm_offset: int = 0) -> int:
        """Copy the entry's bytes into ``dst`` (a writable buffer of exactly its size) and return how
        many. For a reader that keeps its own copy anyway (decode's KV cache): from an arena region
        the copy and the CRC check are one pass over the bytes (``arenas.copy_with_crc``) instead of
        a verify pass and then a copy, and it is the copy that is verified, not the region before
        it was copied. Other paths: ``get`` (which verifies), then one copy into ``dst``."""
        try:
            out = memoryview(dst).cast("B")
        except TypeError as exc:
            raise InvalidArgument(f"get_into {key!r}: dst must be a contiguous bytes-like buffer ({exc})") from None
        if out.readonly:
            raise InvalidArgument(f"get_into {key!r}: dst is read-only")
        if size is not None and out.nbytes != size:
            raise InvalidArgument(f"get_into {key!r}: dst holds {out.nbytes} bytes, the entry {size}")
        if shm_name and arenas.is_arena_name(shm_name):
            view = self._arena_view(key, shm_name, shm_offset, size, crc32)
            copy = arenas.start_copy_with_crc(out, view)
            self._check_crc(key, await self._arena_work(copy, out.nbytes), crc32)
            return out.nbytes
        data = await self.get(key, shm_name=shm_name, size=size, crc32=crc32, shm_offset=shm_offset)
        if len(data) != out.nbytes:
            raise DataLoss(f"get_into {key!r}: got {len(data)} bytes, dst holds {out.nbytes}")
        await _maybe_thread(out.__setitem__, slice(None), memoryview(data).cast("B"), size=out.nbytes)
        return out.nbytes

    def _arena_view(self, key: str, shm_name: str, shm_offset: int, size: int | None,
                    crc32: int | None) -> memoryview:
        """The read-only view of an arena region (not verified yet: the caller checks its CRC)."""
        if size is None or crc32 is None:
            raise InvalidArgument(f"key {key!r}: reading an arena region needs its size and crc32")
        try:
            return self._reader.view(shm_name, shm_offset, size)
        except NotFound:
            raise NotFound(f"key {key!r}: shm arena {shm_name} is gone (store restarted)") from None

    @staticmethod
    def _check_crc(key: str, actual: int, expected: int) -> None:
        if actual != expected:
            raise DataLoss(f"key {key!r}: crc32 {actual} does not match the expected {expected} "
                           "(region released or overwritten?)")

    async def release(self, key: str) -> bool:
        try:
            await self._call("DELETE", f"/release/{quote(key, safe='')}")
            return True
        except NotFound:
            return False

    def release_soon(self, key: str) -> None:
        """Release ``key`` in the background, off the caller's path (a store round trip); a failure
        is logged and left to the key's lease. ``close()`` waits for these (2 s at most)."""
        async def release() -> None:
            try:
                await self.release(key)
            except PdgrpcError as exc:
                log.warning("could not release %s: %s (its lease reclaims it)", key, exc)

        self._releasing.add(task := asyncio.ensure_future(release()))
        task.add_done_callback(self._releasing.discard)

    async def release_owner(self, owner: str) -> int:
        body = await self._call("DELETE", f"/v1/owner/{quote(owner, safe='')}")
        return int(body["released"])

    async def renew(self, owner: str, lease_s: float) -> int:
        body = await self._call("POST", "/v1/lease/renew", {"owner": owner, "lease_s": lease_s})
        return int(body["renewed"])

    async def stats(self) -> dict:
        return (await self._call("GET", "/stats"))["stats"]

    async def write_json(self, key: str, value, *, location: str = "dram", owner: str = "",
                         lease_s: float | None = None) -> None:
        """gswarm's JSON /write (small metadata such as CUDA IPC handles; never KV bytes)."""
        body = {"key": key, "value": value, "location": location, "owner": owner}
        if lease_s is not None:
            body["lease_s"] = lease_s
        await self._call("POST", "/write", body)

    async def read_json(self, key: str):
        """The value of a JSON entry; NotFound if the key is unknown."""
        body = await self._call("GET", self._json_path("read", key))
        if not body.get("found", True):
            raise NotFound(f"key {key!r} not found")
        return body.get("value")

    async def exists(self, key: str) -> bool:
        try:
            await self._call("GET", self._json_path("location", key))
        except NotFound:
            return False
        return True

    async def health(self) -> bool:
        try:
            body = await self._call("GET", "/health")
        except PdgrpcError:
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

    async def close(self) -> None:
        if self._releasing:  # let the last releases reach the store rather than wait for their leases
            await asyncio.wait(set(self._releasing), timeout=2.0)
        # The arena is left to the store: entries in it may still wait for their readers; the
        # store deletes it once it is empty and idle.
        if self._arena_task is not None:
            with contextlib.suppress(BaseException):
                await self._arena_task
        if self._arena is not None:
            self._drop_arena(self._arena)
        self._reader.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def shm_enabled(self) -> bool:
        """Resolve use_shm=None once: same host as the store and /dev/shm present."""
        if self._use_shm is None:
            self._use_shm = shm.shm_available() and await asyncio.to_thread(_is_local_host, self._host)
        return self._use_shm

    # ---- plumbing ------------------------------------------------------------------------------

    @staticmethod
    def _json_path(endpoint: str, key: str) -> str:
        return f"/{endpoint}/{quote(key, safe='')}"

    @staticmethod
    def _kv_path(key: str, suffix: str = "") -> str:
        return f"/v1/kv/{quote(key, safe='')}{suffix}"

    def _kv_url(self, key: str, suffix: str = "") -> str:
        return self._base + self._kv_path(key, suffix)

    def _put_result(self, body: dict, *, shm_name: str) -> PutResult:
        return PutResult(key=body["key"], size=int(body["size"]), crc32=int(body["crc32"]),
                         location=body["location"], lease_expiry_unix=float(body["lease_expiry_unix"]),
                         shm_name=shm_name)

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=headers)
        return self._session

    def _send(self, method: str, path: str, payload=None) -> asyncio.Future:
        """A JSON call on the client's own connections (pdgrpc.kvstore.json_channel): sent before
        this returns when a pooled connection is free; ``_answer`` waits for and checks the answer."""
        if self._channel is None:
            self._channel = JsonChannel(self.address, headers=self._auth, timeout_s=self._json_timeout_s)
        return self._channel.call(method, path, b"" if payload is None else json.dumps(payload).encode())

    async def _answer(self, call: asyncio.Future) -> dict:
        try:
            status, body = await call
        except OSError as exc:  # ConnectionError, TimeoutError, a refused connect
            raise Unavailable(f"kv store {self.address} unreachable: {exc!r}") from None
        if status >= 400:
            raise self._error_from(status, body)
        try:
            return json.loads(body)
        except ValueError:
            raise Unavailable(f"kv store {self.address} answered HTTP {status} with a body that is not JSON") from None

    async def _call(self, method: str, path: str, payload=None) -> dict:
        return await self._answer(self._send(method, path, payload))

    async def _request(self, method: str, url: str, **kwargs) -> dict:
        """A call through aiohttp: for bodies of KV bytes, which it streams."""
        session = self._client_session()
        try:
            # encoded=True: the key is already percent-quoted; yarl must not re-quote it.
            async with session.request(method, yarl.URL(url, encoded=True), **kwargs) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                return await resp.json(content_type=None)
        except PdgrpcError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"kv store {self.address} unreachable: {exc!r}") from None

    async def _get_bytes(self, key: str) -> tuple[bytearray, int | None]:
        session = self._client_session()
        try:
            async with session.get(yarl.URL(self._kv_url(key), encoded=True)) as resp:
                if resp.status >= 400:
                    raise await self._error(resp)
                header = resp.headers.get("X-Checksum-Crc32")
                ok = header is not None and header.isascii() and header.isdigit() and len(header) <= 10
                crc = int(header) if ok else None
                if resp.content_length is None:
                    return bytearray(await resp.read()), crc
                # One preallocated buffer filled chunk by chunk: no second full-size copy.
                buf = bytearray(resp.content_length)
                pos = 0
                async for chunk in resp.content.iter_any():
                    end = pos + len(chunk)
                    if end > len(buf):
                        raise DataLoss(f"key {key!r}: store sent more than its Content-Length")
                    buf[pos:end] = chunk
                    pos = end
                if pos != len(buf):
                    raise DataLoss(f"key {key!r}: store sent {pos} of {len(buf)} bytes")
                return buf, crc
        except PdgrpcError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"kv store {self.address} unreachable: {exc!r}") from None

    async def _error(self, resp: aiohttp.ClientResponse) -> PdgrpcError:
        try:
            body = await resp.read()
        except aiohttp.ClientError:
            body = b""
        return self._error_from(resp.status, body)

    def _error_from(self, status: int, body: bytes) -> PdgrpcError:
        """The error for an answer of ``status`` >= 400: the store's JSON ``error`` and ``code``, or
        the start of whatever else it sent."""
        code = None
        try:
            answer = json.loads(body)
            message, code = str(answer["error"]), answer.get("code")
        except (ValueError, KeyError, TypeError):
            message = body[:500].decode(errors="replace")
        return _error_for_status(status, f"kv store {self.address}: {message}", code, self.address)


def _error_for_status(status: int, message: str, code: str | None, address: str) -> PdgrpcError:
    """The pdgrpc error for a store answer's HTTP status (and its ``code`` field)."""
    if status == 507:
        return ResourceExhausted(message)
    if status == 404:
        return NotFound(message)
    if status in (400, 409, 413):
        return InvalidArgument(message)
    if status == 401:
        return FailedPrecondition(f"kv store {address} rejected the token")
    if status == 500 and code == "DATA_LOSS":  # e.g. an adopted segment was truncated
        return DataLoss(message)
    if status >= 500:
        return Unavailable(f"{message} (HTTP {status})")
    return error_for(code, message) if isinstance(code, str) else InvalidArgument(f"{message} (HTTP {status})")
