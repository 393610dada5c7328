"""POSIX shared-memory segments as plain files under /dev/shm (the same-host zero-copy KV path).

A writer creates ``/dev/shm/pdgrpc-<name>``, fills it and hands the *name* to the store, which adopts
it (``POST /v1/kv/{key}/shm``) and unlinks it on release, lease expiry or shutdown. A reader on the
same host opens the file by name: the KV bytes never pass through the store process or a socket.

Why files and not ``multiprocessing.shared_memory``: its resource tracker unlinks every segment a
process created when that process exits, which would delete KV the store now owns.

Every function validates the name first (``SHM_NAME_RE``), so a name taken from the network can
never reach outside /dev/shm (no '/', no '..', fixed prefix).
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from pdgrpc.errors import DataLoss, InvalidArgument, NotFound

SHM_DIR = "/dev/shm"
SHM_PREFIX = "pdgrpc-"
SHM_NAME_RE = re.compile(r"^pdgrpc-[A-Za-z0-9_-]{1,64}$")

try:  # zlib-ng's CRC-32 is the same function as zlib's, ~4x faster here (carry-less multiply)
    from zlib_ng.zlib_ng import crc32 as _crc32
    from zlib_ng.zlib_ng import crc32_combine as _crc32_combine

    CHECKSUM_IMPL = "zlib-ng"
except ImportError:  # pragma: no cover - depends on what is installed
    from zlib import crc32 as _crc32

    _crc32_combine = None  # the stdlib's zlib module has none: no split checksums, one thread does all
    CHECKSUM_IMPL = "zlib"


def checksum(data, value: int = 0) -> int:
    """CRC-32 (zlib's polynomial, what descriptors carry) of a bytes-like object; zlib-ng when installed."""
    return _crc32(data, value)


# ---- two threads per big buffer ------------------------------------------------------------------
# One thread copies (or checksums) at ~60% of what the memory system gives two: on this kind of host
# a copy+CRC of 16 MB takes ~1.0 ms on one thread, ~0.6 ms shared by two. The pieces' CRCs are
# joined with crc32_combine (zlib-ng), so the result is the same CRC-32 of the whole buffer.
SPLIT_MIN_BYTES = 8 << 20  # below this the helper's wake-up (~50-100 us) eats what the split saves
_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            # One helper thread for the whole process: its jobs never wait on anything, so however
            # many callers split at once nothing can deadlock; when it is busy the caller takes every
            # piece itself (see SplitCrc) instead of queueing behind another caller's work.
            _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdgrpc-kv-split")
        return _helper


class SplitCrc:
    """CRC-32 of ``n`` bytes processed by ``work(start, end)`` (which returns the CRC of that byte
    range), shared by the calling thread and the helper thread when ``n`` is big enough and pieces
    can be joined.

    The bytes are cut into ``PIECES`` pieces (at ``align`` boundaries) that both threads take in turn
    until none is left, and the pieces' CRCs are joined in order. Whichever thread starts late (the
    helper waking, or busy with another caller's pieces) just takes fewer: with fixed halves the
    late one's half decided when both were done. The helper starts when this object is made,
    ``run()`` works on the calling thread. ``work`` must release the GIL for most of its time
    (ctypes.memmove and zlib-ng's crc32 do)."""

    PIECES = 32

    def __init__(self, n: int, work: Callable[[int, int], int], *, align: int = 1) -> None:
        self.n, self.work = n, work
        self.piece = n or 1
        self.helper: Future | None = None
        # Allowed cores, not the machine's: a node pinned to one core would only time-slice the pieces.
        if n >= SPLIT_MIN_BYTES and _crc32_combine is not None and len(os.sched_getaffinity(0)) >= 2:
            self.piece = max(align, -(-n // self.PIECES) // align * align)
        count = max(1, -(-n // self.piece))
        self._crcs: list[int | None] = [None] * count
        self._next = itertools.count()  # next() is atomic under the GIL: each piece goes to one thread
        self._stop = False
        if count > 1:
            self.helper = _helper_pool().submit(self._take_pieces)

    def _take_pieces(self) -> None:
        count = len(self._crcs)
        while not self._stop and (i := next(self._next)) < count:
            try:
                self._crcs[i] = self.work(i * self.piece, min(self.n, (i + 1) * self.piece))
            except BaseException:
                self._stop = True  # the other thread stops too: this CRC cannot be completed
                raise

    def run(self, first: Callable[[], object] | None = None) -> int:
        """The CRC of all ``n`` bytes. ``first()``, if given, runs here before this thread takes a
        piece, while the helper already works. Returns only once the helper is done
        with its pieces too, also when raising: the caller's buffers are free to go then."""
        try:
            if first is not None:
                first()
            self._take_pieces()
        except BaseException:
            self._stop = True
            raise
        finally:
            if self.helper is not None and not self.helper.cancel():  # not cancelled: it has started
                wait([self.helper])
        if self.helper is not None and not self.helper.cancelled():
            self.helper.result()  # its failure, if it failed
        crc = self._crcs[0]
        for i in range(1, len(self._crcs)):
            crc = _crc32_combine(crc, self._crcs[i], min(self.n, (i + 1) * self.piece) - i * self.piece)
        return crc


def checksum_split(data) -> SplitCrc:
    """``checksum(data)`` of a big buffer on two threads: ``checksum_split(data).run()`` (see SplitCrc)."""
    view = memoryview(data).cast("B")
    return SplitCrc(view.nbytes, lambda start, end: _crc32(view[start:end]))


# os.write/readinto may move less than asked; cap each call so huge buffers don't hit platform limits.
_IO_CHUNK = 1 << 30


def shm_available() -> bool:
    """Whether this host has a /dev/shm directory we could use."""
    return os.path.isdir(SHM_DIR)


def validate_name(name: object) -> str:
    """Return ``name`` if it is a valid segment name, else raise InvalidArgument."""
    if not isinstance(name, str) or not SHM_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid shm segment name {name!r}: must match {SHM_NAME_RE.pattern}")
    return name


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, validate_name(name))


def new_segment_name(scope: str = "") -> str:
    """A fresh, unguessable segment name; ``scope`` (the store's port) groups the segments of one
    store, so a restarted store can remove what its previous instance left behind."""
    return SHM_PREFIX + (f"{scope}-" if scope else "") + uuid.uuid4().hex


def remove_scope(scope: str) -> int:
    """Unlink every segment of ``scope`` (leftovers of a store that was killed); return how many."""
    removed = 0
    prefix = f"{SHM_PREFIX}{scope}-"
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        if name.startswith(prefix) and SHM_NAME_RE.fullmatch(name):
            unlink_segment(name)
            removed += 1
    return removed


def create_segment(name: str, data: bytes | bytearray | memoryview) -> int:
    """Create the segment exclusively (mode 0600) and write ``data`` into it; return its size.

    O_EXCL: never write into a segment somebody else created (or a symlink planted there).
    On any failure the partial segment is removed.
    """
    path = segment_path(name)
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        try:
            written = 0
            total = view.nbytes
            while written < total:
                written += os.write(fd, view[written:written + _IO_CHUNK])
        finally:
            os.close(fd)
    except BaseException:
        unlink_segment(name)
        raise
    return total


def segment_size(name: str) -> int:
    """Size in bytes of an existing regular-file segment; NotFound if missing, InvalidArgument if
    the name exists but is not a regular file (e.g. a symlink)."""
    path = segment_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NotFound(f"shm segment {name} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"shm segment {name} is not a regular file")
    return st.st_size


def read_segment(name: str, size: int | None = None) -> bytes:
    """Read a whole segment into new bytes of exactly ``size`` bytes (its file size if None).

    One read() straight into uninitialised memory: no zero-filled buffer first (that was a second pass
    over the bytes, and ~3x slower at 64 MB). Raises NotFound if the segment is missing, DataLoss if it
    does not hold ``size`` bytes (somebody truncated or replaced it after it was published).
    """
    path = segment_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise NotFound(f"shm segment {name} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"shm segment {name} is not a regular file") from None
        raise
    try:
        actual = os.fstat(fd).st_size
        if size is None:
            size = actual
        elif actual != size:
            raise DataLoss(f"shm segment {name} holds {actual} bytes, expected {size}")
        parts = []
        pos = 0
        while pos < size:
            part = os.pread(fd, min(size - pos, _IO_CHUNK), pos)
            if not part:
                raise DataLoss(f"shm segment {name} shrank while reading ({pos} of {size} bytes)")
            parts.append(part)
            pos += len(part)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)
    finally:
        os.close(fd)


def unlink_segment(name: str) -> bool:
    """Remove a segment; True if it existed. A missing segment is not an error."""
    try:
        os.unlink(segment_path(name))
        return True
    except FileNotFoundError:
        return False
