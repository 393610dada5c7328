"""Cluster configuration: small typed dataclasses, loaded from TOML and validated at start.

deploy/local.toml shows every key. Ports left at 0 are filled from ``port_base``:
coordinator = base, store = base + 1, the coordinator's OpenAI HTTP front = base + 2 (``http_port``;
0 turns it off), prefill i = base + 10 + i, decode j = base + 40 + j, colocated k = base + 70 + k,
and each gRPC process's metrics port is its gRPC port + 1000.
With ``[coordinator] processes = N`` the N coordinator processes share the one gRPC port
(SO_REUSEPORT, the kernel spreads connections) and worker k serves metrics on metrics_port + k.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field

from pdgrpc.engine.base import EngineOptions
from pdgrpc.engine.registry import ENGINES, check_options

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
DEFAULT_PORT_BASE = 50051
MODES = ("disaggregated", "colocated")
ROLES = ("prefill", "decode", "colocated")
METRICS_OFFSET = 1000
HTTP_OFFSET = 2   # the coordinator's OpenAI-compatible HTTP port, from the base
# Coordinator workers' metrics ports are metrics_port + k; at most 10 keeps them below the prefill
# nodes' metrics ports (base + 1010 onwards) with the default layout.
MAX_COORDINATOR_PROCESSES = 10


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which and why."""


