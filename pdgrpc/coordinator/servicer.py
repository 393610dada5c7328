"""The Coordinator gRPC servicer: protobuf in, Router calls, protobuf out, status and outcome metrics."""

from __future__ import annotations

import asyncio

import grpc

from pdgrpc import convert, metrics
from pdgrpc.coordinator.router import Router
from pdgrpc.errors import PdgrpcError
from pdgrpc.grpcutil import abort_with
from pdgrpc.types import ClusterStatus
from pdgrpc.v1 import coordinator_pb2, coordinator_pb2_grpc


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, router: Router, store_address: str) -> None:
        self.router = router
        self.store_address = store_address
        metrics.init_coordinator()  # metrics: series exist before the first request

    async def Generate(self, request: coordinator_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        outcome: str | None = None
        model = ""
        try:
            req = convert.generate_request_from_pb(request)
            async for event in self.router.generate(req, context.time_remaining()):
                yield convert.generate_event_to_pb(event)
        except PdgrpcError as err:
            outcome = err.code.value
            await abort_with(context, err)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            outcome = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise
        finally:
            metrics.count_request(model or metrics.pool_model(self.router.pool), outcome, api="grpc")  # metrics

    async def GetClusterStatus(self, request: coordinator_pb2.ClusterStatusRequest, context):
        status = ClusterStatus(tuple(self.router.pool.status()), self.store_address, self.router.inflight)
        return convert.cluster_status_to_pb(status)


def register(server: grpc.aio.Server, servicer: CoordinatorServicer) -> str:
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    return coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
