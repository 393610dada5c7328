"""Runs one prefill or decode node: gRPC server, health, metrics, engine, graceful stop.

Start-up order matters to operators: the port is bound and health answers NOT_SERVING first, the
model loads and warms up, then health turns SERVING, systemd gets READY=1 and the node prints
``<role> <name> listening on HOST:PORT metrics HOST:PORT``. On SIGTERM it turns NOT_SERVING,
refuses new calls, and lets running requests finish within ``grace_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field

from pdgrpc import event_loop, metrics, sdnotify
from pdgrpc.config import MembershipSection
from pdgrpc.engine.base import EngineOptions
from pdgrpc.engine.registry import build_engine, check_options
from pdgrpc.engine.torch_options import LINEAR_KERNELS, MKL_DISPATCHES
from pdgrpc.errors import Unavailable
from pdgrpc.grpcutil import add_health_and_reflection, new_server, set_serving, wait_for_stop_signal
from pdgrpc.kvstore.client import KVStoreClient
from pdgrpc.membership import NodeRecord
from pdgrpc.nodes.colocated_service import ColocatedService
from pdgrpc.nodes.decode_service import DecodeLimits, DecodeService
from pdgrpc.nodes.engine_thread import EngineThread
from pdgrpc.nodes.prefill_service import PrefillLimits, PrefillService
from pdgrpc.nodes.servicers import ColocatedServicer, DecodeServicer, PrefillServicer, register
from pdgrpc.security import GrpcSecurity
from pdgrpc.types import NodeInfo, Role

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    role: Role
    name: str
    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: int = 0            # 0: no metrics endpoint
    store: str = "127.0.0.1:9015"
    store_token: str = ""
    engine: EngineOptions = field(default_factory=EngineOptions)
    cpus: tuple[int, ...] = ()
    max_requests: int = 64
    max_batch: int = 32
    stream_interval: int = 1
    batch_token_budget: int = 4096
    kv_lease_s: float = 60.0
    grace_s: float = 30.0
    etcd: str = ""                   # register in etcd (pdgrpc.membership.etcd); "": static cluster file
    etcd_prefix: str = "/pdgrpc/"
    lease_ttl_s: int = 5
    advertise: str = ""              # host:port coordinators dial; "": host:port (hostname if 0.0.0.0)

    def validate(self) -> "NodeConfig":
        if not 0 < self.port < 65536 or not 0 <= self.metrics_port < 65536:
            raise ValueError("ports must be in 1-65535")
        if self.max_requests <= 0 or self.max_batch <= 0 or self.batch_token_budget <= 0:
            raise ValueError("max_requests, max_batch and batch_token_budget must be > 0")
        if self.stream_interval <= 0:
            raise ValueError("stream_interval must be >= 1 (tokens per message)")
        if self.kv_lease_s <= 0 or self.grace_s < 0:
            raise ValueError("kv_lease_s must be > 0 and grace_s >= 0")
        check_options(self.engine, "", ValueError)
        MembershipSection(self.etcd, self.etcd_prefix, self.lease_ttl_s).validate()
        return self

    def record(self, fingerprint: str) -> NodeRecord:
        """What this node registers in etcd."""
        host = socket.gethostname()
        address = self.advertise or f"{host if self.host in ('0.0.0.0', '::', '') else self.host}:{self.port}"
        return NodeRecord(self.name, self.role.value, address, host, self.store, fingerprint, self.max_requests)


def engine_options_for(cfg: NodeConfig) -> EngineOptions:
    """The node's engine options with its ``max_batch`` (kernels are checked up to it) and the
    thread count when the operator left it at 0 (auto).

    Decode is memory-bound: one thread decodes about as fast as two (measured, see README), and a
    decode process with a full OpenMP team stalls a prefill process that shares its cores every
    time it wakes to load KV. So decode takes half the allowed CPUs, prefill and colocated all.
    """
    opts = dataclasses.replace(cfg.engine, max_batch=cfg.max_batch)
    if opts.threads or cfg.role is not Role.DECODE:
        return opts
    allowed = len(os.sched_getaffinity(0))
    return dataclasses.replace(opts, threads=max(1, allowed // 2))


def kv_cache_bytes(node: str) -> int:
    """KV the node holds now, as its pdgrpc_node_kv_cache_bytes gauges say (both roles if colocated)."""
    return int(sum(s.value for m in metrics.NODE_KV_CACHE.collect() for s in m.samples
                   if s.labels.get("node") == node))


def pin_cpus(cpus: tuple[int, ...]) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))


async def serve_node(cfg: NodeConfig) -> int:
    pin_cpus(cfg.cpus)
    role = cfg.role.value
    security = GrpcSecurity.from_env()
    server = new_server(security.interceptors())
    service = None

    def info() -> NodeInfo:
        if service is None:
            raise Unavailable(f"{role} node {cfg.name} is loading its model")
        running = service.requests if isinstance(service, DecodeService) else service.running
        queued = 0 if isinstance(service, DecodeService) else service.queued
        return NodeInfo(cfg.name, cfg.role, engine.spec, running, queued, cfg.max_requests,
                        getattr(engine, "batch_invariant", None), getattr(engine, "engine_detail", ""),
                        kv_cache_bytes(cfg.name))

    servicer = {Role.PREFILL: PrefillServicer, Role.DECODE: DecodeServicer,
                Role.COLOCATED: ColocatedServicer}[cfg.role](info)
    service_name = register(server, servicer)
    health = add_health_and_reflection(server, [service_name])
    await set_serving(health, [service_name], False)
    bound = security.add_port(server, f"{cfg.host}:{cfg.port}")
    if bound == 0:
        log.error("cannot bind %s:%d", cfg.host, cfg.port)
        return 1
    await server.start()
    if cfg.metrics_port:
        metrics.serve_metrics(cfg.host, cfg.metrics_port)
        metrics.init_node(role, cfg.name)  # metrics: gauges and failure counters exist from the start

    t0 = time.monotonic()
    if cfg.engine.name == "vllm":  # vLLM runs its own engine processes behind its own services
        from pdgrpc.nodes.vllm_services import build_vllm_service

        store = KVStoreClient(cfg.store, token=cfg.store_token or None)
        engine, service, thread = await build_vllm_service(cfg, store)
    else:
        engine = await asyncio.to_thread(build_engine, engine_options_for(cfg))
        thread = EngineThread(f"{role}-engine")
        await thread.call(engine.warm_up)  # the torch engine also checks its decode steps' batch invariance
        if engine.batch_invariant is not None and cfg.metrics_port:
            for r in ("prefill", "decode") if cfg.role is Role.COLOCATED else (role,):
                metrics.ENGINE_BATCH_INVARIANT.labels(r, cfg.name).set(1 if engine.batch_invariant else 0)
        store = KVStoreClient(cfg.store, token=cfg.store_token or None)
        prefill = PrefillService(cfg.name, engine, thread, store,
                                 PrefillLimits(cfg.max_requests, cfg.batch_token_budget, cfg.kv_lease_s))
        decode = DecodeService(cfg.name, engine, thread, store, DecodeLimits(cfg.max_requests, cfg.max_batch,
                                                                                  cfg.stream_interval))
        service = {Role.PREFILL: prefill, Role.DECODE: decode,
                   Role.COLOCATED: ColocatedService(prefill, decode)}[cfg.role]
        if cfg.role is Role.PREFILL:
            await store.open_arena()  # not in the first request's time to first token
            if hasattr(engine, "kv_buffer"):
                engine.kv_buffer = store.reserve  # KV packed straight into the store's shm arena: one copy
    service.start()
    servicer.service = service
    await set_serving(health, [service_name], True)
    log.info("%s %s ready in %.1fs (model %s)", role, cfg.name, time.monotonic() - t0, engine.spec.name)
    metrics_text = f"{cfg.host}:{cfg.metrics_port}" if cfg.metrics_port else "-"
    print(f"{role} {cfg.name} listening on {cfg.host}:{cfg.port} metrics {metrics_text}", flush=True)
    registration = None
    if cfg.etcd:  # after SERVING: coordinators route to it as soon as they see it
        from pdgrpc.membership.etcd import Registration

        registration = Registration(cfg.etcd, cfg.etcd_prefix, cfg.lease_ttl_s, cfg.record(engine.spec.fingerprint))
        await registration.start()
    sdnotify.notify("READY=1")

    await wait_for_stop_signal()
    log.info("%s %s draining (grace %.0fs)", role, cfg.name, cfg.grace_s)
    sdnotify.notify("STOPPING=1")
    if registration is not None:
        await registration.close()  # out of the membership first: no new requests while it drains
    await set_serving(health, [service_name], False)
    await server.stop(cfg.grace_s)
    await service.stop()
    await store.close()
    thread.shutdown()
    return 0


def add_node_arguments(parser, role: Role) -> None:
    default_port = {Role.PREFILL: 50061, Role.DECODE: 50071, Role.COLOCATED: 50081}[role]
    parser.add_argument("--name", default=f"{role.value}-0", help="node name, as in the cluster config")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--store", default="127.0.0.1:9015", help="KV store HOST:PORT")
    parser.add_argument("--store-token", default=os.environ.get("PDGRPC_STORE_TOKEN", ""),
                        help="shared token of the store (default $PDGRPC_STORE_TOKEN)")
    parser.add_argument("--engine", default="mock", help="mock, torch or vllm")
    parser.add_argument("--model", default="", help="model folder (engine default when empty)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--dtype", default="", help="KV/model dtype (engine default when empty)")
    parser.add_argument("--threads", type=int, default=0, help="engine threads (0: one per allowed CPU)")
    parser.add_argument("--cpus", default="", help="CPU affinity, e.g. 0,1 or 2-5")
    parser.add_argument("--max-requests", type=int, default=64, help="admitted requests (running + queued)")
    parser.add_argument("--max-batch", type=int, default=32, help="decode: sequences per step")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="decode: tokens per message at most (1: every token as it is generated; N: N times "
                             "fewer messages, in bursts of N, for clusters limited by per-message cost)")
    parser.add_argument("--batch-token-budget", type=int, default=4096, help="prefill: prompt tokens per batch")
    parser.add_argument("--kv-lease-s", type=float, default=60.0, help="lease of published KV entries")
    parser.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    parser.add_argument("--mock-prefill-cost-per-token-s", type=float, default=0.0)
    parser.add_argument("--mock-decode-cost-per-step-s", type=float, default=0.0)
    parser.add_argument("--mock-layers-per-group", type=int, default=6)
    parser.add_argument("--mock-profile", default="",
                        help="mock engine: sleep what this cost model says (a shipped profile's name, e.g. "
                             "smollm2-135m-cpu-epyc2 or llama3-8b-a100-vidur, or a JSON file) and take its "
                             "model's KV geometry; replaces the two mock costs")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=0,
                        help="torch engine: prefill prompts longer than this in chunks of it, letting prompts "
                             "that arrive meanwhile in between (0: one forward per prompt)")
    parser.add_argument("--linear-kernel", default="", choices=("", *LINEAR_KERNELS),
                        help="torch engine: force one linear kernel, onednn (prepacked weights, CPU) or torch "
                             "(F.linear); default: chosen per weight shape at load, batch-invariant and fastest")
    parser.add_argument("--mkl-dispatch", default="", choices=("", *MKL_DISPATCHES),
                        help="torch engine on x86: features (MKL picks kernels by CPU features, e.g. AVX-512 "
                             "on AMD; the default) or vendor (MKL's own choice)")
    parser.add_argument("--etcd", default=os.environ.get("PDGRPC_ETCD", ""),
                        help="register in etcd at this client URL, e.g. http://HOST:2379 (default $PDGRPC_ETCD; "
                             "empty: no registration, the coordinator's cluster file lists this node)")
    parser.add_argument("--etcd-prefix", default="/pdgrpc/", help="etcd key prefix ([membership] prefix)")
    parser.add_argument("--lease-ttl-s", type=int, default=5,
                        help="etcd lease: a node that dies leaves the membership after this many seconds (>= 2)")
    parser.add_argument("--advertise", default="",
                        help="HOST:PORT coordinators dial (default --host:--port; the hostname if --host is 0.0.0.0)")
    parser.add_argument("--log-level", default="info")


def parse_cpus(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(out)


def run_node(args, role: Role) -> int:
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {role.value}[{args.name}] %(levelname)s %(name)s: %(message)s")
    try:
        cfg = NodeConfig(
            role=role, name=args.name, host=args.host, port=args.port, metrics_port=args.metrics_port,
            store=args.store, store_token=args.store_token,
            engine=EngineOptions(
                name=args.engine, model=args.model, device=args.device, dtype=args.dtype, threads=args.threads,
                mock_prefill_cost_per_token_s=args.mock_prefill_cost_per_token_s,
                mock_decode_cost_per_step_s=args.mock_decode_cost_per_step_s,
                mock_layers_per_group=args.mock_layers_per_group, mock_profile=args.mock_profile,
                prefill_chunk_tokens=args.prefill_chunk_tokens, linear_kernel=args.linear_kernel,
                mkl_dispatch=args.mkl_dispatch),
            cpus=parse_cpus(args.cpus), max_requests=args.max_requests, max_batch=args.max_batch,
            stream_interval=args.stream_interval,
            batch_token_budget=args.batch_token_budget, kv_lease_s=args.kv_lease_s, grace_s=args.grace_s,
            etcd=args.etcd, etcd_prefix=args.etcd_prefix, lease_ttl_s=args.lease_ttl_s, advertise=args.advertise,
        ).validate()
    except ValueError as exc:
        print(f"pdgrpc {role.value}: {exc}", file=sys.stderr)
        return 2
    return event_loop.run_process(lambda: serve_node(cfg), f"pdgrpc {role.value}")
