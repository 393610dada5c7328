"""The coordinator's view of its nodes: health-checked, load-tracked, picked least-loaded first.

Every ``interval_s`` each node gets a gRPC health check and, when SERVING, a GetNodeInfo for its
model and load. A call that fails with UNAVAILABLE marks the node unreachable at once, so the next
request goes elsewhere without waiting for the next check.
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

    def has_capacity(self) -> bool:
        return self.info is None or self.inflight < self.info.max_requests

    def load(self) -> tuple[int, int]:
        reported = self.info.running_requests + self.info.queued_requests if self.info else 0
        return self.inflight, reported


class NodePool:
    def __init__(self, nodes: list[NodeSection], interval_s: float = 1.0,
                 security: GrpcSecurity | None = None) -> None:
        self.interval_s = interval_s
        self.security = security or GrpcSecurity()
        self.metadata = self.security.metadata()  # passed on every call to a node
        self.nodes: list[NodeHandle] = []
        for n in nodes:
            role = Role(n.role)
            channel = self.security.aio_channel(n.address)
            stub = {Role.PREFILL: prefill_pb2_grpc.PrefillStub, Role.DECODE: decode_pb2_grpc.DecodeStub,
                    Role.COLOCATED: colocated_pb2_grpc.ColocatedStub}[role](channel)
            self.nodes.append(NodeHandle(n.name, role, n.address, channel, stub))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._loop(), name="node-health")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
                           now - n.last_seen if n.last_seen else -1.0) for n in self.nodes]
