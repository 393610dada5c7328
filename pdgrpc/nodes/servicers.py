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


class _NodeServicer:
    """What every node servicer shares: the service slot (empty while the model loads), GetNodeInfo,
    and turning a domain event stream into protobuf with domain errors as statuses. (gRPC needs each
    streaming handler to be an async generator function itself, hence the small loops below.)"""

    role = "node"

    def __init__(self, info: Callable[[], NodeInfo]) -> None:
        self.service = None  # set once the engine is loaded
        self._info = info

    def _ready(self):
        if self.service is None:
            raise Unavailable(f"{self.role} node is loading its model")
        return self.service

    async def _stream(self, context: grpc.aio.ServicerContext, events: Callable[[], AsyncIterator], to_pb):
        try:
            async for event in events():
                yield to_pb(event)
        except PdgrpcError as err:
            await abort_with(context, err)

    async def GetNodeInfo(self, request: common_pb2.NodeInfoRequest, context: grpc.aio.ServicerContext):
        try:
            return convert.node_info_to_pb(self._info())
        except PdgrpcError as err:
            await abort_with(context, err)


class PrefillServicer(_NodeServicer, prefill_pb2_grpc.PrefillServicer):
    role = "prefill"
    service: PrefillService | None

    async def Prefill(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        async for msg in self._stream(context, lambda: self._ready().prefill(convert.prefill_request_from_pb(request)),
                                      convert.prefill_event_to_pb):
            yield msg


class DecodeServicer(_NodeServicer, decode_pb2_grpc.DecodeServicer):
    role = "decode"
    service: DecodeService | None

    async def Decode(self, request_iterator: AsyncIterator[decode_pb2.DecodeRequest],
                     context: grpc.aio.ServicerContext):
        async def inputs():
            async for msg in request_iterator:
                yield convert.decode_input_from_pb(msg)

        async for msg in self._stream(context, lambda: self._ready().decode(inputs()), convert.decode_event_to_pb):
            yield msg


class ColocatedServicer(_NodeServicer, colocated_pb2_grpc.ColocatedServicer):
    role = "colocated"
    service: ColocatedService | None

    async def Generate(self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        async for msg in self._stream(context, lambda: self._ready().generate(convert.prefill_request_from_pb(request)),
                                      convert.colocated_event_to_pb):
            yield msg


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
