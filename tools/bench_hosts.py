"""Host-to-host KV hand-off between two network namespaces (tools/netns_hosts.py): one entry of 16 and
64 MiB put in host A's store (its shm arena, registered with Mooncake), read from host B into a
buffer with CRC check by the ``mooncake`` and the ``http`` transfer paths, against a raw TCP socket
(``sendall`` / ``recv_into``, no CRC) over the same link. Median of ``--rounds``. Needs root.

  python tools/bench_hosts.py [--sizes-mb 16,64] [--rounds 5] [--rate 1gbit]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import netns_hosts  # noqa: E402

_READ = textwrap.dedent("""
    import asyncio, json, statistics, sys, time
    from pdgrpc.kvstore.client import KVStoreClient
    from pdgrpc.transfer.base import TransferContext, create
    from pdgrpc.types import KVDescriptor, KVLayout
    async def main():
        store, fields, rounds = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        d = KVDescriptor(request_id="bench", store_address=store, location="dram",
                         layout=KVLayout("m", "f", 0, 1, 0, 1, 1, 1), lease_expiry_unix=0, **fields)
        ctx = TransferContext(KVStoreClient("127.0.0.1:9"), peer_stores=["*"])
        out = {}
        for name in sys.argv[4].split(","):
            path, dst, times = create(name, ctx), bytearray(d.size_bytes), []
            await path.read_into(d, dst)  # warm: handshake, connections, staging buffer
            for _ in range(rounds):
                t0 = time.perf_counter()
                await path.read_into(d, dst)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
        await ctx.close()
        print(json.dumps(out))
    asyncio.run(main())
""")

_TCP_SERVER = textwrap.dedent("""
    import socket, sys
    n, rounds = int(sys.argv[2]), int(sys.argv[3]) + 1
    data = bytes(n)
    srv = socket.create_server((sys.argv[1], 7000))
    print("ready", flush=True)
    for _ in range(rounds):
        conn, _ = srv.accept()
        conn.recv(1)
        conn.sendall(data)
        conn.close()
""")

_TCP_CLIENT = textwrap.dedent("""
    import socket, statistics, sys, time
    n, rounds = int(sys.argv[2]), int(sys.argv[3])
    buf = memoryview(bytearray(n))
    times = []
    for i in range(rounds + 1):
        s = socket.create_connection((sys.argv[1], 7000))
        t0 = time.perf_counter()
        s.sendall(b"x")
        got = 0
        while got < n:
            got += s.recv_into(buf[got:])
        if i:
            times.append(time.perf_counter() - t0)
        s.close()
    print(statistics.median(times))
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rate", default="", help="tc tbf rate on host A's link, e.g. 1gbit")
    args = parser.parse_args()
    ok, why = netns_hosts.netns_permitted()
    if not ok:
        print(f"bench_hosts: {why}", file=sys.stderr)
        return 1
    rows = []
    with netns_hosts.Hosts(2, rate=args.rate) as hosts:
        store = hosts.run(0, netns_hosts.pdgrpc("kvstore", "--host", hosts.ip(0), "--port", "9015", "--max-memory",
                                                "2GB", "--transfer-engine", "mooncake"))
        store.wait_for_line("listening on")
        address = f"{hosts.ip(0)}:9015"
        for mb in (int(x) for x in args.sizes_mb.split(",")):
            n = mb << 20
            d = hosts.put(0, address, n, f"bench-{mb}", "bench")
            paths = json.loads(hosts.python(1, _READ, address, json.dumps(d), str(args.rounds), "mooncake,http",
                                            timeout_s=600).strip().splitlines()[-1])
            server = hosts.run(0, [sys.executable, "-c", _TCP_SERVER, hosts.ip(0), str(n), str(args.rounds)])
            server.wait_for_line("ready")
            tcp = float(hosts.python(1, _TCP_CLIENT, hosts.ip(0), str(n), str(args.rounds)).strip())
            row = {"size_mib": mb, **{k: round(v * 1e3, 1) for k, v in paths.items()}, "tcp": round(tcp * 1e3, 1)}
            row.update({f"{k}_gb_s": round(n / v / 1e9, 2) for k, v in (*paths.items(), ("tcp", tcp))})
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"ms (median of {args.rounds}) and GB/s; mooncake and http include the CRC check, tcp does not")
    return 0


if __name__ == "__main__":
    sys.exit(main())
