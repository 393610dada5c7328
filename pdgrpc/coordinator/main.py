"""`pdgrpc coordinator`: the cluster's entry point, configured by the cluster TOML file."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

from pdgrpc import config as cfgmod
from pdgrpc import event_loop, metrics, sdnotify
from pdgrpc.coordinator.pool import NodePool
from pdgrpc.coordinator.router import Router
from pdgrpc.coordinator.servicer import CoordinatorServicer, register
from pdgrpc.grpcutil import add_health_and_reflection, new_server, set_serving, wait_for_stop_signal
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.membership import Membership
from pdgrpc.openai_api.app import OpenAIFront
from pdgrpc.security import GrpcSecurity

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="cluster TOML file (see deploy/local.toml)")
    parser.add_argument("--port-base", type=int, default=None, help="fill unset ports from this base")
    parser.add_argument("--worker", type=int, default=0,
                        help="this process's index among [coordinator] processes (metrics on metrics_port + worker)")
    parser.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    parser.add_argument("--store-token", default=os.environ.get("PDGRPC_STORE_TOKEN", ""))
    parser.add_argument("--etcd", default=os.environ.get("PDGRPC_ETCD") or None,
                        help="etcd client URL for membership (default $PDGRPC_ETCD; overrides [membership] etcd)")
    parser.add_argument("--log-level", default="info")


def membership_for(cluster: cfgmod.ClusterConfig) -> Membership | None:
    """etcd when configured; None: the pool's static list from the cluster file."""
    m = cluster.membership
    if not m.etcd:
        return None
    from pdgrpc.membership.etcd import EtcdMembership

    log.info("membership: nodes registered in etcd %s under %s", m.etcd, m.prefix)
    return EtcdMembership(m.etcd, m.prefix)


async def serve(cluster: cfgmod.ClusterConfig, grace_s: float, store_token: str, worker: int = 0) -> int:
    c = cluster.coordinator
    metrics_port = c.worker_metrics_port(worker)
    security = GrpcSecurity.from_env()
    pool = NodePool(list(cluster.nodes), c.health_interval_s, security, membership_for(cluster),
                    cluster.store_address)
    store = KVStoreClient(cluster.store_address, token=store_token or None)
    router = Router(pool, store, c.max_inflight, c.kv_lease_s)
    server = new_server(security.interceptors(), share_port=c.processes > 1)
    name = register(server, CoordinatorServicer(router, cluster.store_address))
    health = add_health_and_reflection(server, [name])
    await set_serving(health, [name], False)
    if security.add_port(server, f"{c.host}:{c.port}") == 0:
        log.error("cannot bind %s:%d", c.host, c.port)
        return 1
    await server.start()
    front = OpenAIFront(router, security.token, c.http_timeout_s) if c.http_port else None
    if front is not None:
        try:
            await front.start(c.host, c.http_port, share_port=c.processes > 1, grace_s=grace_s)
        except OSError as exc:
            log.error("cannot bind %s:%d for HTTP: %s", c.host, c.http_port, exc)
            await server.stop(0)
            return 1
    metrics.serve_metrics(c.host, metrics_port)
    await pool.start()
    router.start()
    # Serving as soon as the coordinator itself works: requests get UNAVAILABLE until nodes are up.
    await set_serving(health, [name], True)
    who = f"coordinator-{worker}" if c.processes > 1 else "coordinator"
    http = f" openai http://{c.host}:{c.http_port}/v1" if front is not None else ""
    print(f"coordinator {who} listening on {c.host}:{c.port} metrics {c.host}:{metrics_port}{http}", flush=True)
    sdnotify.notify("READY=1")
    await wait_for_stop_signal()
    sdnotify.notify("STOPPING=1")
    await set_serving(health, [name], False)
    if front is not None:
        await asyncio.gather(server.stop(grace_s), front.stop())
    else:
        await server.stop(grace_s)
    await router.close()
    await pool.close()
    await store.close()
    return 0


def main(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    try:
        cluster = cfgmod.load(args.config, args.port_base)
        if args.etcd is not None:
            cluster = dataclasses.replace(cluster, membership=dataclasses.replace(
                cluster.membership, etcd=args.etcd)).validate()
        if not 0 <= args.worker < cluster.coordinator.processes:
            raise cfgmod.ConfigError(f"--worker {args.worker} outside 0-{cluster.coordinator.processes - 1} "
                                     f"([coordinator] processes = {cluster.coordinator.processes})")
    except cfgmod.ConfigError as exc:
        print(f"pdgrpc coordinator: {exc}", file=sys.stderr)
        return 2
    return event_loop.run_process(lambda: serve(cluster, args.grace_s, args.store_token, args.worker),
                                  "pdgrpc coordinator")
