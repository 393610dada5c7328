"""`pdgrpc kvstore`: the gswarm-compatible KV data store (aiohttp, one process, in-memory).

Protocol (JSON bodies unless noted; every error is ``{"error": "...", "code": "<pdgrpc code>"}``):

gswarm data API (see /work/shared/gswarm-data-api.md)
  POST   /write                 {"key","value","location"?,"owner"?,"lease_s"?}   -> {"status","key","location"}
  GET    /read/{key}            -> {"key","value","found"}; binary values as {"encoding":"base64","data"}
  DELETE /release/{key}         -> {"status","key"}; 404 if unknown
  GET    /location/{key}        -> {"key","location","locations":[LocationInfo]}
  GET    /locations             -> {"locations": {key: [LocationInfo]}}
  POST   /move                  {"key","destination"} -> {"status","key","source","destination","read_pointer"}
  GET    /stats                 -> {"stats": {...}}
  POST   /send                  {"key","url"} -> pushes the entry to another store
  POST   /send_extended         {"key","target","source_location"?}; node:device:N targets -> 501
  POST   /write_extended        {"key","serialized_value":{"type":"json"|"base64","data"},"location"?}
                                type "pickle" is refused (400): unpickling network input runs code
  GET    /read_extended/{key}   -> {"key","serialized_value":{"type","data"},"found"}
pdgrpc binary path (no JSON, no base64)
  PUT    /v1/kv/{key}?owner=&lease_s=&location=   body = raw bytes, optional X-Checksum-Crc32
                                -> 201 {"key","size","crc32","location","lease_expiry_unix"}; 409 if it exists
  GET    /v1/kv/{key}           -> raw bytes, header X-Checksum-Crc32
  POST   /v1/kv/{key}/shm       {"shm_name","size","crc32","owner","lease_s","location"} adopt a segment,
                                or with "offset": record a region of an arena (pdgrpc.kvstore.arena)
  POST   /v1/shm/arenas         {"size"} -> 201 {"arena","size"}: a pre-faulted arena for a same-host writer,
                                at most the size asked (each arena <= 1/4 of the budget, all <= 1/2); with
                                --transfer-engine mooncake also "transfer": {"engine","endpoint","address"}:
                                the arena is registered memory other hosts read (pdgrpc.transfer.mooncake)
  GET    /v1/shm/arenas/{name}  -> {"arena","size","live":[[offset,size],...]}
  DELETE /v1/shm/arenas/{name}  -> {"released": n} (its entries go with it)
  DELETE /v1/owner/{owner}      -> {"released": n}
  POST   /v1/lease/renew        {"owner","lease_s"} -> {"renewed": n}
  GET    /health, GET /metrics  (never need the token)

Status codes: 400 invalid request, 401 bad/missing token, 404 unknown key, 409 key exists,
413 body over max memory, 501 GPU transfer, 502 send target failed, 507 store full.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from pdgrpc import event_loop, sdnotify
from pdgrpc.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PdgrpcError,
    ResourceExhausted,
    Unavailable,
)
from pdgrpc.kvstore import arena as arenas
from pdgrpc.kvstore import shm
from pdgrpc.kvstore.entries import (
    KIND_BINARY,
    KIND_JSON,
    KIND_SHM,
    Entry,
    EntryTable,
    KeyExists,
    StoreMetrics,
    b64decode_field,
    dump_json,
    parse_crc_header,
    parse_json_object,
    validate_key,
    validate_lease,
    validate_location,
    validate_owner,
)

log = logging.getLogger("pdgrpc.kvstore")

REAP_INTERVAL_S = 0.5
_BIG = 8 << 20  # above this, checksums and segment reads go to a thread so the loop keeps serving
_SEND_CHUNK = 1 << 20  # bodies above this are written in pieces of this size (see get_kv)
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_GPU_TARGET_RE = re.compile(r"^[^:/]+:device:[0-9]+$")
_WRITE_ROUTES = {"write", "write_extended", "put_kv", "adopt_shm", "create_arena"}


def parse_size(text: str | int) -> int:
    """Bytes from '2GB', '512MB', '1GiB', '4096' ... K/M/G/T are powers of 1024 with or without the
    'i', as gswarm means them (its default '16GB' is 16 * 1024**3)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"cannot parse size {text!r}: use e.g. 2GB, 512MB, 1GiB or plain bytes")
    number, unit = float(m.group(1)), m.group(2).upper()
    return int(number * 1024 ** " KMGT".index(unit or " "))


