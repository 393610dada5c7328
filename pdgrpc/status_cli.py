"""`pdgrpc status --coordinator ADDR`: the membership as that coordinator sees it, one row per node.

Columns: name, role, host, gRPC address, KV store, health, requests running and queued on the node
(its own last report), requests the coordinator has on it, KV bytes it holds, and whether its engine
checked its kernels batch-invariant at load ("yes", "NO": its greedy output may differ from
colocated, the node's log says why; "-": not checked by that engine). From the coordinator's
GetClusterStatus RPC; ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from pdgrpc.client import Client
from pdgrpc.errors import PdgrpcError
from pdgrpc.types import ClusterStatus

COLUMNS = ("NAME", "ROLE", "HOST", "ADDRESS", "STORE", "HEALTH", "RUNNING", "QUEUED", "INFLIGHT", "KV", "INVARIANT")


def add_arguments(parser) -> None:
    parser.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--token", default=None, help="auth token (default $PDGRPC_AUTH_TOKEN)")
    parser.add_argument("--tls-ca", default=None, help="PEM root to verify a TLS coordinator (default $PDGRPC_TLS_CA)")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _invariant(info) -> str:
    if info is None or info.batch_invariant is None:
        return "-"
    return "yes" if info.batch_invariant else "NO"


def table(status: ClusterStatus) -> str:
    rows = [COLUMNS]
    for n in sorted(status.nodes, key=lambda n: (n.role.value, n.name)):
        info = n.info
        rows.append((n.name, n.role.value, n.host or "-", n.address, n.store_address or status.store_address,
                     n.health.value, str(info.running_requests) if info else "-",
                     str(info.queued_requests) if info else "-", str(n.inflight_requests),
                     human_bytes(info.kv_cache_bytes) if info else "-", _invariant(info)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"{len(status.nodes)} nodes; coordinator has {status.inflight_requests} requests in flight; "
                 f"store {status.store_address}")
    return "\n".join(lines)


def as_json(status: ClusterStatus) -> str:
    def enc(o):
        return o.value if hasattr(o, "value") else str(o)

    return json.dumps(dataclasses.asdict(status), default=enc, sort_keys=True)


def main(args) -> int:
    try:
        with Client(args.coordinator, token=args.token, tls_ca=args.tls_ca) as client:
            status = client.cluster_status(timeout_s=args.timeout_s)
    except PdgrpcError as err:
        print(f"pdgrpc status: {args.coordinator}: {err.code.value}: {err.message}", file=sys.stderr)
        return 1
    print(as_json(status) if args.json else table(status))
    return 0
