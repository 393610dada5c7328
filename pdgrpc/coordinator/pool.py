"""The coordinator's view of its nodes: health-checked, load-tracked, picked least-loaded first.

Every ``interval_s`` each node gets a gRPC health check and, when SERVING, a GetNodeInfo for its
model and load. A call that fails with UNAVAILABLE marks the node unreachable at once, so the next
request goes elsewhere without waiting for the next check.

Which nodes there are comes from a :class:`pdgrpc.membership.Membership` (the cluster TOML's list,
or etcd): :meth:`NodePool.apply` adds the nodes that joined (checked at once, so a new node serves
within a second) and drops those that left (no new requests; their channel closes once the requests
already on them have ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from pdgrpc import convert
from pdgrpc.config import NodeSection
from pdgrpc.errors import ResourceExhausted, Unavailable
from pdgrpc.grpcutil import health_check
from pdgrpc.membership import Membership, NodeRecord, StaticMembership
from pdgrpc.security import GrpcSecurity
from pdgrpc.types import NodeHealth, NodeInfo, NodeStatus, Role
from pdgrpc.v1 import colocated_pb2_grpc, decode_pb2_grpc, prefill_pb2_grpc

log = logging.getLogger(__name__)
MISSED_CHECKS_BEFORE_DOWN = 3


@dataclass(eq=False)
class NodeHandle:
    name: str
    role: Role
    address: str
    channel: grpc.aio.Channel
    stub: Any
    health: NodeHealth = NodeHealth.UNSPECIFIED
    inflight: int = 0
    info: NodeInfo | None = None
    last_seen: float = 0.0
    missed_checks: int = 0
    record: NodeRecord | None = None   # what the membership says about it (host, store, fingerprint)

    def has_capacity(self) -> bool:
        return self.info is None or self.inflight < self.info.max_requests

    def load(self) -> tuple[int, int]:
        reported = self.info.running_requests + self.info.queued_requests if self.info else 0
        return self.inflight, reported


def static_records(nodes: list[NodeSection], store_address: str = "") -> list[NodeRecord]:
    """The cluster TOML's node list as membership records."""
    return [NodeRecord(n.name, n.role, n.address, n.host, store_address, "", n.max_requests) for n in nodes]


class NodePool:
    def __init__(self, nodes: list[NodeSection], interval_s: float = 1.0,
                 security: GrpcSecurity | None = None, membership: Membership | None = None,
                 store_address: str = "") -> None:
        self.interval_s = interval_s
        self.security = security or GrpcSecurity()
        self.metadata = self.security.metadata()  # passed on every call to a node
        self.nodes: list[NodeHandle] = []
        self.membership = membership or StaticMembership(static_records(nodes, store_address))
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    def _handle(self, r: NodeRecord) -> NodeHandle:
        role = Role(r.role)
        channel = self.security.aio_channel(r.address)
        stub = {Role.PREFILL: prefill_pb2_grpc.PrefillStub, Role.DECODE: decode_pb2_grpc.DecodeStub,
                Role.COLOCATED: colocated_pb2_grpc.ColocatedStub}[role](channel)
        return NodeHandle(r.name, role, r.address, channel, stub, record=r)

    def apply(self, records: dict[str, NodeRecord]) -> None:
        """Match the pool to the membership: add who joined, drop who left or changed address/role."""
        current = {n.name: n for n in self.nodes}
        kept = []
        for n in self.nodes:
            r = records.get(n.name)
            if r is not None and r.address == n.address and r.role == n.role.value:
                n.record = r
                kept.append(n)
            else:
                log.info("node %s (%s) left the pool", n.name, n.address)
                self._spawn(self._retire(n))
        added = [self._handle(r) for name, r in records.items()
                 if name not in current or current[name] not in kept]
        for n in added:
            log.info("node %s (%s at %s) joined the pool", n.name, n.role.value, n.address)
            if self._task is not None:  # running: check it now rather than at the next round
                self._spawn(self._check(n))
        self.nodes = kept + added

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _retire(self, node: NodeHandle) -> None:
        # Requests already on it end as they would have (a dead node's fail, a draining node's finish).
        while node.inflight > 0:
            await asyncio.sleep(0.5)
        await asyncio.sleep(max(self.interval_s, 0.5) + 0.5)  # a health check begun before has ended
        await node.channel.close()

    async def start(self) -> None:
        await self.membership.start(self.apply)
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="node-health")

    async def close(self) -> None:
        await self.membership.close()
        for task in [self._task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for n in self.nodes:
            await n.channel.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.check_all()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(n) for n in self.nodes))

    async def _check(self, node: NodeHandle) -> None:
        timeout = max(self.interval_s, 0.5)
        ok = await health_check(node.channel, timeout_s=timeout)
        before = node.health
        if ok is None:
            # A node busy on a long prompt may miss a check; only several misses in a row mark it
            # down (a failed call marks it down at once, see mark_unreachable).
            node.missed_checks += 1
            if node.missed_checks >= MISSED_CHECKS_BEFORE_DOWN or node.health is not NodeHealth.SERVING:
                node.health = NodeHealth.UNREACHABLE
        elif not ok:
            node.missed_checks = 0
            node.health = NodeHealth.NOT_SERVING
            node.last_seen = time.monotonic()
        else:
            try:
                node.info = convert.node_info_from_pb(
                    await node.stub.GetNodeInfo(convert.node_info_request_pb(), timeout=timeout,
                                                metadata=self.metadata))
                node.health = NodeHealth.SERVING
                node.missed_checks = 0
                node.last_seen = time.monotonic()
            except grpc.aio.AioRpcError:
                node.health = NodeHealth.UNREACHABLE
        if node.health is not before:
            log.info("node %s (%s) is %s", node.name, node.address, node.health.value)

    @property
    def colocated(self) -> bool:
        return any(n.role is Role.COLOCATED for n in self.nodes)

    def mark_unreachable(self, node: NodeHandle) -> None:
        if node.health is not NodeHealth.UNREACHABLE:
            log.warning("node %s (%s) unreachable", node.name, node.address)
        node.health = NodeHealth.UNREACHABLE

    def pick(self, role: Role, exclude: tuple[NodeHandle, ...] = ()) -> NodeHandle:
        serving = [n for n in self.nodes if n.role is role and n.health is NodeHealth.SERVING and n not in exclude]
        if not serving:
            raise Unavailable(f"no {role.value} node is serving")
        candidates = [n for n in serving if n.has_capacity()]
        if not candidates:
            # Every node's queue is full: say so now rather than let latency grow without bound.
            raise ResourceExhausted(f"all {len(serving)} {role.value} nodes are at their request limit",
                                    retry_after_s=0.5)
        return min(candidates, key=NodeHandle.load)

    def status(self) -> list[NodeStatus]:
        now = time.monotonic()
        return [NodeStatus(n.name, n.role, n.address, n.health, n.inflight, n.info,
                           now - n.last_seen if n.last_seen else -1.0,
                           n.record.host if n.record else "", n.record.store if n.record else "")
                for n in self.nodes]
