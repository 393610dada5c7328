"""Membership in etcd over its JSON gateway (aiohttp, already a dependency; no second protobuf
runtime in the process, see /work/shared/scale-out-notes.md).

Keys: ``<prefix>nodes/<name>`` -> :class:`NodeRecord` JSON, attached to the node's lease.

Node side, :class:`Registration`, in call order:

1. ``POST /v3/lease/grant {TTL}`` -> lease id.
2. ``POST /v3/kv/put {key, value, lease}``: the node appears to every coordinator watching.
3. Every ``ttl / 3`` ``POST /v3/lease/keepalive {ID}``. An answer without ``TTL`` means etcd has
   forgotten the lease (it expired while we could not reach etcd): back to 1. A failed call is
   logged once and retried every second; the key stays until the lease expires, and etcd does not
   expire leases while it is itself down, so a short etcd restart loses nothing.
4. ``close()``: ``POST /v3/lease/revoke`` deletes the key at once (a draining node takes no new
   requests); a node that dies without it leaves when its lease expires (``lease_ttl_s``).

Coordinator side, :class:`EtcdMembership`, in call order:

1. ``POST /v3/kv/range`` over the prefix: the whole membership at revision R, handed to
   ``on_change``.
2. ``POST /v3/watch {create_request: {key, range_end, start_revision: R + 1}}``: a stream of
   newline-separated JSON; every PUT or DELETE event updates the membership and calls ``on_change``.
3. Every second a cheap range (``count_only``) checks etcd answers: a watch on a frozen etcd would
   just stay silent.
4. Any failure (stream ends, etcd answers an error, probe fails): ``etcd_up`` turns False with one
   log line and the gauge ``pdgrpc_membership_etcd_up`` 0; the last membership stays in force.
   Retry from 1 every second; on success one log line, gauge 1, and the fresh range replaces the
   membership (changes missed meanwhile are not lost).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time

import aiohttp
from prometheus_client import Gauge

from pdgrpc.membership import Membership, NodeRecord, OnChange, RecordError

log = logging.getLogger(__name__)
RETRY_S = 1.0
PROBE_S = 1.0
CALL_TIMEOUT_S = 2.0

ETCD_UP = Gauge("pdgrpc_membership_etcd_up",
                "1: this process reaches etcd for membership; 0: it does not (a coordinator serves with the last "
                "membership seen, a node keeps retrying its registration)", ["role"])
NODES = Gauge("pdgrpc_membership_nodes", "Nodes registered in etcd as this coordinator last saw them", ["role"])


class EtcdError(RuntimeError):
    """etcd answered, but with an error (or not at all)."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for 'every key starting with prefix': the prefix with its last byte + 1."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return _b64(b"\0")
    raw[-1] += 1
    return _b64(bytes(raw))


def node_key(prefix: str, name: str) -> str:
    return f"{prefix}nodes/{name}"


