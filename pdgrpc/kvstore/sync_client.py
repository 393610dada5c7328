"""A small synchronous client of the store, for processes with no event loop of ours: vLLM's worker
processes, where GswarmConnector saves and loads KV from its own threads.

It speaks the same HTTP API as the async ``KVStoreClient`` (PUT/GET /v1/kv/{key}, shm adoption,
DELETE /release/{key} and /v1/owner/{owner}) and uses the same shared-memory arenas: on the same
host a put is one copy into this process's pre-faulted arena (or none, for a region handed out by
``reserve`` and filled in place), a get a zero-copy view of the writer's region. Errors are
``StoreError`` with the gRPC status name the connector reports.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from pdgrpc.kvstore import arena as arenas
from pdgrpc.kvstore import shm

log = logging.getLogger(__name__)

SHM_MIN_BYTES = 256 << 10


class StoreError(Exception):
    """A store call failed; ``code`` is the gRPC status name (NOT_FOUND, DATA_LOSS, UNAVAILABLE, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Reservation:
    """A region of this process's arena handed out by ``SyncStore.reserve``, not yet committed."""

    arena: tuple  # (name, mapping, RegionAllocator): the arena it belongs to, even if replaced since
    offset: int
    view: memoryview


class SyncStore:
    """PUT/GET /v1/kv/{key}, shm adoption, DELETE /release/{key} and /v1/owner/{owner}."""

    def __init__(self, address: str, token: str | None, use_shm: bool, timeout_s: float = 30.0,
                 arena_bytes: int = 256 << 20) -> None:
        self.address = address
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.use_shm = use_shm and shm.shm_available()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout_s
        self._local = threading.local()
        # Same-host writes go to a pre-faulted shm arena (pdgrpc.kvstore.arena), as the async client's do.
        self.arena_bytes = arena_bytes if self.use_shm else 0
        self._arena: tuple[str, Any, arenas.RegionAllocator] | None = None  # name, mapping, regions
        self._arena_retry_at = 0.0
        self._lock = threading.Lock()  # arena creation and the reader's mappings (the allocator has its own)
        self._reader = arenas.ArenaReader()

    def _request(self, method: str, path: str, body=None, headers: dict | None = None,
                 meanwhile=None) -> tuple[int, dict, bytes]:
        """One request on this thread's keep-alive connection; ``meanwhile()`` (if given) runs after
        the request went out and before the answer is read, so the store works while we do."""
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)
            try:
                conn.request(method, path, body=body, headers={**self._headers, **(headers or {})})
                if meanwhile is not None:
                    meanwhile()
                    meanwhile = None  # a retry only resends the request
                resp = conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._local.conn = None
                if attempt:  # a stale keep-alive connection gets one retry
                    raise StoreError("UNAVAILABLE", f"kv store {self.address} unreachable: {exc!r}") from None
        raise AssertionError("unreachable")

    def _check(self, status: int, body: bytes, what: str) -> dict:
        if status < 400:
            return json.loads(body) if body else {}
        try:
            message = json.loads(body).get("error", "")
        except ValueError:
            message = body[:200].decode(errors="replace")
        code = {404: "NOT_FOUND", 507: "RESOURCE_EXHAUSTED", 401: "FAILED_PRECONDITION"}.get(
            status, "UNAVAILABLE" if status >= 500 else "INVALID_ARGUMENT")
        raise StoreError(code, f"{what}: kv store {self.address}: HTTP {status} {message}")

    def _writer_arena(self) -> tuple[str, Any, arenas.RegionAllocator] | None:
        with self._lock:
            if self._arena is not None or not self.arena_bytes or time.monotonic() < self._arena_retry_at:
                return self._arena
            try:
                status, _, raw = self._request("POST", "/v1/shm/arenas", json.dumps({"size": self.arena_bytes}),
                                               {"Content-Type": "application/json"})
                body = self._check(status, raw, "create arena")
                mapping = arenas.map_arena(body["arena"], writable=True)
                self._arena = (body["arena"], mapping, arenas.RegionAllocator(int(body["size"])))
            except Exception as exc:  # noqa: BLE001 -- no arena: one segment per put for a while
                log.warning("kv store %s: no shm arena (%s); one segment per put for 30 s", self.address, exc)
                self._arena_retry_at = time.monotonic() + 30.0
            return self._arena

    def _put_arena(self, key: str, data: memoryview, owner: str, lease_s: float) -> dict | None:
        arena = self._writer_arena()
        if arena is None:
            return None
        name, mapping, regions = arena
        offset = regions.alloc(data.nbytes)
        if offset is None:
            status, _, raw = self._request("GET", f"/v1/shm/arenas/{name}")
            if status == 404:
                self._drop_arena(arena)
                return None
            info = self._check(status, raw, "arena info")
            regions.resync_from(info)
            offset = regions.alloc(data.nbytes)
            if offset is None:
                return None
        return self._commit_region(key, arena, offset, data.nbytes, owner, lease_s,
                                   lambda: arenas.copy_with_crc(memoryview(mapping)[offset:offset + data.nbytes], data))

    def _commit_region(self, key: str, arena: tuple, offset: int, size: int, owner: str, lease_s: float,
                       fill: Callable[[], int]) -> dict | None:
        """Record region [offset, offset + size) of ``arena`` as ``key``. The commit goes out first and
        the store records it while ``fill()`` fills or checksums the region and returns its CRC (no
        crc32 in the commit: nobody can ask for the key before this put returns; readers get the CRC
        with its descriptor). None when the store lost the arena (restarted, or reaped it while idle).
        The region is used up whatever happens: committed, or handed back."""
        name, _, regions = arena
        committed = sent = False
        crcs: list[int] = []
        try:
            body = json.dumps({"shm_name": name, "offset": offset, "size": size, "owner": owner,
                               "lease_s": lease_s, "location": "dram"})
            sent = True
            status, _, raw = self._request("POST", f"/v1/kv/{quote(key, safe='')}/shm", body,
                                           {"Content-Type": "application/json"},
                                           meanwhile=lambda: crcs.append(fill()))
            if not crcs:  # the fill raised inside the request: never report a region we did not fill
                raise StoreError("INTERNAL", f"put {key}: filling the arena region failed")
            if status == 404:
                self._drop_arena(arena)
                sent = False  # the store has no such arena: nothing of ours to release there
                return None
            answer = self._check(status, raw, f"put {key}")
            committed = True
            regions.committed(offset, answer)
            return {**answer, "crc32": crcs[0], "shm_name": name, "shm_offset": offset}
        finally:
            if not committed:
                # The commit may have been recorded: keep the region counted as used (a resync frees
                # it once the store does not hold it) and release the key in case it was.
                (regions.commit if sent else regions.abandon)(offset)
                if sent:
                    try:
                        self.release(key)
                    except StoreError:
                        pass

    def open_arena(self) -> bool:
        """Get this process's arena now (an HTTP call), so the first save does not wait for it."""
        return self._writer_arena() is not None

    def reserve(self, nbytes: int) -> Reservation | None:
        """A region of the arena to gather ``nbytes`` of KV straight into (no buffer, no copy at put
        time); None when there is no arena or no room: the caller gathers into a buffer of its own."""
        arena = self._arena
        if arena is None or nbytes < SHM_MIN_BYTES:
            return None
        _, mapping, regions = arena
        offset = regions.alloc(nbytes)
        if offset is None:
            return None
        return Reservation(arena, offset, memoryview(mapping)[offset:offset + nbytes])

    def put_reserved(self, key: str, r: Reservation, owner: str, lease_s: float) -> dict:
        """Commit a reserved region as ``key``: its CRC is one read of the bytes, nothing is copied.
        The reservation is used up whatever happens (committed, or handed back)."""
        put = self._commit_region(key, r.arena, r.offset, r.view.nbytes, owner, lease_s,
                                  lambda: shm.checksum_split(r.view).run())
        if put is None:  # the store lost the arena: the bytes are still in our mapping, send them
            return self.put(key, memoryview(bytes(r.view)), owner, lease_s)
        return put

    @staticmethod
    def abandon(r: Reservation) -> None:
        """A reservation that will never be put (its save failed first)."""
        r.arena[2].abandon(r.offset)

    def _drop_arena(self, arena: tuple) -> None:
        with self._lock:
            if self._arena is arena:
                self._arena = None

    def put(self, key: str, data: memoryview, owner: str, lease_s: float) -> dict:
        if self.use_shm and data.nbytes >= SHM_MIN_BYTES:
            answer = self._put_arena(key, data, owner, lease_s)
            if answer is not None:
                return answer
        crc = shm.checksum(data)
        if self.use_shm and data.nbytes >= SHM_MIN_BYTES:
            name = shm.new_segment_name(str(self.port))
            try:
                shm.create_segment(name, data)
            except OSError as exc:
                raise StoreError("RESOURCE_EXHAUSTED", f"put {key}: /dev/shm: {exc}") from None
            adopted = False
            try:
                body = json.dumps({"shm_name": name, "size": data.nbytes, "crc32": crc, "owner": owner,
                                   "lease_s": lease_s, "location": "dram"})
                status, _, raw = self._request("POST", f"/v1/kv/{quote(key, safe='')}/shm", body,
                                               {"Content-Type": "application/json"})
                answer = self._check(status, raw, f"put {key}")
                adopted = True
            finally:
                if not adopted:
                    shm.unlink_segment(name)
            return {**answer, "shm_name": name, "shm_offset": 0}
        query = urlencode({"owner": owner, "lease_s": repr(float(lease_s)), "location": "dram"})
        status, _, raw = self._request("PUT", f"/v1/kv/{quote(key, safe='')}?{query}", data,
                                       {"X-Checksum-Crc32": str(crc), "Content-Type": "application/octet-stream"})
        return {**self._check(status, raw, f"put {key}"), "shm_name": "", "shm_offset": 0}

    def get(self, key: str, shm_name: str, size: int, crc32: int, shm_offset: int = 0) -> bytes | memoryview:
        """The bytes, checked; an arena region comes as a zero-copy view: use it before release."""
        if shm_name and arenas.is_arena_name(shm_name):
            try:
                with self._lock:
                    data = self._reader.view(shm_name, shm_offset, size)
            except Exception as exc:  # noqa: BLE001 -- NotFound, DataLoss, InvalidArgument of pdgrpc
                code = getattr(getattr(exc, "code", None), "name", "UNAVAILABLE")
                raise StoreError(code, f"get {key}: {exc}") from None
        elif shm_name:
            try:
                data = shm.read_segment(shm_name, size)
            except Exception as exc:  # noqa: BLE001 -- NotFound, DataLoss, InvalidArgument of pdgrpc
                code = getattr(getattr(exc, "code", None), "name", "UNAVAILABLE")
                raise StoreError(code, f"get {key}: {exc}") from None
        else:
            status, _, data = self._request("GET", f"/v1/kv/{quote(key, safe='')}")
            if status >= 400:
                self._check(status, data, f"get {key}")
        if len(data) != size:
            raise StoreError("DATA_LOSS", f"get {key}: {len(data)} bytes, the descriptor says {size}")
        actual = shm.checksum(data)
        if actual != crc32:
            raise StoreError("DATA_LOSS", f"get {key}: crc32 {actual} does not match the descriptor's {crc32}")
        return data

    def release(self, key: str) -> None:
        status, _, raw = self._request("DELETE", f"/release/{quote(key, safe='')}")
        if status != 404:
            self._check(status, raw, f"release {key}")

    def release_owner(self, owner: str) -> int:
        status, _, raw = self._request("DELETE", f"/v1/owner/{quote(owner, safe='')}")
        return int(self._check(status, raw, f"release owner {owner}").get("released", 0))