def parse_size(text: str | int) -> int:
    """'2GB', '512MiB', '1G' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 2GB, 512MB or bytes")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    return int(number * base**power)


def check_port(value: int, what: str) -> None:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{what}: port {value} outside 0-65535")


@dataclass(frozen=True)
class StoreSection:
    host: str = "127.0.0.1"
    port: int = 0
    max_memory: str = "2GB"
    token: str = ""


@dataclass(frozen=True)
class CoordinatorSection:
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    max_inflight: int = 256
    health_interval_s: float = 1.0
    kv_lease_s: float = 60.0   # lease the coordinator renews on live requests' KV
    # Processes serving the one port (like vLLM's --api-server-count): each one is a full coordinator
    # with its own node pool and admission limit; a coordinator is CPU-bound in grpc's per-call work,
    # so more of them is how it scales on a host with cores to spare.
    processes: int = 1
    # The OpenAI-compatible HTTP front (pdgrpc.openai_api); unset: base + 2; 0: off.
    http_port: int | None = None
    http_timeout_s: float = 600.0   # longest an HTTP request may run (a header can ask for less)

    def worker_metrics_port(self, worker: int) -> int:
        return self.metrics_port + worker


@dataclass(frozen=True)
class MembershipSection:
    """Where nodes register and coordinators look for them (pdgrpc.membership). ``etcd`` empty: the
    static node lists of this file. Set: nodes register under ``prefix`` with a lease of
    ``lease_ttl_s`` (a node that dies leaves after it), coordinators watch the prefix."""

    etcd: str = ""              # e.g. http://10.0.0.5:2379 (etcd's client URL; its JSON gateway); several: a,b,c
    prefix: str = "/pdgrpc/"
    lease_ttl_s: int = 5        # etcd's minimum is 2

    def validate(self) -> "MembershipSection":
        if self.etcd and not all(re.match(r"^https?://[^/\s,]+/?$", u.strip()) for u in self.etcd.split(",")):
            raise ConfigError(f"[membership] etcd must be a URL like http://HOST:2379 (or several, comma-separated), "
                              f"not {self.etcd!r}")
        if not self.prefix.startswith("/") or not self.prefix.endswith("/"):
            raise ConfigError(f"[membership] prefix must start and end with '/', not {self.prefix!r}")
        if isinstance(self.lease_ttl_s, bool) or not isinstance(self.lease_ttl_s, int) or self.lease_ttl_s < 2:
            raise ConfigError(f"[membership] lease_ttl_s must be a whole number of seconds >= 2 (etcd's "
                              f"minimum), not {self.lease_ttl_s!r}")
        return self


@dataclass(frozen=True)
class NodeSection:
    name: str
    role: str
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    cpus: tuple[int, ...] = ()
    engine: EngineOptions = field(default_factory=EngineOptions)
    max_requests: int = 64
    max_batch: int = 32
    stream_interval: int = 1   # decode: tokens per message at most (see DecodeLimits)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ClusterConfig:
    store: StoreSection
    coordinator: CoordinatorSection
    nodes: tuple[NodeSection, ...]
    mode: str = "disaggregated"
    membership: MembershipSection = field(default_factory=MembershipSection)

    @property
    def store_address(self) -> str:
        return f"{self.store.host}:{self.store.port}"

    @property
    def coordinator_address(self) -> str:
        return f"{self.coordinator.host}:{self.coordinator.port}"

    def by_role(self, role: str) -> list[NodeSection]:
        return [n for n in self.nodes if n.role == role]

    def validate(self) -> "ClusterConfig":
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, not {self.mode!r}")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ConfigError(f"node names must be unique: {names}")
        self.membership.validate()
        # With etcd the nodes register themselves: the file lists none, or only those `pdgrpc up` starts.
        static = not self.membership.etcd
        if static and self.mode == "disaggregated" and (not self.by_role("prefill") or not self.by_role("decode")
                                             or self.by_role("colocated")):
            raise ConfigError("a disaggregated cluster needs at least one prefill and one decode node "
                              "and no colocated node")
        if static and self.mode == "colocated" and (not self.by_role("colocated") or len(self.nodes) != len(
                self.by_role("colocated"))):
            raise ConfigError("a colocated cluster needs [[colocated]] nodes only")
        if not self.coordinator.http_timeout_s > 0:
            raise ConfigError(f"[coordinator] http_timeout_s must be > 0, not {self.coordinator.http_timeout_s}")
        if not 1 <= self.coordinator.processes <= MAX_COORDINATOR_PROCESSES:
            raise ConfigError(f"[coordinator] processes must be 1-{MAX_COORDINATOR_PROCESSES}, "
                              f"not {self.coordinator.processes}")
        ports: dict[tuple[str, int], str] = {}
        cpus = os.cpu_count() or 1
        for what, host, port in self._endpoints():
            check_port(port, what)
            if port and (host, port) in ports:
                raise ConfigError(f"{what} and {ports[(host, port)]} both use {host}:{port}")
            ports[(host, port)] = what
        for n in self.nodes:
            if not _NAME_RE.match(n.name):
                raise ConfigError(f"node name {n.name!r}: use 1-64 letters, digits, '-', '_', '.'")
            if n.role not in ROLES:
                raise ConfigError(f"node {n.name}: role must be one of {ROLES}, not {n.role!r}")
            if n.engine.name not in ENGINES:
                raise ConfigError(f"node {n.name}: engine must be one of {ENGINES}, not {n.engine.name!r}")
            if any(not 0 <= c < cpus for c in n.cpus):
                raise ConfigError(f"node {n.name}: cpus {list(n.cpus)} outside 0-{cpus - 1}")
            if n.max_requests <= 0 or n.max_batch <= 0:
                raise ConfigError(f"node {n.name}: max_requests and max_batch must be > 0")
            if n.stream_interval <= 0:
                raise ConfigError(f"node {n.name}: stream_interval must be >= 1 (tokens per message)")
            check_options(n.engine, f"node {n.name}: ", ConfigError)
        parse_size(self.store.max_memory)
        return self

    def _endpoints(self):
        yield "store", self.store.host, self.store.port
        yield "coordinator", self.coordinator.host, self.coordinator.port
        c = self.coordinator
        if c.http_port:
            yield "coordinator http", c.host, c.http_port
        for k in range(max(c.processes, 1)):
            yield f"coordinator {k} metrics" if k else "coordinator metrics", c.host, c.worker_metrics_port(k)
        for n in self.nodes:
            yield n.name, n.host, n.port
            yield f"{n.name} metrics", n.host, n.metrics_port


def _engine_options(raw: dict, defaults: EngineOptions) -> EngineOptions:
    known = {f.name for f in dataclasses.fields(EngineOptions)}
    values = {k[len("engine_"):] if k.startswith("engine_") else k: v for k, v in raw.items()}
    opts = {k: v for k, v in values.items() if k in known}
    if "engine" in raw:
        opts["name"] = raw["engine"]
    return dataclasses.replace(defaults, **opts)


_NODE_KEYS = {"name", "host", "port", "metrics_port", "cpus", "engine", "model", "device", "dtype", "threads",
              "max_requests", "max_batch", "stream_interval", "mock_prefill_cost_per_token_s",
              "mock_decode_cost_per_step_s", "mock_layers_per_group", "mock_profile", "prefill_chunk_tokens",
              "linear_kernel", "mkl_dispatch"}


def _section(cls, raw: dict, where: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"[{where}]: unknown keys {sorted(unknown)}")
    return cls(**raw)


def from_dict(raw: dict, port_base: int | None = None) -> ClusterConfig:
    unknown = set(raw) - {"store", "coordinator", "defaults", "prefill", "decode", "colocated", "mode", "port_base",
                        "membership"}
    if unknown:
        raise ConfigError(f"unknown top-level keys {sorted(unknown)}")
    base = port_base if port_base is not None else int(raw.get("port_base", DEFAULT_PORT_BASE))
    store = _section(StoreSection, raw.get("store", {}), "store")
    store = dataclasses.replace(store, port=store.port or base + 1)
    coord = _section(CoordinatorSection, raw.get("coordinator", {}), "coordinator")
    coord = dataclasses.replace(coord, port=coord.port or base,
                                metrics_port=coord.metrics_port or (coord.port or base) + METRICS_OFFSET,
                                http_port=base + HTTP_OFFSET if coord.http_port is None else coord.http_port)
    defaults_raw = dict(raw.get("defaults", {}))
    bad = set(defaults_raw) - _NODE_KEYS
    if bad:
        raise ConfigError(f"[defaults]: unknown keys {sorted(bad)}")
    engine_defaults = _engine_options(defaults_raw, EngineOptions())
    nodes = []
    for role, offset in (("prefill", 10), ("decode", 40), ("colocated", 70)):
        for i, node_raw in enumerate(raw.get(role, [])):
            bad = set(node_raw) - _NODE_KEYS
            if bad:
                raise ConfigError(f"[[{role}]] #{i}: unknown keys {sorted(bad)}")
            merged = {**defaults_raw, **node_raw}
            port = int(merged.get("port", 0)) or base + offset + i
            nodes.append(NodeSection(
                name=merged.get("name", f"{role}-{i}"), role=role, host=merged.get("host", "127.0.0.1"),
                port=port, metrics_port=int(merged.get("metrics_port", 0)) or port + METRICS_OFFSET,
                cpus=tuple(int(c) for c in merged.get("cpus", ())),
                engine=_engine_options({k: v for k, v in merged.items() if k not in
                                        ("name", "host", "port", "metrics_port", "cpus", "max_requests",
                                         "max_batch", "stream_interval")}, engine_defaults),
                max_requests=int(merged.get("max_requests", 64)), max_batch=int(merged.get("max_batch", 32)),
                stream_interval=int(merged.get("stream_interval", 1)),
            ))
    membership = _section(MembershipSection, raw.get("membership", {}), "membership")
    return ClusterConfig(store, coord, tuple(nodes), raw.get("mode", "disaggregated"), membership).validate()


def load(path: str, port_base: int | None = None) -> ClusterConfig:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return from_dict(raw, port_base)
