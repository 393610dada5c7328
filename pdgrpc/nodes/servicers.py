"""gRPC servicers of the prefill and decode nodes: protobuf in, domain calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from pdgrpc import convert
from pdgrpc.errors import PdgrpcError, Unavailable
from pdgrpc.grpcutil import abort_with
from pdgrpc.nodes.colocated_service import ColocatedService
from pdgrpc.nodes.decode_service import DecodeService
from pdgrpc.nodes.prefill_service import PrefillService
from pdgrpc.types import NodeInfo
from pdgrpc.v1 import (
    colocated_pb2,
    colocated_pb2_grpc,
    common_pb2,
    decode_pb2,
    decode_pb2_grpc,
    prefill_pb2,
    prefill_pb2_grpc,
)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, info: Callable[[], NodeInfo]) -> None:
        self.service: PrefillService | None = None  # set once the engine is loaded
        self._info = info

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        try:
            if self.service is None:
                raise Unavailable("prefill node is loading its model")
            req = convert.prefill_request_from_pb(request)
            async for event in self.service.prefill(req):
                yield convert.prefill_event_to_pb(event)
        except PdgrpcError as err:
            await abort_with(context, err)

    async def GetNodeInfo(self, request: common_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext):
        try:
            return convert.node_info_to_pb(self._info())
        except PdgrpcError as err:
            await abort_with(context, err)


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, info: Callable[[], NodeInfo]) -> None:
        self.service: DecodeService | None = None
        self._info = info

    async def Decode(self, request_iterator: AsyncIterator[decode_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext):
        async def inputs():
            async for msg in request_iterator:
                yield convert.decode_input_from_pb(msg)

        try:
            if self.service is None:
                raise Unavailable("decode node is loading its model")
            async for event in self.service.decode(inputs()):
                yield convert.decode_event_to_pb(event)
        except PdgrpcError as err:
            await abort_with(context, err)

    async def GetNodeInfo(self, request: common_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext):
        try:
            return convert.node_info_to_pb(self._info())
        except PdgrpcError as err:
            await abort_with(context, err)


class ColocatedServicer(colocated_pb2_grpc.ColocatedServicer):
    def __init__(self, info: Callable[[], NodeInfo]) -> None:
        self.service: ColocatedService | None = None
        self._info = info

    async def Generate(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        try:
            if self.service is None:
                raise Unavailable("colocated node is loading its model")
            req = convert.prefill_request_from_pb(request)
            async for event in self.service.generate(req):
                yield convert.colocated_event_to_pb(event)
        except PdgrpcError as err:
            await abort_with(context, err)

    async def GetNodeInfo(self, request: common_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext):
        try:
            return convert.node_info_to_pb(self._info())
        except PdgrpcError as err:
            await abort_with(context, err)


Servicer = PrefillServicer | DecodeServicer | ColocatedServicer


def register(server: grpc.aio.Server, servicer: Servicer) -> str:
    """Add the servicer to the server; return its full service name (for health and reflection)."""
    if isinstance(servicer, ColocatedServicer):
        colocated_pb2_grpc.add_ColocatedServicer_to_server(servicer, server)
        return colocated_pb2.DESCRIPTOR.services_by_name["Colocated"].full_name
    if isinstance(servicer, PrefillServicer):
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
        return prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
    decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
    return decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