@dataclass(frozen=True)
class StoreConfig:
    host: str = "127.0.0.1"
    port: int = 9015
    max_memory: int = 2 << 30
    token: str | None = None
    default_lease_s: float = 120.0  # binary/shm writes without lease_s; 0 = no expiry
    log_level: str = "info"
    access_log: bool = False
    arena_idle_s: float = 300.0  # an empty arena nobody wrote to for this long is deleted
    # "mooncake": arenas are registered with a Mooncake TransferEngine for other hosts' decode nodes
    # (pdgrpc.transfer.mooncake); "": none, no engine started (the one-host default).
    transfer_engine: str = ""
    transfer_host: str = ""  # the address other hosts reach the engine at (default: host)
    transfer_protocol: str = "tcp"  # tcp, or rdma in production
    transfer_device: str = ""  # RDMA NICs, e.g. mlx5_0

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidArgument("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port must be in [0, 65535], got {self.port}")
        if self.max_memory <= 0:
            raise InvalidArgument(f"max memory must be > 0 bytes, got {self.max_memory}")
        if self.default_lease_s != 0:
            try:
                validate_lease(self.default_lease_s)
            except InvalidArgument as exc:
                raise InvalidArgument(f"--default-lease-s: {exc.message} (or 0 for no expiry)") from None
        if not 0 < self.arena_idle_s < float("inf"):
            raise InvalidArgument(f"--arena-idle-s must be > 0 seconds, got {self.arena_idle_s}")
        if self.token is not None and not self.token.strip():
            raise InvalidArgument("token must not be blank")
        if self.transfer_engine not in ("", "mooncake"):
            raise InvalidArgument(f"--transfer-engine must be mooncake or empty, got {self.transfer_engine!r}")
        if self.transfer_engine and (self.transfer_host or self.host) in ("0.0.0.0", "::"):
            raise InvalidArgument("--transfer-engine needs the address other hosts reach: give --transfer-host")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise InvalidArgument(f"unknown log level {self.log_level!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StoreConfig:
        return cls(host=args.host, port=args.port, max_memory=parse_size(args.max_memory),
                   token=args.token or os.environ.get("PDGRPC_STORE_TOKEN") or None,
                   default_lease_s=args.default_lease_s, arena_idle_s=args.arena_idle_s, log_level=args.log_level,
                   transfer_engine=args.transfer_engine, transfer_host=args.transfer_host,
                   transfer_protocol=args.transfer_protocol, transfer_device=args.transfer_device,
                   access_log=args.access_log)


class Store:
    """Handlers and state of one store process."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.metrics = StoreMetrics(config.max_memory)
        self.table = EntryTable(config.max_memory, on_remove=self.metrics.on_remove)
        self._reaper: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._arena_maps = arenas.ArenaReader()
        self.scope = str(config.port)  # shm names carry the port, so a restart finds its leftovers
        self.exporter = None  # pdgrpc.transfer.mooncake.ArenaExporter with --transfer-engine mooncake

    def start_transfer_engine(self) -> None:
        """Start the transfer engine (never in the default, one-host store): arenas become registered memory."""
        from pdgrpc.transfer.mooncake import ArenaExporter

        cfg = self.config
        self.exporter = ArenaExporter(cfg.transfer_host or cfg.host, cfg.transfer_protocol, cfg.transfer_device)
        self.table.on_arena_drop = self.exporter.unregister
        log.info("mooncake transfer engine at %s (%s): shm arenas are readable from other hosts",
                 self.exporter.endpoint, cfg.transfer_protocol)

    # ---- helpers -----------------------------------------------------------------------------

    def _owner_and_expiry(self, owner: object, lease: object, default_lease: float) -> tuple[str, float | None]:
        owner = validate_owner("" if owner is None else owner)
        lease_s = default_lease if lease is None else validate_lease(lease)
        return owner, (time.monotonic() + lease_s if lease_s else None)

    def _add(self, entry: Entry, path: str, *, replace: bool = False) -> Entry:
        self.table.add(entry, replace=replace)
        self.metrics.writes.labels(path).inc()
        self.metrics.written_bytes.labels(path).inc(entry.size)
        return entry

    def _add_json_api(self, body: dict, kind: str, data: bytes) -> web.Response:
        """Store a /write or /write_extended value. gswarm's writes overwrite an existing key, so
        these do too; owner/lease_s are optional pdgrpc extensions (default: no owner, no expiry)."""
        location = validate_location(body.get("location", "dram"))
        owner, expires_at = self._owner_and_expiry(body.get("owner"), body.get("lease_s"), 0)
        self._add(Entry(key=body["key"], kind=kind, size=len(data), crc32=shm.checksum(data), location=location,
                        owner=owner, expires_at=expires_at, data=data), "json", replace=True)
        return web.json_response({"status": "success", "key": body["key"], "location": location})

    async def _entry_bytes(self, entry: Entry) -> bytes | bytearray:
        if entry.kind != KIND_SHM:
            return entry.data
        if entry.arena is not None:  # a copy: the writer may reuse the region once the key is released
            view = self._arena_maps.view(entry.shm_name, entry.shm_offset, entry.size)
            return await asyncio.to_thread(bytes, view) if entry.size > _BIG else bytes(view)
        try:
            if entry.size > _BIG:
                return await asyncio.to_thread(shm.read_segment, entry.shm_name, entry.size)
            return shm.read_segment(entry.shm_name, entry.size)
        except NotFound:
            raise NotFound(f"key {entry.key!r}: its shm segment {entry.shm_name} is gone") from None

    # ---- gswarm JSON API ---------------------------------------------------------------------

    async def write(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        validate_key(body.get("key"))
        if "value" not in body:
            raise InvalidArgument("missing field 'value'")
        return self._add_json_api(body, KIND_JSON, dump_json(body["value"]))

    async def write_extended(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        validate_key(body.get("key"))
        sv = body.get("serialized_value")
        if not isinstance(sv, dict):
            raise InvalidArgument("missing or non-object field 'serialized_value'")
        kind = sv.get("type")
        if kind == "pickle":
            raise InvalidArgument("serialized_value.type 'pickle' is refused: unpickling network input "
                                  "executes arbitrary code; send type 'json' or 'base64' (raw bytes)")
        if kind not in ("json", "base64"):
            raise InvalidArgument(f"unknown serialized_value.type {kind!r}: use 'json' or 'base64'")
        if "data" not in sv:
            raise InvalidArgument("missing field 'serialized_value.data'")
        if kind == "json":
            return self._add_json_api(body, KIND_JSON, dump_json(sv["data"]))
        return self._add_json_api(body, KIND_BINARY, b64decode_field(sv["data"], "serialized_value.data"))

    async def _read_json_api(self, request: web.Request, field: str, json_wrap: bytes) -> web.Response:
        """GET /read and /read_extended: JSON values spliced in as stored (no re-parse of a possibly
        large value), bytes as base64. Unknown keys answer 404 with gswarm's found=false body."""
        key = validate_key(request.match_info["key"])
        try:
            entry = self.table.get(key)
        except NotFound as exc:
            return web.json_response({"error": exc.message, "code": exc.code.value, "key": key,
                                      field: None, "found": False}, status=404)
        entry.touch()
        if entry.kind == KIND_JSON:
            value = json_wrap % entry.data
        else:
            b64 = base64.b64encode(await self._entry_bytes(entry)).decode()
            value = dump_json({"encoding": "base64", "data": b64} if field == "value"
                              else {"type": "base64", "data": b64})
        self.metrics.read_bytes.labels("json").inc(entry.size)
        body = b'{"key":%s,"%s":%s,"found":true}' % (dump_json(key), field.encode(), value)
        return web.Response(body=body, content_type="application/json")

    async def read(self, request: web.Request) -> web.Response:
        return await self._read_json_api(request, "value", b"%s")

    async def read_extended(self, request: web.Request) -> web.Response:
        return await self._read_json_api(request, "serialized_value", b'{"type":"json","data":%s}')

    async def release(self, request: web.Request) -> web.Response:
        key = validate_key(request.match_info["key"])
        self.table.remove(key)
        return web.json_response({"status": "success", "key": key})

    async def location(self, request: web.Request) -> web.Response:
        entry = self.table.get(validate_key(request.match_info["key"]))
        return web.json_response({"key": entry.key, "location": entry.location,
                                  "locations": [entry.location_info()]})

    async def locations(self, request: web.Request) -> web.Response:
        self.table.expire()
        return web.json_response({"locations": {e.key: [e.location_info()] for e in self.table.entries()}})

    async def move(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        key = validate_key(body.get("key"))
        destination = validate_location(body.get("destination"))
        source = self.table.move(key, destination)
        entry = self.table.get(key)
        return web.json_response({"status": "success", "key": key, "source": source,
                                  "destination": destination, "read_pointer": entry.shm_name or None})

    async def stats(self, request: web.Request) -> web.Response:
        self.table.expire()
        return web.json_response({"stats": self.table.stats()})

    async def send(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        key = validate_key(body.get("key"))
        target = body.get("url")
        await self._push(key, target)
        return web.json_response({"status": "success", "key": key, "target": target})

    async def send_extended(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        key = validate_key(body.get("key"))
        target = body.get("target")
        if isinstance(target, str) and _GPU_TARGET_RE.fullmatch(target):
            return _error(501, f"GPU-to-GPU transfer to {target!r} is not available: this store keeps every "
                               "entry in host memory; send to a store's host:port instead",
                          FailedPrecondition.code.value)
        source = self.table.get(key).location
        await self._push(key, target)
        return web.json_response({"status": "success", "key": key, "source": source, "target": target,
                                  "method": "standard"})

    async def _push(self, key: str, target: object) -> None:
        """Write an entry into another store: JSON values through /write (any gswarm server takes
        them), bytes through /write_extended type base64 (pdgrpc stores only)."""
        if not isinstance(target, str) or not re.fullmatch(r"(https?://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}/?", target):
            raise InvalidArgument(f"target {target!r} must be host:port or http://host:port")
        entry = self.table.get(key)
        url = (target if target.startswith("http") else f"http://{target}").rstrip("/")
        if entry.kind == KIND_JSON:
            path, payload = "/write", b'{"key":%s,"value":%s,"location":"dram"}' % (dump_json(key), entry.data)
        else:
            data = base64.b64encode(await self._entry_bytes(entry)).decode()
            path = "/write_extended"
            payload = dump_json({"key": key, "serialized_value": {"type": "base64", "data": data}, "location": "dram"})
        headers = {"Content-Type": "application/json"}
        if self.config.token:  # stores of one deployment share the token
            headers["Authorization"] = f"Bearer {self.config.token}"
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        try:
            async with self._session.post(url + path, data=payload, headers=headers) as resp:
                if resp.status >= 300:
                    text = (await resp.text())[:500]
                    raise Unavailable(f"target {target} answered {resp.status}: {text}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unavailable(f"target {target} unreachable: {exc!r}") from None
        self.metrics.read_bytes.labels("json").inc(entry.size)

    # ---- binary path ---------------------------------------------------------------------------

    def _binary_args(self, key: str, owner: object, lease: object, location: object) -> tuple:
        validate_key(key)
        owner_s, expires_at = self._owner_and_expiry(owner, lease, self.config.default_lease_s)
        location_s = validate_location("dram" if location is None else location)
        if self.table.contains(key):
            raise KeyExists(f"key {key!r} already exists")
        return owner_s, expires_at, location_s

    async def put_kv(self, request: web.Request) -> web.Response:
        key, q = request.match_info["key"], request.query
        lease = q.get("lease_s")
        if lease is not None:
            try:
                lease = float(lease)
            except ValueError:
                raise InvalidArgument(f"lease_s must be a number, got {lease!r}") from None
        owner, expires_at, location = self._binary_args(key, q.get("owner"), lease, q.get("location"))
        claimed = parse_crc_header(request.headers.get("X-Checksum-Crc32"))
        length = request.content_length
        if length is not None and length <= self.config.max_memory:  # larger: read() answers 413
            self.table.check_fits(length)  # refuse before buffering a body that cannot fit
            data = await _read_body_into(request, length)
        else:
            data = await request.read()
        crc = await asyncio.to_thread(shm.checksum, data) if len(data) > _BIG else shm.checksum(data)
        if claimed is not None and claimed != crc:
            raise InvalidArgument(f"checksum mismatch: header says crc32 {claimed}, body has {crc}")
        entry = self._add(Entry(key=key, kind=KIND_BINARY, size=len(data), crc32=crc, location=location,
                                owner=owner, expires_at=expires_at, data=data), "binary")
        return web.json_response(_put_answer(entry), status=201)

    async def get_kv(self, request: web.Request) -> web.Response:
        entry = self.table.get(validate_key(request.match_info["key"]))
        entry.touch()
        data = await self._entry_bytes(entry)
        self.metrics.read_bytes.labels("binary").inc(len(data))
        crc = entry.crc32
        if crc is None:  # an arena region committed without one (see adopt_shm)
            crc = await asyncio.to_thread(shm.checksum, data) if len(data) > _BIG else shm.checksum(data)
        headers = {"Content-Type": "application/json" if entry.kind == KIND_JSON else "application/octet-stream",
                   "X-Checksum-Crc32": str(crc), "X-Pdgrpc-Location": entry.location}
        if len(data) <= _SEND_CHUNK:
            return web.Response(body=data, headers=headers)
        # Big bodies go out chunk by chunk, each write waiting for the socket to drain: handed to
        # the transport in one piece, a body is copied into its buffer and memmoved down after every
        # partial send (quadratic in the size; 16 MB took ~20 ms of the store's CPU that way).
        resp = web.StreamResponse(headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        view = memoryview(data)
        try:
            for start in range(0, len(view), _SEND_CHUNK):
                await resp.write(view[start:start + _SEND_CHUNK])
            await resp.write_eof()
        except ConnectionError:  # the reader went away mid-body: nothing left to tell it
            pass
        return resp

    async def adopt_shm(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        body = parse_json_object(await request.read())
        name = shm.validate_name(body.get("shm_name"))
        size, crc = body.get("size"), body.get("crc32")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"size must be an integer >= 0, got {size!r}")
        if crc is None and "offset" in body:
            pass  # an arena region committed while it is written: the store computes it if ever asked
        elif isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc < 1 << 32:
            raise InvalidArgument(f"crc32 must be an integer in [0, 2**32), got {crc!r}")
        owner, expires_at, location = self._binary_args(key, body.get("owner"), body.get("lease_s"),
                                                        body.get("location"))
        if "offset" in body:  # a region of an arena: the table checks bounds and overlaps
            arena = self.table.arena(name)
            entry = self._add(Entry(key=key, kind=KIND_SHM, size=size, crc32=crc, location=location, owner=owner,
                                    expires_at=expires_at, shm_name=name, shm_offset=body["offset"], arena=arena),
                              "shm")
            version, freed = arena.take_freed()
            return web.json_response({**_put_answer(entry), "shm_name": name, "offset": entry.shm_offset,
                                      "version": version, "freed": freed}, status=201)
        if arenas.is_arena_name(name):
            raise InvalidArgument(f"{name} is an arena: give the region's offset")
        self.table.check_shm_name_free(name)
        try:
            actual = shm.segment_size(name)
        except NotFound:
            raise InvalidArgument(f"shm segment {name} does not exist on the store's host") from None
        if actual != size:
            raise InvalidArgument(f"shm segment {name} holds {actual} bytes, request says {size}")
        # No checksum pass here: a big segment would stall the loop, and every reader verifies crc32.
        entry = self._add(Entry(key=key, kind=KIND_SHM, size=size, crc32=crc, location=location, owner=owner,
                                expires_at=expires_at, shm_name=name), "shm")
        return web.json_response({**_put_answer(entry), "shm_name": name}, status=201)

    async def create_arena(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        size = self.table.grant_arena(self.table.arena_size(body.get("size")))
        name = arenas.new_arena_name(self.scope)
        try:
            await asyncio.to_thread(arenas.create_arena_file, name, size)  # allocates every page: not on the loop
        except OSError as exc:
            raise ResourceExhausted(f"cannot create a {size}-byte shm arena: {exc}") from None
        try:
            arena = self.table.add_arena(name, size)
        except ResourceExhausted:  # other writes took the space meanwhile
            shm.unlink_segment(name)
            raise
        answer = {"arena": arena.name, "size": arena.size}
        if self.exporter is not None:
            try:
                answer["transfer"] = await asyncio.to_thread(self.exporter.register, name)
            except PdgrpcError as exc:  # the arena still serves this host; other hosts read it over HTTP
                log.warning("arena %s not registered with the transfer engine: %s", name, exc)
        return web.json_response(answer, status=201)

    async def arena_info(self, request: web.Request) -> web.Response:
        arena = self.table.arena(request.match_info["name"])
        self.table.expire()  # expired regions are free regions
        version, _ = arena.take_freed()  # the live list supersedes them
        return web.json_response({"arena": arena.name, "size": arena.size, "live": arena.live, "version": version})

    async def drop_arena(self, request: web.Request) -> web.Response:
        return web.json_response({"released": self.table.drop_arena(request.match_info["name"], "released")})

    async def release_owner(self, request: web.Request) -> web.Response:
        owner = validate_owner(request.match_info["owner"], allow_empty=False)
        return web.json_response({"released": self.table.remove_owner(owner)})

    async def renew(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        owner = validate_owner(body.get("owner"), allow_empty=False)
        return web.json_response({"renewed": self.table.renew(owner, validate_lease(body.get("lease_s")))})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.table.expire()
        self.metrics.refresh(self.table)
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- plumbing ------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if self.config.token and request.path not in ("/health", "/metrics"):
                given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
                if not hmac.compare_digest(given, f"Bearer {self.config.token}".encode()):
                    resp = _error(401, "missing or wrong bearer token", "UNAUTHENTICATED")
                    resp.headers["WWW-Authenticate"] = "Bearer"
                    return resp
            resp = await handler(request)
        except PdgrpcError as exc:
            resp = _error(_STATUS.get(type(exc), 500), exc.message, exc.code.value)
        except web.HTTPException as exc:  # 404/405 from routing, 413 from client_max_size
            if exc.status < 400:
                raise
            text = f"no such endpoint: {request.method} {request.path}" if exc.status in (404, 405) else exc.text
            resp = _error(exc.status, text or exc.reason, "NOT_FOUND" if exc.status == 404 else "INVALID_ARGUMENT")
        except Exception as exc:  # a bug: say so instead of hiding it
            log.exception("unexpected error in %s %s", request.method, request.path)
            resp = _error(500, f"internal error: {exc!r}", "INTERNAL")
        route = request.match_info.route.name
        reason = {400: "invalid", 413: "invalid", 409: "exists", 507: "full"}.get(resp.status)
        if reason and route in _WRITE_ROUTES:
            self.metrics.rejected.labels(reason).inc()
        return resp

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            n = self.table.expire()
            if n:
                log.info("reclaimed %d expired entries", n)
            n = self.table.drop_idle_arenas(self.config.arena_idle_s)
            if n:
                log.info("deleted %d idle, empty shm arenas", n)

    async def on_startup(self, app: web.Application) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def on_cleanup(self, app: web.Application) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._session is not None:
            await self._session.close()
        self.table.clear()  # unlinks every shm segment the store owns
        self._arena_maps.close()
        if self.exporter is not None:
            self.exporter.close()

    def build_app(self) -> web.Application:
        # The body cap is the memory budget: nothing larger could ever be stored anyway.
        app = web.Application(client_max_size=self.config.max_memory, middlewares=[self.middleware])
        r = app.router
        r.add_post("/write", self.write, name="write")
        r.add_get("/read/{key}", self.read)
        r.add_delete("/release/{key}", self.release)
        r.add_get("/location/{key}", self.location)
        r.add_get("/locations", self.locations)
        r.add_post("/move", self.move)
        r.add_get("/stats", self.stats)
        r.add_post("/send", self.send)
        r.add_post("/send_extended", self.send_extended)
        r.add_post("/write_extended", self.write_extended, name="write_extended")
        r.add_get("/read_extended/{key}", self.read_extended)
        r.add_put("/v1/kv/{key}", self.put_kv, name="put_kv")
        r.add_get("/v1/kv/{key}", self.get_kv)
        r.add_post("/v1/kv/{key}/shm", self.adopt_shm, name="adopt_shm")
        r.add_post("/v1/shm/arenas", self.create_arena, name="create_arena")
        r.add_get("/v1/shm/arenas/{name}", self.arena_info)
        r.add_delete("/v1/shm/arenas/{name}", self.drop_arena)
        r.add_delete("/v1/owner/{owner}", self.release_owner)
        r.add_post("/v1/lease/renew", self.renew)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics_page)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app


# Domain error -> HTTP status. Unavailable only comes from /send's target; DataLoss from a segment
# that was truncated after adoption.
_STATUS = {InvalidArgument: 400, KeyExists: 409, NotFound: 404, ResourceExhausted: 507,
           FailedPrecondition: 412, Unavailable: 502, DataLoss: 500}


async def _read_body_into(request: web.Request, length: int) -> bytearray:
    """The body, read chunk by chunk into one buffer of its Content-Length (``request.read()`` grows a
    bytearray and then copies it into bytes: two copies and the reallocations in between)."""
    buf = bytearray(length)
    view = memoryview(buf)
    pos = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        end = pos + len(chunk)
        if end > length:  # the HTTP parser stops at Content-Length; this is a guard, not a path
            raise InvalidArgument(f"body longer than its Content-Length {length}")
        view[pos:end] = chunk
        pos = end
    if pos != length:
        raise InvalidArgument(f"body of {pos} bytes, Content-Length says {length}")
    return buf


def _put_answer(entry: Entry) -> dict:
    return {"key": entry.key, "size": entry.size, "crc32": entry.crc32, "location": entry.location,
            "lease_expiry_unix": entry.lease_expiry_unix()}


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


# ---- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9015, help="port for the API and /metrics (default 9015)")
    parser.add_argument("--max-memory", default="2GB",
                        help="memory budget, e.g. 2GB, 512MB, 1GiB or bytes (K/M/G = 1024 powers; default 2GB)")
    parser.add_argument("--token", default=None,
                        help="shared bearer token required on every endpoint but /health and /metrics "
                             "(default: $PDGRPC_STORE_TOKEN; the env var keeps it out of `ps`)")
    parser.add_argument("--default-lease-s", type=float, default=120.0,
                        help="lease of binary/shm entries written without lease_s; 0 = no expiry (default 120)")
    parser.add_argument("--arena-idle-s", type=float, default=300.0,
                        help="delete a shm arena that has held no entry and seen no write for this long "
                             "(its writer is gone or idle; a live writer makes a new one; default 300)")
    parser.add_argument("--transfer-engine", default="", choices=("", "mooncake"),
                        help="register shm arenas with a Mooncake TransferEngine so decode nodes on other hosts "
                             "read them (its ports: MC_MIN_RPC_PORT-MC_MAX_RPC_PORT; private network only)")
    parser.add_argument("--transfer-host", default="", help="address other hosts reach the engine at (default --host)")
    parser.add_argument("--transfer-protocol", default="tcp", choices=("tcp", "rdma"), help="engine transport")
    parser.add_argument("--transfer-device", default="", help="RDMA NICs for the engine, e.g. mlx5_0,mlx5_1")
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error (default info)")
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it is noise)")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve(config: StoreConfig) -> int:
    store = Store(config)
    # shutdown_timeout: give in-flight requests a moment on SIGTERM, not aiohttp's default minute.
    runner = web.AppRunner(store.build_app(), access_log=log if config.access_log else None,
                           handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(f"pdgrpc kvstore: cannot listen on {_hostport(config.host, config.port)}: {exc}", file=sys.stderr)
        return 1
    port = runner.addresses[0][1] if runner.addresses else config.port  # the real one when --port 0
    where = _hostport(config.host, port)
    store.scope = str(port)
    if config.transfer_engine:
        try:
            store.start_transfer_engine()
        except PdgrpcError as exc:
            await runner.cleanup()
            print(f"pdgrpc kvstore: {exc.message}", file=sys.stderr)
            return 1
    leftovers = shm.remove_scope(str(port))
    if leftovers:
        log.warning("removed %d shared-memory segments left by a previous store on port %d", leftovers, port)
    print(f"kvstore store listening on {where} metrics {where}", flush=True)
    sdnotify.notify("READY=1")
    log.info("max memory %d bytes, default lease %ss, token %s", config.max_memory, config.default_lease_s,
             "required" if config.token else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        sdnotify.notify("STOPPING=1")
        log.info("shutting down: releasing %d entries", len(store.table))
        await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        config = StoreConfig.from_args(args)
    except InvalidArgument as exc:
        print(f"pdgrpc kvstore: error: {exc.message}", file=sys.stderr)
        return 2
    disable_created_metrics()  # *_created series are noise for a long-running store
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return event_loop.run_process(lambda: serve(config), "pdgrpc kvstore")
