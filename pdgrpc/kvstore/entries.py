"""The KV store's in-memory entry table (capacity accounting, owners, leases), the validation of
request fields, and the store's Prometheus metrics. No HTTP here: ``pdgrpc.kvstore.server`` maps
these errors to status codes.

Everything here runs on the store's event loop thread, so a check-then-insert (``add``) is atomic
without locks: there is no ``await`` between the capacity check and the insertion.

An entry is one of three kinds:
  * ``json``   — a JSON value written through /write or /write_extended, held as canonical JSON text;
  * ``binary`` — raw bytes from PUT /v1/kv/{key} or /write_extended type "base64";
  * ``shm``    — a /dev/shm segment a same-host client created and the store adopted; the table
                 owns it from then on and unlinks it when the entry goes (release, expiry, shutdown);
                 or a region of a shm arena (``pdgrpc.kvstore.arena``): the entry going frees the
                 region for the arena's writer to reuse.

Capacity: every kind counts against ``capacity`` (shm segments live in RAM too). An arena reserves
its whole size when it is created; entries inside it then cost nothing more. A write that does not
fit is refused with ResourceExhausted; nothing is ever evicted to make room.

Locations: ``dram``, ``pinned_dram``, ``disk`` and ``device:N`` are accepted and reported, but on
this CPU-only store every entry is held in host memory whatever its location says (there is no
pinned allocator, no GPU and no spill to disk). The label is kept so gswarm clients that move data
between locations see the bookkeeping they expect.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from pdgrpc.errors import InvalidArgument, NotFound, ResourceExhausted
from pdgrpc.kvstore import arena as arenas
from pdgrpc.kvstore import shm

log = logging.getLogger(__name__)

KEY_MAX_CHARS = 256
OWNER_MAX_CHARS = 256
MAX_LEASE_S = 7 * 24 * 3600.0
LOCATION_CLASSES = ("dram", "pinned_dram", "disk", "device")
_DEVICE_RE = re.compile(r"^device:([0-9]{1,4})$")

KIND_JSON = "json"
KIND_BINARY = "binary"
KIND_SHM = "shm"


class KeyExists(InvalidArgument):
    """The key (or the shm segment) is already stored; the HTTP layer answers 409."""


def _has_control_chars(s: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in s)


def _check_utf8(what: str, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8 (unpaired surrogate)") from None


def validate_key(key: object) -> str:
    if not isinstance(key, str):
        raise InvalidArgument(f"key must be a string, got {type(key).__name__}")
    if not key:
        raise InvalidArgument("key must not be empty")
    if len(key) > KEY_MAX_CHARS:
        raise InvalidArgument(f"key is {len(key)} chars long, at most {KEY_MAX_CHARS} allowed")
    if "/" in key or key in (".", ".."):  # path-like keys could not be addressed in /read/{key}
        raise InvalidArgument(f"key {key!r} must not contain '/' or be '.' or '..'")
    if _has_control_chars(key):
        raise InvalidArgument(f"key {key!r} must not contain control characters")
    _check_utf8("key", key)
    return key


def validate_owner(owner: object, *, allow_empty: bool = True) -> str:
    if not isinstance(owner, str):
        raise InvalidArgument(f"owner must be a string, got {type(owner).__name__}")
    if not owner and not allow_empty:
        raise InvalidArgument("owner must not be empty")
    if len(owner) > OWNER_MAX_CHARS or "/" in owner or _has_control_chars(owner):
        raise InvalidArgument(
            f"owner {owner[:80]!r} must be at most {OWNER_MAX_CHARS} chars without '/' or control characters")
    _check_utf8("owner", owner)
    return owner


def validate_location(location: object) -> str:
    if not isinstance(location, str):
        raise InvalidArgument(f"location must be a string, got {type(location).__name__}")
    if location in ("dram", "pinned_dram", "disk") or _DEVICE_RE.fullmatch(location):
        return location
    raise InvalidArgument(f"unknown location {location[:80]!r}: use dram, pinned_dram, disk or device:N")


def validate_lease(lease_s: object) -> float:
    """A lease in seconds: a finite number in (0, MAX_LEASE_S]."""
    if isinstance(lease_s, bool) or not isinstance(lease_s, (int, float)):
        raise InvalidArgument(f"lease_s must be a number, got {type(lease_s).__name__}")
    lease = float(lease_s)
    if not math.isfinite(lease) or not 0 < lease <= MAX_LEASE_S:
        raise InvalidArgument(f"lease_s must be > 0 and <= {MAX_LEASE_S:.0f}, got {lease_s}")
    return lease


def location_class(location: str) -> str:
    """The bounded metrics label for a location (device:N collapses to device)."""
    return "device" if location.startswith("device:") else location


@dataclass(eq=False)
class Entry:
    key: str
    kind: str
    size: int
    crc32: int | None  # None: an arena region committed while it was written; readers get it elsewhere
    location: str
    owner: str = ""
    expires_at: float | None = None  # time.monotonic(); None = no lease, kept until released
    data: bytes = b""  # canonical JSON text (json) or the raw bytes (binary); empty for shm
    shm_name: str = ""
    shm_offset: int = 0
    arena: arenas.Arena | None = None  # set when the bytes live in a region of this arena
    last_accessed: float = field(default_factory=time.time)

    def touch(self) -> None:
        self.last_accessed = time.time()

    def lease_expiry_unix(self) -> float:
        """Wall-clock expiry for clients (monotonic time means nothing outside this process); 0 = none."""
        if self.expires_at is None:
            return 0.0
        return time.time() + max(0.0, self.expires_at - time.monotonic())

    def location_info(self) -> dict:
        """gswarm's LocationInfo. read_pointer is the shm segment name for same-host readers."""
        info = {
            "location": self.location,
            "size": self.size,
            "last_accessed": self.last_accessed,
            "copy_status": "complete",  # moves are bookkeeping only here, so never in flight
            "copy_progress": 1.0,
            "read_pointer": self.shm_name or None,
        }
        if self.arena is not None:  # pdgrpc extension: where in the arena the bytes are
            info["read_offset"] = self.shm_offset
        return info


