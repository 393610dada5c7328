"""`pdgrpc up`: a whole local cluster as separate OS processes, stopped together.

Order: store, then prefill and decode nodes, then the coordinator. Each process prints
``<role> <name> listening on HOST:PORT metrics HOST:PORT`` once it is ready (the coordinator adds
``openai http://HOST:PORT/v1``, its OpenAI-compatible front). When every one is ready the launcher
prints where the coordinator is. Ctrl-C or SIGTERM stops the coordinator first
(no new requests), then the nodes (they drain), then the store. A child that dies before it is
ready takes the cluster down with a non-zero exit, so a broken cluster is never left half up.

Once the cluster is up, a node or coordinator that exits is restarted with the same command, as
systemd's ``Restart=on-failure`` does for the units: after 1 s, doubling up to 30 s while it keeps
dying (back to 1 s once it has run a minute), one log line per restart with its count. The other
processes keep serving meanwhile (the coordinator routes around a node that is down; requests that
were on it end with their documented status). The store exiting still takes the cluster down: the
KV of every request in flight is gone with it.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdgrpc import config as cfgmod
from pdgrpc.engine.base import EngineOptions
from pdgrpc.launcher_env import PARENT_ENV
from pdgrpc.security import GrpcSecurity


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="cluster TOML file (e.g. deploy/local.toml)")
    parser.add_argument("--mode", choices=cfgmod.MODES, default="disaggregated",
                        help="disaggregated (prefill + decode nodes) or colocated (one process does both)")
    parser.add_argument("--colocated", type=int, default=1, help="colocated nodes (with --mode colocated)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill nodes (without --config)")
    parser.add_argument("--decode", type=int, default=1, help="decode nodes (without --config)")
    parser.add_argument("--engine", default="mock", help="mock, torch or vllm (without --config)")
    parser.add_argument("--model", default="", help="model folder (engine default when empty)")
    parser.add_argument("--device", default="", help="cpu or cuda:N for every node (without --config)")
    parser.add_argument("--dtype", default="", help="float32 or bfloat16 for every node (without --config)")
    parser.add_argument("--port-base", type=int, default=None,
                        help=f"coordinator port; others follow it (default {cfgmod.DEFAULT_PORT_BASE})")
    parser.add_argument("--store-max-memory", default=None, help="store capacity, e.g. 2GB")
    parser.add_argument("--http-port", type=int, default=None,
                        help="the coordinator's OpenAI-compatible HTTP port (default: port base + 2; 0: off)")
    parser.add_argument("--coordinators", type=int, default=None,
                        help="coordinator processes sharing the coordinator port ([coordinator] processes)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin nodes to CPUs")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0, help="how long to wait for every process")
    parser.add_argument("--etcd", default=None,
                        help="etcd client URL: nodes register there and the coordinator watches it ([membership])")
    parser.add_argument("--node-arg", action="append", default=[],
                        help="extra argument passed to every prefill/decode node (repeatable)")


def cluster_from_args(args) -> cfgmod.ClusterConfig:
    if args.config:
        cluster = cfgmod.load(args.config, args.port_base)
    else:
        if args.prefill < 1 or args.decode < 1 or args.colocated < 1:
            raise cfgmod.ConfigError("--prefill, --decode and --colocated must be >= 1")
        defaults = {"engine": args.engine, "model": args.model, "device": args.device, "dtype": args.dtype}
        raw = {"mode": args.mode, "defaults": {k: v for k, v in defaults.items() if v}}
        if args.mode == "colocated":
            raw["colocated"] = [{} for _ in range(args.colocated)]
        else:
            raw["prefill"] = [{} for _ in range(args.prefill)]
            raw["decode"] = [{} for _ in range(args.decode)]
        cluster = cfgmod.from_dict(raw, args.port_base)
    if args.store_max_memory:
        cluster = dataclasses.replace(cluster, store=dataclasses.replace(cluster.store,
                                                                         max_memory=args.store_max_memory))
    if args.http_port is not None:
        cluster = dataclasses.replace(cluster, coordinator=dataclasses.replace(cluster.coordinator,
                                                                               http_port=args.http_port))
    if args.coordinators is not None:
        cluster = dataclasses.replace(cluster, coordinator=dataclasses.replace(cluster.coordinator,
                                                                               processes=args.coordinators))
    if args.etcd is not None:
        cluster = dataclasses.replace(cluster, membership=dataclasses.replace(cluster.membership, etcd=args.etcd))
    if not args.no_pin:
        cluster = auto_pin(cluster)
    return cluster.validate()


def auto_pin(cluster: cfgmod.ClusterConfig) -> cfgmod.ClusterConfig:
    """Split the cores evenly between nodes where there are enough (1 prefill + 1 decode on 2 cores:
    one core each; 1 colocated node: both); explicit `cpus` in the config always win."""
    cores = sorted(os.sched_getaffinity(0))
    nodes = cluster.nodes
    if any(n.cpus for n in nodes) or len(nodes) > len(cores):
        return cluster
    per = len(cores) // len(nodes)
    return dataclasses.replace(cluster, nodes=tuple(dataclasses.replace(n, cpus=tuple(cores[i * per:(i + 1) * per]))
                                                    for i, n in enumerate(nodes)))


def write_toml(cluster: cfgmod.ClusterConfig, path: str) -> None:
    """The resolved config, for the coordinator (ports and nodes exactly as launched)."""
    def val(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"mode = {val(cluster.mode)}", "", "[store]"]
    lines += [f"{k} = {val(v)}" for k, v in dataclasses.asdict(cluster.store).items()]
    lines += ["", "[coordinator]"] + [f"{k} = {val(v)}" for k, v in dataclasses.asdict(cluster.coordinator).items()]
    if cluster.membership.etcd:
        lines += ["", "[membership]"] + [f"{k} = {val(v)}" for k, v in dataclasses.asdict(cluster.membership).items()]
    for n in cluster.nodes:
        lines += ["", f"[[{n.role}]]", f"name = {val(n.name)}", f"host = {val(n.host)}", f"port = {n.port}",
                  f"metrics_port = {n.metrics_port}", f"engine = {val(n.engine.name)}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def own_cores_threads(n: cfgmod.NodeSection, cluster: cfgmod.ClusterConfig) -> int:
    """Threads for a decode node pinned to cores no other node may use: all of them.

    Left to itself a decode node takes half its allowed cores (see nodes.server.engine_options_for),
    which protects a prefill node on the same cores; on cores of its own that would only idle half
    of them (on a 16-core host, 4 of 8 decode threads made decode 3x slower than colocated)."""
    if n.role != "decode" or not n.cpus or n.engine.device.startswith("cuda"):
        return 0
    others = [m for m in cluster.nodes if m is not n]
    if any(not m.cpus or set(m.cpus) & set(n.cpus) for m in others):
        return 0
    return len(set(n.cpus))


def node_command(n: cfgmod.NodeSection, cluster: cfgmod.ClusterConfig, extra: list[str]) -> list[str]:
    e: EngineOptions = n.engine
    cmd = [sys.executable, "-m", "pdgrpc", n.role, "--name", n.name, "--host", n.host, "--port", str(n.port),
           "--metrics-port", str(n.metrics_port), "--store", cluster.store_address, "--engine", e.name,
           "--device", e.device, "--max-requests", str(n.max_requests), "--max-batch", str(n.max_batch),
           "--stream-interval", str(n.stream_interval),
           "--mock-prefill-cost-per-token-s", str(e.mock_prefill_cost_per_token_s),
           "--mock-decode-cost-per-step-s", str(e.mock_decode_cost_per_step_s),
           "--mock-layers-per-group", str(e.mock_layers_per_group)]
    if e.mock_profile:
        cmd += ["--mock-profile", e.mock_profile]
    if e.prefill_chunk_tokens:
        cmd += ["--prefill-chunk-tokens", str(e.prefill_chunk_tokens)]
    if e.linear_kernel:
        cmd += ["--linear-kernel", e.linear_kernel]
    if e.mkl_dispatch:
        cmd += ["--mkl-dispatch", e.mkl_dispatch]
    if e.model:
        cmd += ["--model", e.model]
    if e.dtype:
        cmd += ["--dtype", e.dtype]
    threads = e.threads or own_cores_threads(n, cluster)
    if threads:
        cmd += ["--threads", str(threads)]
    if n.cpus:
        cmd += ["--cpus", ",".join(map(str, n.cpus))]
    m = cluster.membership
    if m.etcd:
        cmd += ["--etcd", m.etcd, "--etcd-prefix", m.prefix, "--lease-ttl-s", str(m.lease_ttl_s)]
    return cmd + extra




def _grpc_ready(address: str) -> bool:
    with GrpcSecurity.from_env().channel(address) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _http_ready(address: str, path: str = "/health") -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


RESTART_FIRST_S = 1.0
RESTART_MAX_S = 30.0
RESTART_RESET_AFTER_S = 60.0   # a process that ran this long starts over at RESTART_FIRST_S


@dataclass
class _Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    restartable: bool = False
    restarts: int = 0
    started: float = 0.0
    delay_s: float = 0.0
    due: float | None = None     # when to restart it (it exited)


class Cluster:
    """The running processes, in start order."""

    def __init__(self) -> None:
        self.children: list[_Child] = []

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for c in self.children]

    def _popen(self, cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, env={**os.environ, PARENT_ENV: str(os.getpid())})

    def start(self, name: str, cmd: list[str], restartable: bool = False) -> subprocess.Popen:
        proc = self._popen(cmd)
        self.children.append(_Child(name, cmd, proc, restartable, started=time.monotonic()))
        return proc

    def wait_ready(self, name: str, proc: subprocess.Popen, check, address: str, timeout_s: float,
                   **check_args) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} before it was ready")
            if check(address, **check_args):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} not ready at {address} after {timeout_s:.0f}s")

    def dead(self) -> list[str]:
        """Processes that exited and will not be restarted."""
        return [f"{c.name} (exit {c.proc.returncode})" for c in self.children
                if c.proc.poll() is not None and not c.restartable]

    def supervise(self, now: float) -> None:
        """Restart the restartable processes that exited, with exponential backoff."""
        for c in self.children:
            if not c.restartable or c.proc.poll() is None:
                continue
            if c.due is None:
                ran = now - c.started
                c.delay_s = RESTART_FIRST_S if ran >= RESTART_RESET_AFTER_S or not c.delay_s else min(
                    c.delay_s * 2, RESTART_MAX_S)
                c.due = now + c.delay_s
                print(f"pdgrpc up: {c.name} exited with status {c.proc.returncode} after {ran:.1f}s; "
                      f"restart {c.restarts + 1} in {c.delay_s:.0f}s", file=sys.stderr, flush=True)
            elif now >= c.due:
                c.proc = self._popen(c.cmd)
                c.restarts += 1
                c.started, c.due = now, None
                print(f"pdgrpc up: {c.name} restarted (restart {c.restarts}, pid {c.proc.pid})",
                      file=sys.stderr, flush=True)

    def stop(self, grace_s: float = 40.0) -> None:
        # Coordinator first, store last: reverse start order.
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def main(args) -> int:
    try:
        cluster = cluster_from_args(args)
    except cfgmod.ConfigError as exc:
        print(f"pdgrpc up: {exc}", file=sys.stderr)
        return 2
    stop_requested = False

    def on_signal(signum, frame) -> None:
        nonlocal stop_requested
        stop_requested = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    procs = Cluster()
    tmpdir = tempfile.mkdtemp(prefix="pdgrpc-up-")
    config_path = os.path.join(tmpdir, "cluster.toml")
    write_toml(cluster, config_path)
    rc = 0
    try:
        s = cluster.store
        store = procs.start("store", [sys.executable, "-m", "pdgrpc", "kvstore", "--host", s.host, "--port",
                                      str(s.port), "--max-memory", s.max_memory])
        procs.wait_ready("store", store, _http_ready, cluster.store_address, args.ready_timeout_s)
        started = [(n, procs.start(n.name, node_command(n, cluster, args.node_arg), restartable=True))
                   for n in cluster.nodes]
        for n, proc in started:
            procs.wait_ready(n.name, proc, _grpc_ready, n.address, args.ready_timeout_s)
        c = cluster.coordinator
        names = [f"coordinator-{k}" if c.processes > 1 else "coordinator" for k in range(c.processes)]
        coords = [procs.start(name, [sys.executable, "-m", "pdgrpc", "coordinator", "--config", config_path,
                                     "--worker", str(k)], restartable=True) for k, name in enumerate(names)]
        # All workers answer health on the one shared port, so each is waited for on its own metrics port
        # (served once its gRPC port is bound), then the port itself.
        for k, (name, coord) in enumerate(zip(names, coords)):
            procs.wait_ready(name, coord, _http_ready, f"{c.host}:{c.worker_metrics_port(k)}",
                             args.ready_timeout_s, path="/metrics")
        procs.wait_ready("coordinator", coords[0], _grpc_ready, cluster.coordinator_address, args.ready_timeout_s)
        openai = ""
        if c.http_port:
            procs.wait_ready("coordinator http", coords[0], _http_ready, f"{c.host}:{c.http_port}",
                             args.ready_timeout_s)
            openai = f"; OpenAI API: http://{c.host}:{c.http_port}/v1"
        shape = (f"{len(cluster.nodes)} colocated" if cluster.mode == "colocated" else
                 f"{len(cluster.by_role('prefill'))} prefill + {len(cluster.by_role('decode'))} decode")
        print(f"cluster ready: {shape}; try: pdgrpc generate --coordinator {cluster.coordinator_address} "
              f'"Hello"{openai}', flush=True)
        while True:
            dead = procs.dead()
            if dead:
                print(f"pdgrpc up: {', '.join(dead)} stopped; taking the cluster down", file=sys.stderr)
                rc = 1
                break
            procs.supervise(time.monotonic())
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"pdgrpc up: {exc}", file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        procs.stop()
        try:
            os.unlink(config_path)
            os.rmdir(tmpdir)
        except OSError:
            pass
    restarted = [f"{c.name} {c.restarts}" for c in procs.children if c.restarts]
    if restarted:
        print(f"pdgrpc up: restarts: {', '.join(restarted)}", file=sys.stderr, flush=True)
    print("cluster stopped", flush=True)
    return rc
