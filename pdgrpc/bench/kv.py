"""`pdgrpc bench kv`: KV hand-off time and bandwidth over each store path, beside a plain memcpy.

A hand-off is what prefill and decode do with one KV group: publish it (``put``: checksum, write,
commit in the store) and fetch it (``get``: read, verify the checksum), timed together. Paths:
  shm     same host: the writer copies the bytes into a region of its pre-faulted shm arena (CRC while
          copying) and records it in the store; the reader gets a zero-copy view and verifies the CRC
          (KVStoreClient, use_shm). Also timed: the reader's copy of the view into a buffer of its own
          (decode's KV cache), reported as "shm + copy out" — the two copies a real hand-off makes —
          and ``get_into`` of the same entry, which makes that copy and checks the CRC in one pass
  binary  raw bytes over HTTP (PUT/GET /v1/kv/{key}, CRC-32 header; KVStoreClient, use_shm off)
  json    gswarm's JSON API with base64 (POST /write_extended type "base64", GET /read_extended/{key})
  memcpy  one plain copy of the same bytes into an already allocated buffer (numpy.copyto), timed in
          the same run, the yardstick every path is divided by
Every size is timed ``--reps`` times (paths interleaved, so noise hits all alike) and the median kept.
Components (checksum, segment write, segment read) are timed too, to show where the time goes.

    pdgrpc bench kv --sizes-mb 1 4 16 64 256
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import aiohttp
import numpy as np

from pdgrpc import event_loop
from pdgrpc.bench import cluster as cl
from pdgrpc.kvstore import shm
from pdgrpc.kvstore.client import KVStoreClient

PATHS = ("shm", "binary", "json")
MB = 1 << 20


def add_arguments(p) -> None:
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 4, 16, 64, 256], help="payload sizes in MiB")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated: shm, binary, json")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions per size (0: more for small sizes)")
    p.add_argument("--json-max-mb", type=float, default=256, help="skip the JSON path above this size")
    p.add_argument("--store", default="", help="use this running store (HOST:PORT) instead of starting one")
    p.add_argument("--out", default="bench-results/kv", help="output folder for kv.json")
    p.add_argument("--no-progress", action="store_true")


def _reps(size: int, asked: int) -> int:
    return asked if asked > 0 else int(min(15, max(3, (256 * MB) // size)))


class JsonPath:
    """The gswarm JSON API, as gswarm's own client uses it: base64 in a JSON body."""

    def __init__(self, address: str) -> None:
        self.base = f"http://{address}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    async def put(self, key: str, data) -> None:
        body = json.dumps({"key": key, "location": "dram",
                           "serialized_value": {"type": "base64", "data": base64.b64encode(data).decode()}})
        async with self.session.post(self.base + "/write_extended", data=body,
                                     headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/write_extended answered {resp.status}: {(await resp.text())[:200]}")

    async def get(self, key: str) -> bytes:
        async with self.session.get(f"{self.base}/read_extended/{key}") as resp:
            if resp.status != 200:
                raise RuntimeError(f"/read_extended answered {resp.status}")
            body = json.loads(await resp.read())
        return base64.b64decode(body["serialized_value"]["data"])

    async def release(self, key: str) -> None:
        async with self.session.delete(f"{self.base}/release/{key}") as resp:
            await resp.read()

    async def close(self) -> None:
        await self.session.close()


async def _handoff(path: str, clients: dict, data: bytes, crc: int,
                   dst: np.ndarray) -> tuple[float, float, float, float]:
    """(publish, fetch, copy-out, fetch-into seconds) of one hand-off over ``path``; the entry is
    released after. Copy-out is the reader's copy of a zero-copy view into ``dst``; fetch-into is
    ``get_into(dst)`` of the same entry, copy and CRC check in one pass (both 0 for paths that
    return bytes)."""
    copy_s = into_s = 0.0
    key = f"bench-{path}-{uuid.uuid4().hex[:12]}"
    if path == "json":
        j: JsonPath = clients["json"]
        t0 = time.perf_counter()
        await j.put(key, data)
        t1 = time.perf_counter()
        got = await j.get(key)
        t2 = time.perf_counter()
        await j.release(key)
    else:
        c: KVStoreClient = clients[path]
        t0 = time.perf_counter()
        put = await c.put(key, data, owner="bench", lease_s=60)
        t1 = time.perf_counter()
        got = await c.get(key, shm_name=put.shm_name, size=put.size, crc32=put.crc32, shm_offset=put.shm_offset)
        t2 = time.perf_counter()
        if isinstance(got, memoryview):
            np.copyto(dst, np.frombuffer(got, dtype=np.uint8))
            copy_s = time.perf_counter() - t2
            # What a reader that keeps its own copy can do instead: copy and verify in one pass.
            t3 = time.perf_counter()
            await c.get_into(key, dst, shm_name=put.shm_name, size=put.size, crc32=put.crc32,
                             shm_offset=put.shm_offset)
            into_s = time.perf_counter() - t3
        await c.release(key)
        if path == "shm" and not put.shm_name:
            raise RuntimeError("the shm path did not use a shared-memory segment")
    if len(got) != len(data):
        raise RuntimeError(f"{path}: got {len(got)} bytes back, sent {len(data)}")
    del got
    return t1 - t0, t2 - t1, copy_s, into_s


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _components(data: bytes, reps: int) -> dict[str, float]:
    """Seconds (median) of the pieces a hand-off is made of, for the same bytes."""
    from pdgrpc.kvstore.shm import checksum

    name = shm.new_segment_name()
    out = {"checksum": _time(lambda: checksum(data), reps)}

    def write():
        shm.unlink_segment(name)
        shm.create_segment(name, data)

    try:
        out["shm_write"] = _time(write, reps)
        out["shm_read"] = _time(lambda: shm.read_segment(name, len(data)), reps)
    finally:
        shm.unlink_segment(name)
    out["alloc_copy"] = _time(lambda: bytearray(data), reps)  # a copy into a brand-new buffer
    return out


async def _run(args, address: str) -> dict:
    from pdgrpc.bench.driver import progress_bar

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    clients: dict = {}
    if "shm" in paths:
        clients["shm"] = KVStoreClient(address, use_shm=True, shm_min_bytes=0)
    if "binary" in paths:
        clients["binary"] = KVStoreClient(address, use_shm=False)
    if "json" in paths:
        clients["json"] = JsonPath(address)
    rng = np.random.default_rng(0)
    rows = []
    sizes = [int(s * MB) for s in args.sizes_mb]
    bar = progress_bar(sum(_reps(s, args.reps) for s in sizes), "kv hand-offs", not args.no_progress)
    try:
        for size in sizes:
            data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
            from pdgrpc.kvstore.shm import checksum

            crc = checksum(data)
            src = np.frombuffer(data, dtype=np.uint8)
            dst = np.empty_like(src)
            np.copyto(dst, src)  # fault the destination in: memcpy into an existing buffer
            reps = _reps(size, args.reps)
            times: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in paths}
            memcpy: list[float] = []
            for path in paths:  # one untimed round: connections, first-touch of the store's pages
                if path != "json" or size <= args.json_max_mb * MB:
                    await _handoff(path, clients, data, crc, dst)
            for rep in range(reps):
                order = paths if rep % 2 == 0 else paths[::-1]
                for path in order:
                    if path == "json" and (size > args.json_max_mb * MB or rep >= max(2, reps // 4)):
                        continue  # slow by design: a few repetitions say enough
                    times[path].append(await _handoff(path, clients, data, crc, dst))
                t = time.perf_counter()
                np.copyto(dst, src)
                memcpy.append(time.perf_counter() - t)
                bar.update(1)
            memcpy_s = statistics.median(memcpy)
            row = {"size_bytes": size, "size_mb": size / MB, "reps": reps, "memcpy_s": memcpy_s,
                   "memcpy_gb_s": size / memcpy_s / 1e9, "paths": {},
                   "components_s": _components(data, min(reps, 5))}
            for path, ts in times.items():
                if not ts:
                    continue
                total = statistics.median(a + b for a, b, _, _ in ts)
                row["paths"][path] = {
                    "handoff_s": total, "publish_s": statistics.median(a for a, _, _, _ in ts),
                    "fetch_s": statistics.median(b for _, b, _, _ in ts), "reps": len(ts),
                    "gb_s": size / total / 1e9, "ratio_to_memcpy": memcpy_s / total}
                if any(c for _, _, c, _ in ts):
                    with_copy = statistics.median(a + b + c for a, b, c, _ in ts)
                    into = statistics.median(a + i for a, _, _, i in ts)
                    row["paths"][path].update(copy_out_s=statistics.median(c for _, _, c, _ in ts),
                                              handoff_with_copy_out_s=with_copy,
                                              ratio_with_copy_out=memcpy_s / with_copy,
                                              fetch_into_s=statistics.median(i for _, _, _, i in ts),
                                              handoff_fetch_into_s=into, ratio_fetch_into=memcpy_s / into)
            rows.append(row)
            del data, src, dst
    finally:
        bar.close()
        for c in clients.values():
            await c.close()
    return {"rows": rows}


def _start_store() -> tuple[subprocess.Popen, str]:
    port = cl.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pdgrpc", "kvstore", "--port", str(port), "--max-memory", "4GB",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if not line.startswith("kvstore "):
        proc.kill()
        raise RuntimeError(f"store did not start: {line}{proc.stdout.read()[:2000]}")
    return proc, f"127.0.0.1:{port}"


def print_table(report: dict) -> None:
    print(f"\nKV hand-off (publish + fetch, median), {report['checksum']} checksums; ratio = memcpy time / path time")
    print(f"{'size':>8} | {'memcpy':>16} | " + " | ".join(f"{p:>27}" for p in PATHS) + " | binary vs json")
    for row in report["rows"]:
        cells = []
        for p in PATHS:
            r = row["paths"].get(p)
            cells.append("-".rjust(27) if r is None else
                         f"{r['handoff_s'] * 1000:8.2f} ms {r['gb_s']:5.2f} GB/s {r['ratio_to_memcpy']:5.2f}x")
        b, j = row["paths"].get("binary"), row["paths"].get("json")
        speedup = f"{j['handoff_s'] / b['handoff_s']:.1f}x faster" if b and j else "-"
        print(f"{row['size_mb']:>5g} MB | {row['memcpy_s'] * 1000:7.2f} ms {row['memcpy_gb_s']:5.1f} GB/s | "
              + " | ".join(cells) + f" | {speedup}")
    shm_rows = [r for r in report["rows"] if "ratio_with_copy_out" in r["paths"].get("shm", {})]
    if shm_rows:
        print("\nshm, publish + fetch (zero-copy view, CRC verified) + the reader's copy into its own buffer:")
        for row in shm_rows:
            r = row["paths"]["shm"]
            print(f"{row['size_mb']:>5g} MB | publish {r['publish_s'] * 1000:.2f} ms, "
                  f"fetch {r['fetch_s'] * 1000:.2f} ms, "
                  f"copy out {r['copy_out_s'] * 1000:.2f} ms | {r['handoff_with_copy_out_s'] * 1000:.2f} ms "
                  f"{r['ratio_with_copy_out']:.2f}x memcpy")
        print("shm, publish + get_into (the reader's copy and the CRC check in one pass):")
        for row in shm_rows:
            r = row["paths"]["shm"]
            print(f"{row['size_mb']:>5g} MB | publish {r['publish_s'] * 1000:.2f} ms, "
                  f"get_into {r['fetch_into_s'] * 1000:.2f} ms | {r['handoff_fetch_into_s'] * 1000:.2f} ms "
                  f"{r['ratio_fetch_into']:.2f}x memcpy")
    print("\ncomponents (median ms): checksum, shm segment write, shm segment read, copy into a new buffer")
    for row in report["rows"]:
        c = row["components_s"]
        print(f"{row['size_mb']:>5g} MB | " + ", ".join(f"{k} {v * 1000:.2f}" for k, v in c.items()))


def main(args) -> int:
    from pdgrpc.kvstore.shm import CHECKSUM_IMPL

    proc = None
    try:
        if args.store:
            address = args.store
        else:
            proc, address = _start_store()
        result = event_loop.run(_run(args, address))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    report = {"command": "pdgrpc bench kv " + " ".join(sys.argv[sys.argv.index("kv") + 1:]) if "kv" in sys.argv
              else "", "machine": cl.machine_info(), "checksum": CHECKSUM_IMPL, **result}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kv.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    print(f"wrote {path}")
    return 0