# ---- request fields ----------------------------------------------------------------------------

def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """A request body that must be a JSON object; NaN/Infinity are refused (not JSON)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise InvalidArgument(f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def dump_json(value: object) -> bytes:
    """Canonical compact JSON; ASCII-escaped so any str (even an unpaired surrogate) encodes."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"value cannot be stored as JSON: {exc}") from None


def b64decode_field(data: object, what: str) -> bytes:
    if not isinstance(data, str):
        raise InvalidArgument(f"{what} must be a base64 string, got {type(data).__name__}")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"{what} is not valid base64: {exc}") from None


def parse_crc_header(value: str | None) -> int | None:
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) >= 1 << 32:
        raise InvalidArgument(f"X-Checksum-Crc32 must be a decimal crc32 in [0, 2**32), got {value[:40]!r}")
    return int(value)


# on_remove(entry, reason) with reason in "released", "expired", "replaced", "shutdown".
RemoveHook = Callable[[Entry, str], None]


class EntryTable:
    def __init__(self, capacity: int, on_remove: RemoveHook | None = None) -> None:
        if capacity <= 0:
            raise InvalidArgument(f"capacity must be > 0 bytes, got {capacity}")
        self.capacity = capacity
        self.used = 0  # bytes of entries outside arenas plus the full size of every arena
        self.arenas: dict[str, arenas.Arena] = {}
        self._entries: dict[str, Entry] = {}
        self._shm_owner: dict[str, str] = {}  # shm_name -> key, so one segment is adopted once
        self._by_location: dict[str, list[int]] = {}  # exact location -> [bytes, keys]
        self._on_remove = on_remove
        self.on_arena_drop: Callable[[str], None] | None = None  # the transfer engine unregisters it

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    # ---- lookups ------------------------------------------------------------------------------

    def get(self, key: str) -> Entry:
        """The live entry for ``key``; an expired one the reaper has not reached yet is reclaimed now."""
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= time.monotonic():
            self._remove(entry, "expired")
            entry = None
        if entry is None:
            raise NotFound(f"key {key!r} not found")
        return entry

    def contains(self, key: str) -> bool:
        try:
            self.get(key)
            return True
        except NotFound:
            return False

    def check_fits(self, size: int, replacing: Entry | None = None) -> None:
        free = self.free + (replacing.size if replacing is not None else 0)
        if size > free:
            raise ResourceExhausted(
                f"store full: {size} bytes requested, {free} free of {self.capacity}")

    def check_shm_name_free(self, name: str) -> None:
        if name in self._shm_owner:
            raise KeyExists(f"shm segment {name} is already adopted by another key")

    # ---- mutations ----------------------------------------------------------------------------

    def add(self, entry: Entry, *, replace: bool = False) -> None:
        """Insert ``entry``. An existing key is replaced (gswarm's /write semantics) only if
        ``replace``; otherwise KeyExists. Raises ResourceExhausted if it does not fit."""
        old = self._entries.get(entry.key)
        if old is not None and old.expires_at is not None and old.expires_at <= time.monotonic():
            self._remove(old, "expired")
            old = None
        if old is not None and not replace:
            raise KeyExists(f"key {entry.key!r} already exists")
        if entry.arena is not None:
            entry.arena.check_region(entry.shm_offset, entry.size)
        elif entry.shm_name:
            self.check_shm_name_free(entry.shm_name)
        if entry.arena is None:  # an arena's space was reserved when it was created
            self.check_fits(entry.size, replacing=old if old is not None and old.arena is None else None)
        if old is not None:
            self._remove(old, "replaced")
        self._entries[entry.key] = entry
        if entry.arena is not None:
            entry.arena.add(entry.shm_offset, entry.size)
        else:
            self.used += entry.size
        self._account(entry.location, entry.size, 1)
        if entry.shm_name and entry.arena is None:
            self._shm_owner[entry.shm_name] = entry.key

    def remove(self, key: str) -> Entry:
        entry = self.get(key)
        self._remove(entry, "released")
        return entry

    def remove_owner(self, owner: str) -> int:
        victims = [e for e in self._entries.values() if e.owner == owner]
        for entry in victims:
            self._remove(entry, "released")
        return len(victims)

    def renew(self, owner: str, lease_s: float) -> int:
        """Set every entry of ``owner`` to expire ``lease_s`` from now; the count renewed."""
        self.expire()  # an already-expired entry is gone; renewing must not resurrect it
        deadline = time.monotonic() + lease_s
        n = 0
        for entry in self._entries.values():
            if entry.owner == owner:
                entry.expires_at = deadline
                n += 1
        return n

    def move(self, key: str, destination: str) -> str:
        """Relabel an entry's location (all are in host memory); return the source location."""
        entry = self.get(key)
        source = entry.location
        self._account(source, -entry.size, -1)
        entry.location = destination
        self._account(destination, entry.size, 1)
        entry.touch()
        return source

    def expire(self) -> int:
        """Reclaim every entry whose lease has run out; the count reclaimed."""
        now = time.monotonic()
        victims = [e for e in self._entries.values() if e.expires_at is not None and e.expires_at <= now]
        for entry in victims:
            self._remove(entry, "expired")
        return len(victims)

    def clear(self) -> None:
        """Drop everything (shutdown): unlink every segment and arena the store owns."""
        for entry in list(self._entries.values()):
            self._remove(entry, "shutdown")
        for name in list(self.arenas):
            self.drop_arena(name, "shutdown")

    # ---- arenas -------------------------------------------------------------------------------

    @property
    def arena_bytes(self) -> int:
        """Bytes reserved by arenas (all counted in ``used``)."""
        return sum(a.size for a in self.arenas.values())

    @property
    def arena_used_bytes(self) -> int:
        """Bytes of live entries inside arenas."""
        return sum(a.used_bytes for a in self.arenas.values())

    @staticmethod
    def arena_size(size: object) -> int:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= arenas.MAX_ARENA_BYTES:
            raise InvalidArgument(f"arena size must be an integer in (0, {arenas.MAX_ARENA_BYTES}], got {size!r}")
        return arenas.align_up(size)

    def grant_arena(self, asked: int) -> int:
        """How big an arena we hand out for ``asked`` bytes: arenas are reserved whole, so each gets
        at most a quarter of the budget and all of them at most half, leaving room for the rest."""
        in_arenas = self.arena_bytes
        size = min(asked, self.capacity // 4, self.capacity // 2 - in_arenas) // arenas.ALIGN * arenas.ALIGN
        if size < min(asked, arenas.MIN_ARENA_BYTES):
            raise ResourceExhausted(f"no room for another shm arena: {in_arenas} of {self.capacity} bytes "
                                    "are in arenas already (at most half)")
        self.check_fits(size)
        return size

    def add_arena(self, name: str, size: int) -> arenas.Arena:
        """Register an arena file the caller created and reserve its size (ResourceExhausted if it
        does not fit: the caller then removes the file)."""
        self.check_fits(size)
        arena = self.arenas[name] = arenas.Arena(name, size)
        self.used += size
        return arena

    def arena(self, name: object) -> arenas.Arena:
        arena = self.arenas.get(name) if isinstance(name, str) else None
        if arena is None:
            raise NotFound(f"shm arena {name!r} not found")
        return arena

    def drop_arena(self, name: str, reason: str) -> int:
        """Remove an arena, its entries first (``reason`` for them); the count of entries dropped."""
        arena = self.arena(name)
        victims = [e for e in self._entries.values() if e.arena is arena]
        for entry in victims:
            self._remove(entry, reason)
        del self.arenas[name]
        self.used -= arena.size
        if self.on_arena_drop is not None:
            self.on_arena_drop(name)
        shm.unlink_segment(name)
        return len(victims)

    def drop_idle_arenas(self, idle_s: float) -> int:
        """Arenas with no live entry and no write for ``idle_s``: their writer is gone or idle."""
        cutoff = time.monotonic() - idle_s
        idle = [a.name for a in self.arenas.values() if not a.live and a.last_used < cutoff]
        for name in idle:
            self.drop_arena(name, "expired")
        return len(idle)

    def _remove(self, entry: Entry, reason: str) -> None:
        if self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        self._account(entry.location, -entry.size, -1)
        if entry.arena is not None:
            entry.arena.remove(entry.shm_offset)
        else:
            self.used -= entry.size
        if entry.shm_name and entry.arena is None:
            self._shm_owner.pop(entry.shm_name, None)
            try:
                shm.unlink_segment(entry.shm_name)
            except OSError as exc:  # keep going: the entry is gone either way
                log.warning("could not unlink shm segment %s: %s", entry.shm_name, exc)
        if self._on_remove is not None:
            self._on_remove(entry, reason)

    def _account(self, location: str, size: int, keys: int) -> None:
        slot = self._by_location.setdefault(location, [0, 0])
        slot[0] += size
        slot[1] += keys
        if slot[1] == 0:
            del self._by_location[location]

    # ---- reporting ----------------------------------------------------------------------------

    def totals_by_class(self) -> dict[str, tuple[int, int]]:
        """(bytes, keys) per bounded location class, every class present."""
        out = {c: [0, 0] for c in LOCATION_CLASSES}
        for location, (size, keys) in self._by_location.items():
            slot = out[location_class(location)]
            slot[0] += size
            slot[1] += keys
        return {c: (v[0], v[1]) for c, v in out.items()}

    def stats(self) -> dict:
        """gswarm's stats object. All sizes in bytes; memory_info describes the store's own budget
        (gswarm reports host memory there; the budget is what decides whether a write fits)."""
        by = self._by_location
        dram = by.get("dram", [0, 0])
        pinned = by.get("pinned_dram", [0, 0])
        disk = by.get("disk", [0, 0])
        gpu = {loc: {"used": v[0], "keys": v[1]} for loc, v in sorted(by.items()) if loc.startswith("device:")}
        shm_entries = [e for e in self._entries.values() if e.kind == KIND_SHM]
        return {
            "max_dram_size": self.capacity,
            "current_dram_size": dram[0],
            "current_pinned_size": pinned[0],
            "dram_usage_percent": 100.0 * dram[0] / self.capacity,
            "total_keys": len(self._entries),
            "location_counts": {loc: v[1] for loc, v in sorted(by.items())},
            "dram_keys": dram[1],
            "pinned_keys": pinned[1],
            "disk_usage": disk[0],
            "disk_keys": disk[1],
            "gpu_stats": gpu,
            "active_moves": 0,  # moves are instantaneous relabels
            "memory_info": {
                "total": self.capacity,
                "used": self.used,
                "available": self.free,
                "percent": 100.0 * self.used / self.capacity,
                "held_in": "host memory",
            },
            "shm_keys": len(shm_entries),
            "shm_bytes": sum(e.size for e in shm_entries),
            "shm_arenas": len(self.arenas),
            "shm_arena_bytes": self.arena_bytes,
            "shm_arena_used_bytes": self.arena_used_bytes,
        }


class StoreMetrics:
    """Prometheus metrics of one store; labels are bounded (location class, path, reason)."""

    def __init__(self, capacity: int) -> None:
        self.registry = r = CollectorRegistry()
        self.bytes = Gauge("pdgrpc_store_bytes", "Bytes held, by location", ["location"], registry=r)
        self.keys = Gauge("pdgrpc_store_keys", "Entries held, by location", ["location"], registry=r)
        self.capacity = Gauge("pdgrpc_store_capacity_bytes", "Memory budget (--max-memory)", registry=r)
        self.writes = Counter("pdgrpc_store_writes", "Accepted writes, by path", ["path"], registry=r)
        self.rejected = Counter("pdgrpc_store_rejected_writes", "Refused writes, by reason", ["reason"], registry=r)
        self.expiries = Counter("pdgrpc_store_lease_expiries", "Entries reclaimed at lease expiry", registry=r)
        self.released = Counter("pdgrpc_store_released", "Entries released by clients", registry=r)
        self.read_bytes = Counter("pdgrpc_store_read_bytes", "Bytes served, by path", ["path"], registry=r)
        self.written_bytes = Counter("pdgrpc_store_written_bytes", "Bytes accepted, by path", ["path"], registry=r)
        self.arenas = Gauge("pdgrpc_store_shm_arenas", "Shared-memory arenas of same-host writers", registry=r)
        self.arena_bytes = Gauge("pdgrpc_store_shm_arena_bytes",
                                 "Bytes reserved by shm arenas (counted in the memory budget)", registry=r)
        self.arena_used = Gauge("pdgrpc_store_shm_arena_used_bytes", "Bytes of live entries inside shm arenas",
                                registry=r)
        self.capacity.set(capacity)
        for path in ("json", "binary", "shm"):  # pre-create label sets so dashboards see zeros
            self.writes.labels(path)
            self.read_bytes.labels(path)
            self.written_bytes.labels(path)
        for reason in ("full", "invalid", "exists"):
            self.rejected.labels(reason)

    def on_remove(self, entry: Entry, reason: str) -> None:
        if reason == "expired":
            self.expiries.inc()
        elif reason == "released":
            self.released.inc()

    def refresh(self, table: EntryTable) -> None:
        for cls, (size, keys) in table.totals_by_class().items():
            self.bytes.labels(cls).set(size)
            self.keys.labels(cls).set(keys)
        self.arenas.set(len(table.arenas))
        self.arena_bytes.set(table.arena_bytes)
        self.arena_used.set(table.arena_used_bytes)
