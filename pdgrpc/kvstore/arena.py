"""Shared-memory arenas: pre-faulted /dev/shm files that same-host writers fill region by region.

Why: a brand-new /dev/shm segment per KV group pays for fresh pages on every hand-off (~0.5 ms per MB
in this VM: page allocation, zeroing and faults, in the writer and again in the reader), ten times
a memcpy. An arena's pages are allocated once (posix_fallocate) and mapped once per process
(MAP_POPULATE), so a hand-off is one copy into the arena and a zero-copy view for the reader.

Protocol, in call order (HTTP routes in ``pdgrpc.kvstore.server``):
  1. writer   POST /v1/shm/arenas {"size"}        the store creates ``pdgrpc-<port>-arena<hex>``,
                                                  reserves its size from the store's capacity
  2. writer   maps it read-write; allocates regions itself (``RegionAllocator``, no round trip)
  3. writer   copies the bytes into a region, CRC-32 computed chunk by chunk as it copies
  4. writer   POST /v1/kv/{key}/shm {"shm_name": arena, "offset", "size", ...}, sent while the copy
              runs (no crc32: the writer hands its CRC to readers in the descriptor, and nobody can
              ask for the key before the put returned): the store checks the region lies inside the
              arena and overlaps no live entry, records it, and answers with the regions freed since
              its last answer for this arena (so the writer reuses warm memory at once)
  5. reader   maps the arena read-only once (``ArenaReader``), verifies the CRC on a zero-copy view,
              copies what it needs out of it, then releases the key (or, with ``get_into``, copies
              and verifies in one pass); copies and checksums of 8 MB and up run on two threads
  6. store    release / lease expiry / owner release drops the region from the arena's live set
  7. writer   when no region fits: GET /v1/shm/arenas/{name} (live regions) and rebuild the free list;
              every answer carries the arena's ``version`` so a late answer cannot free a region
              the rebuilt list already handed out again
  8. writer   DELETE /v1/shm/arenas/{name} when it closes; an idle, empty arena whose writer is gone
              is deleted by the store's reaper; a restarted store removes every leftover file

A region is reused only after the store dropped it, and the store drops it only when its key is
released or its lease ran out: a reader must finish copying before it releases (decode does).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from pdgrpc.errors import DataLoss, InvalidArgument, NotFound
from pdgrpc.kvstore import shm

ALIGN = 4096  # regions start on page boundaries: copies stay aligned, no two regions share a page
ARENA_TAG = "arena"
MAX_ARENA_BYTES = 64 << 30
MIN_ARENA_BYTES = 1 << 20  # a smaller grant than this (unless asked for) is refused: not worth an arena
# Half of L2: the CRC reads the chunk the copy just wrote from cache. Re-measured (16/64 MB, 2-vCPU EPYC,
# 1 MiB L2): 256-512 KiB best; 1-2 MiB chunks are 10-40% slower (copy and CRC no longer fit in L2).
_COPY_CHUNK = 512 << 10


def align_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def new_arena_name(scope: str) -> str:
    return f"{shm.SHM_PREFIX}{scope}-{ARENA_TAG}{uuid.uuid4().hex}"


def is_arena_name(name: str) -> bool:
    return bool(shm.SHM_NAME_RE.fullmatch(name)) and f"-{ARENA_TAG}" in name


def create_arena_file(name: str, size: int) -> None:
    """Create the file exclusively (0600) with every page allocated now, not at first write."""
    path = shm.segment_path(name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        shm.unlink_segment(name)
        raise
    os.close(fd)


def map_arena(name: str, *, writable: bool) -> mmap.mmap:
    """Map a whole arena file, every page mapped up front (MAP_POPULATE): no fault per hand-off."""
    path = shm.segment_path(name)
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise NotFound(f"shm arena {name} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"shm arena {name} cannot be opened: {exc}") from None
    try:
        size = os.fstat(fd).st_size
        if size <= 0:
            raise DataLoss(f"shm arena {name} is empty")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=prot)
    finally:
        os.close(fd)


def copy_with_crc(dst: memoryview, src: memoryview) -> int:
    """Copy ``src`` into ``dst`` (same length) and return the CRC-32 of the bytes, in one pass over
    memory: each chunk is checksummed right after it was copied, while it is still in cache.
    Both steps run without the GIL (ctypes.memmove, zlib's crc32), so a thread doing this leaves
    the caller's event loop free; a big buffer is shared by two threads (shm.SplitCrc).

    The CRC is taken of ``dst``, the bytes as they now are where they were copied to: a reader
    that copies out this way verifies what it holds, not what the source held a moment before."""
    return start_copy_with_crc(dst, src).run()


def start_copy_with_crc(dst: memoryview, src: memoryview) -> shm.SplitCrc:
    """``copy_with_crc`` in two steps: the helper thread starts taking pieces now, ``.run()`` takes
    them on the calling thread too and returns the CRC."""
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"copy of {n} bytes into a buffer of {len(dst)}")
    if n == 0:
        return shm.SplitCrc(0, lambda start, end: 0)
    d = np.frombuffer(dst, dtype=np.uint8).ctypes.data
    s = np.frombuffer(src, dtype=np.uint8).ctypes.data

    # The raw addresses below do not keep the buffers alive; the default argument does, for as long as
    # either thread may still run this (a cancelled put's caller can drop its own references first).
    def copy_range(begin: int, end: int, _keep: tuple = (dst, src)) -> int:
        crc = 0
        for start in range(begin, end, _COPY_CHUNK):
            length = min(_COPY_CHUNK, end - start)
            ctypes.memmove(d + start, s + start, length)
            crc = shm.checksum(dst[start:start + length], crc)
        return crc

    return shm.SplitCrc(n, copy_range, align=ALIGN)


# ---- the store's side ----------------------------------------------------------------------------

@dataclass(eq=False)
class Arena:
    """What the store knows of one arena: its size and the regions live entries occupy."""

    name: str
    size: int
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    version: int = 0  # bumped by every answer that hands freed regions to the writer
    _starts: list[int] = field(default_factory=list)  # sorted region offsets
    _sizes: dict[int, int] = field(default_factory=dict)  # offset -> size
    _freed: list[tuple[int, int]] = field(default_factory=list)  # not yet told to the writer

    def check_region(self, offset: object, size: int) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"offset must be an integer >= 0, got {offset!r}")
        if offset % ALIGN:
            raise InvalidArgument(f"offset {offset} is not a multiple of {ALIGN}")
        if offset + size > self.size:
            raise InvalidArgument(f"region [{offset}, {offset + size}) lies outside arena {self.name} "
                                  f"of {self.size} bytes")
        i = bisect.bisect_right(self._starts, offset)
        if i > 0:
            prev = self._starts[i - 1]
            if prev + max(self._sizes[prev], 1) > offset:
                raise InvalidArgument(f"region at {offset} overlaps a live entry at {prev} in arena {self.name}")
        if i < len(self._starts) and offset + max(size, 1) > self._starts[i]:
            raise InvalidArgument(f"region at {offset} overlaps a live entry at {self._starts[i]} "
                                  f"in arena {self.name}")
        return offset

    def add(self, offset: int, size: int) -> None:
        bisect.insort(self._starts, offset)
        self._sizes[offset] = size
        self.last_used = time.monotonic()

    def remove(self, offset: int) -> None:
        size = self._sizes.pop(offset, None)
        if size is not None:
            del self._starts[bisect.bisect_left(self._starts, offset)]
            if len(self._freed) < 4096:  # past that the writer's next resync learns it anyway
                self._freed.append((offset, size))
        self.last_used = time.monotonic()

    def take_freed(self) -> tuple[int, list[tuple[int, int]]]:
        """(version, regions freed since the last call): what an answer to the writer carries."""
        freed, self._freed = self._freed, []
        self.version += 1
        return self.version, freed

    @property
    def live(self) -> list[tuple[int, int]]:
        return [(o, self._sizes[o]) for o in self._starts]

    @property
    def used_bytes(self) -> int:
        return sum(self._sizes.values())


# ---- the writer's side ---------------------------------------------------------------------------

class RegionAllocator:
    """First-fit allocation of page-aligned regions in one arena, kept by the writer; thread-safe
    (an engine's compute thread reserves regions to pack KV into while the event loop commits).

    The writer learns that a region was freed only by asking (``resync``): the store drops regions
    when other processes release keys. Regions handed out but not yet committed are ``pending``
    and survive a resync, unless older than ``STALE_PENDING_S``: a reservation nobody committed
    (its request was cancelled before the put)."""

    STALE_PENDING_S = 60.0

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, size)
        self._pending: dict[int, int] = {}
        self._since: dict[int, float] = {}  # pending offset -> when it was handed out
        self._committed: dict[int, int] = {}
        self._synced_version = 0
        self._lock = threading.Lock()

    def alloc(self, size: int) -> int | None:
        need = align_up(max(size, 1))
        with self._lock:
            for i, (off, free) in enumerate(self._free):
                if free >= need:
                    if free == need:
                        del self._free[i]
                    else:
                        self._free[i] = (off + need, free - need)
                    self._pending[off] = need
                    self._since[off] = time.monotonic()
                    return off
        return None

    def pending_size(self, offset: int) -> int | None:
        with self._lock:
            return self._pending.get(offset)

    def commit(self, offset: int) -> None:
        with self._lock:
            self._since.pop(offset, None)
            self._committed[offset] = self._pending.pop(offset)

    def abandon(self, offset: int) -> None:
        """A region that was never committed (the write failed): free it now."""
        with self._lock:
            self._since.pop(offset, None)
            size = self._pending.pop(offset, None)
            if size is not None:
                self._free = _merge(self._free + [(offset, size)])

    def freed(self, version: int, regions: list[tuple[int, int]]) -> None:
        """Regions the store dropped, from an answer stamped ``version``. An answer older than the
        last resync is ignored: its regions were free in that resync and may be in use again."""
        with self._lock:
            if version < self._synced_version:
                return
            back = [(o, self._committed.pop(o)) for o, _ in regions if o in self._committed]
            if back:
                self._free = _merge(self._free + back)

    def resync(self, live: list[tuple[int, int]], version: int = 0) -> None:
        """Rebuild the free list from the store's live regions plus our pending ones."""
        with self._lock:
            self._synced_version = max(self._synced_version, version)
            stale = time.monotonic() - self.STALE_PENDING_S
            for off in [o for o, t in self._since.items() if t < stale]:
                del self._pending[off], self._since[off]
            taken = sorted([(o, align_up(max(s, 1))) for o, s in live] + list(self._pending.items()))
            self._committed = {o: align_up(max(s, 1)) for o, s in live}
            free, pos = [], 0
            for off, size in taken:
                if off > pos:
                    free.append((pos, off - pos))
                pos = max(pos, off + size)
            if pos < self.size:
                free.append((pos, self.size - pos))
            self._free = free

    def committed(self, offset: int, answer: dict) -> None:
        """The store recorded the region at ``offset``; its ``answer`` lists regions freed since."""
        self.commit(offset)
        self.freed(int(answer.get("version", 0)), [(int(o), int(n)) for o, n in answer.get("freed", [])])

    def resync_from(self, info: dict) -> None:
        """Rebuild from the store's GET /v1/shm/arenas/{name} answer."""
        self.resync([(int(o), int(n)) for o, n in info["live"]], int(info.get("version", 0)))

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(s for _, s in self._free)


def _merge(regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, size in sorted(regions):
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + size)
        else:
            out.append((off, size))
    return out


# ---- the reader's side ---------------------------------------------------------------------------

class ArenaReader:
    """Read-only mappings of arenas, opened once and kept (at most ``max_maps``).

    Each view first checks that the name still is the file we mapped (one stat): a mapping of a
    deleted arena would pin its memory and serve stale bytes."""

    def __init__(self, max_maps: int = 32) -> None:
        self._maps: dict[str, tuple[mmap.mmap, int]] = {}  # name -> (mapping, inode)
        self.max_maps = max_maps

    def view(self, name: str, offset: int, size: int) -> memoryview:
        """A zero-copy, read-only view of ``size`` bytes at ``offset``; valid until the key is
        released (copy out before that)."""
        if not is_arena_name(name):
            raise InvalidArgument(f"{name!r} is not a pdgrpc shm arena")
        try:
            inode = os.stat(shm.segment_path(name), follow_symlinks=False).st_ino
        except FileNotFoundError:
            self.forget(name)
            raise NotFound(f"shm arena {name} does not exist") from None
        cached = self._maps.get(name)
        if cached is None or cached[1] != inode:
            self.forget(name)
            if len(self._maps) >= self.max_maps:
                self.forget(next(iter(self._maps)))
            cached = self._maps[name] = (map_arena(name, writable=False), inode)
        m = cached[0]
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset + size > len(m):
            raise DataLoss(f"region [{offset}, {offset + size}) lies outside arena {name} of {len(m)} bytes")
        return memoryview(m)[offset:offset + size]

    def forget(self, name: str) -> None:
        cached = self._maps.pop(name, None)
        if cached is not None:
            _close_quietly(cached[0])

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)


def _close_quietly(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view is still in use somewhere: the mapping goes when it does
        pass