class EtcdGateway:
    """The few etcd v3 calls membership needs, as JSON over HTTP."""

    def __init__(self, urls: str) -> None:
        # One etcd member's client URL, or several, comma-separated: a call that fails is tried on the
        # next member, and the next call starts where the last one worked.
        self.urls = [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def next_member(self) -> None:
        self._current = (self._current + 1) % len(self.urls)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # A watch message holds every event of one revision on one line: room for a few thousand
            # node records (the default would fail on lines over 64 KiB and fall back to a resync).
            self._session = aiohttp.ClientSession(read_bufsize=1 << 20)
        return self._session

    async def call(self, path: str, body: dict, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        for _ in range(len(self.urls) - 1):
            try:
                return await self._call(path, body, timeout_s)
            except EtcdError:
                self.next_member()
        return await self._call(path, body, timeout_s)

    async def _call(self, path: str, body: dict, timeout_s: float) -> dict:
        try:
            async with self.session.post(f"{self.url}/v3/{path}", json=body,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EtcdError(f"{path}: {type(exc).__name__}: {exc}") from exc
        try:
            out = json.loads(text)
        except ValueError as exc:
            raise EtcdError(f"{path}: HTTP {resp.status}, not JSON: {text[:200]!r}") from exc
        if not isinstance(out, dict):
            raise EtcdError(f"{path}: HTTP {resp.status}, not a JSON object: {text[:200]!r}")
        if resp.status != 200 or "error" in out:
            raise EtcdError(f"{path}: HTTP {resp.status}: {out.get('message') or out.get('error') or text[:200]}")
        return out

    async def grant(self, ttl_s: int) -> str:
        lease = (await self.call("lease/grant", {"TTL": ttl_s})).get("ID")
        if not lease:
            raise EtcdError("lease/grant: no lease ID in the answer")
        return lease

    async def keepalive(self, lease: str) -> bool:
        """True while etcd still has the lease."""
        result = (await self.call("lease/keepalive", {"ID": lease})).get("result", {})
        return int(result.get("TTL", 0)) > 0

    async def revoke(self, lease: str) -> None:
        await self.call("lease/revoke", {"ID": lease})

    async def put(self, key: str, value: str, lease: str) -> None:
        await self.call("kv/put", {"key": _b64(key), "value": _b64(value), "lease": lease})

    async def range_prefix(self, prefix: str, count_only: bool = False) -> tuple[list[tuple[str, bytes]], int]:
        out = await self.call("kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                           "count_only": count_only})
        try:
            kvs = [(base64.b64decode(kv["key"]).decode(), base64.b64decode(kv.get("value", "")))
                   for kv in out.get("kvs", [])]
            return kvs, int(out["header"]["revision"])
        except (KeyError, ValueError, TypeError) as exc:
            raise EtcdError(f"kv/range: unexpected answer: {exc!r}") from exc

    async def watch(self, prefix: str, start_revision: int):
        """Yields (type, key, value) for every event after start_revision; ends when the stream does."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                   "start_revision": start_revision}}
        try:
            async with self.session.post(f"{self.url}/v3/watch", json=body,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=CALL_TIMEOUT_S)
                                         ) as resp:
                if resp.status != 200:
                    raise EtcdError(f"watch: HTTP {resp.status}")
                async for line in resp.content:
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:  # etcd shutting down sends one (grpc_code 14) and closes
                        raise EtcdError(f"watch: {msg['error'].get('message', msg['error'])}")
                    result = msg.get("result", {})
                    if result.get("canceled"):
                        raise EtcdError(f"watch canceled: {result.get('cancel_reason', '')}")
                    for ev in result.get("events", []):
                        kv = ev.get("kv", {})
                        yield (ev.get("type", "PUT"), base64.b64decode(kv.get("key", "")).decode(),
                               base64.b64decode(kv.get("value", "")))
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.next_member()
            raise EtcdError(f"watch: {type(exc).__name__}: {exc}") from exc
        self.next_member()
        raise EtcdError("watch stream ended")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _UpState:
    """etcd reachable or not, as this process sees it: one log line per change, and the gauge."""

    def __init__(self, url: str, role: str, what: str) -> None:
        self.url, self.role, self.what = url, role, what
        self.up: bool | None = None
        ETCD_UP.labels(role).set(0)

    def set(self, up: bool, detail: str = "") -> None:
        if up is self.up:
            return
        if up:
            log.info("etcd at %s reachable%s", self.url, f"; {detail}" if detail else "")
        else:
            log.warning("etcd at %s unreachable (%s); %s", self.url, detail, self.what)
        self.up = up
        ETCD_UP.labels(self.role).set(1 if up else 0)


class Registration:
    """A node's record in etcd, kept alive under a lease; see the module docstring."""

    def __init__(self, url: str, prefix: str, ttl_s: int, record: NodeRecord) -> None:
        self.gateway = EtcdGateway(url)
        self.key = node_key(prefix, record.name)
        self.ttl_s = ttl_s
        self.record = record
        self.lease: str | None = None
        self.put_done = False   # the key is in etcd under self.lease
        self.state = _UpState(url, record.role, "retrying every second; the coordinators keep this node "
                                                "until its lease expires")
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Register once (or log why not) and keep the registration alive in the background."""
        await self._register_once()
        self._task = asyncio.create_task(self._run(), name="membership-registration")

    async def _register_once(self) -> bool:
        try:
            if self.lease is None or not await self.gateway.keepalive(self.lease):
                self.lease, self.put_done = await self.gateway.grant(self.ttl_s), False
            if not self.put_done:  # also when the grant worked and the put did not
                await self.gateway.put(self.key, self.record.to_json(), self.lease)
                self.put_done = True
                log.info("registered %s in etcd (lease %s, ttl %ds)", self.key, self.lease, self.ttl_s)
        except EtcdError as exc:
            self.state.set(False, str(exc))
            return False
        self.state.set(True)
        return True

    async def _run(self) -> None:
        while True:
            ok = await self._register_once()
            await asyncio.sleep(max(self.ttl_s / 3, 0.5) if ok else RETRY_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease is not None:
            with contextlib.suppress(EtcdError):
                await self.gateway.revoke(self.lease)
                log.info("deregistered %s from etcd", self.key)
        await self.gateway.close()


class EtcdMembership(Membership):
    """Every node registered under the prefix, kept current by a watch; see the module docstring."""

    def __init__(self, url: str, prefix: str, role: str = "coordinator") -> None:
        self.gateway = EtcdGateway(url)
        self.prefix = node_key(prefix, "")
        self.records: dict[str, NodeRecord] = {}
        self.state = _UpState(url, role, "serving with the last membership seen")
        self.last_update = 0.0   # time.monotonic() of the last membership read from etcd
        self._on_change: OnChange | None = None
        self._task: asyncio.Task | None = None

    @property
    def etcd_up(self) -> bool:  # type: ignore[override]
        return bool(self.state.up)

    async def start(self, on_change: OnChange) -> None:
        self._on_change = on_change
        revision = await self._resync()
        if revision is None:
            on_change({})  # nothing seen yet: an empty pool until etcd answers
        self._task = asyncio.create_task(self._run(revision), name="membership-watch")

    async def _resync(self) -> int | None:
        try:
            kvs, revision = await self.gateway.range_prefix(self.prefix)
        except EtcdError as exc:
            self.state.set(False, str(exc))
            return None
        records = {}
        for key, value in kvs:
            record = self._parse(key, value)
            if record is not None:
                records[record.name] = record
        self.records = records
        self.last_update = time.monotonic()
        self.state.set(True, f"{len(records)} nodes registered")
        self._publish()
        return revision

    def _parse(self, key: str, value: bytes) -> NodeRecord | None:
        try:
            record = NodeRecord.from_json(value)
        except RecordError as exc:
            log.warning("ignoring %s in etcd: %s", key, exc)
            return None
        if key != self.prefix + record.name:
            log.warning("ignoring %s in etcd: its record names node %r", key, record.name)
            return None
        return record

    def _publish(self) -> None:
        for role in ("prefill", "decode", "colocated"):
            NODES.labels(role).set(sum(1 for r in self.records.values() if r.role == role))
        if self._on_change is not None:
            self._on_change(dict(self.records))

    async def _run(self, revision: int | None) -> None:
        while True:
            if revision is not None:
                watch = asyncio.create_task(self._watch(revision + 1))
                probe = asyncio.create_task(self._probe())
                done, pending = await asyncio.wait({watch, probe}, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for t in done:
                    exc = t.exception()
                    self.state.set(False, f"{type(exc).__name__}: {exc}" if exc else "watch ended")
                await asyncio.sleep(RETRY_S)
            else:
                await asyncio.sleep(RETRY_S)
            revision = await self._resync()

    async def _watch(self, start_revision: int) -> None:
        async for kind, key, value in self.gateway.watch(self.prefix, start_revision):
            name = key[len(self.prefix):]
            if kind == "DELETE":
                if self.records.pop(name, None) is not None:
                    log.info("node %s left the membership", name)
            else:
                record = self._parse(key, value)
                if record is None:
                    continue
                if self.records.get(name) != record:
                    log.info("node %s (%s at %s) joined the membership", name, record.role, record.address)
                self.records[name] = record
            self.last_update = time.monotonic()
            self._publish()

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(PROBE_S)
            await self.gateway.range_prefix(self.prefix, count_only=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.gateway.close()
