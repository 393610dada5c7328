"""gRPC plumbing shared by every server and client: status mapping, server setup, graceful stop.

Servers are grpc.aio with the standard health service (NOT_SERVING until the engine is ready and
again while draining) and server reflection. On SIGTERM/SIGINT a server turns NOT_SERVING, stops
taking new calls, lets in-flight calls finish within the grace period, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterable
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdgrpc.convert import MalformedMessage
from pdgrpc.errors import Code, PdgrpcError, Unavailable, error_for

log = logging.getLogger(__name__)

# Long generations keep a stream open for minutes: allow keepalive pings without calls.
SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A restarted peer is found again within about a second.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]
RETRY_AFTER_KEY = "pdgrpc-retry-after-ms"


async def abort_with(context: grpc.aio.ServicerContext, err: PdgrpcError) -> NoReturn:
    """End the call with the status that the domain error names."""
    if err.retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(err.retry_after_s * 1000))),))
    await context.abort(getattr(grpc.StatusCode, err.code.value), err.message)
    raise AssertionError("unreachable")  # context.abort raises


def error_from_rpc(exc: grpc.aio.AioRpcError, peer: str) -> PdgrpcError:
    """A downstream call's failure as a domain error, keeping its status."""
    code = exc.code()
    details = exc.details() or code.name
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        # UNKNOWN/INTERNAL from a peer means it broke: the request can go elsewhere.
        return Unavailable(f"{peer}: {details}")
    err = error_for(code.name, f"{peer}: {details}")
    if err.code is Code.RESOURCE_EXHAUSTED:
        for key, value in exc.trailing_metadata() or ():
            if key == RETRY_AFTER_KEY:
                err.retry_after_s = int(value) / 1000
    return err


class RejectMalformed(grpc.aio.ServerInterceptor):
    """Requests that do not parse reach the servicer as MalformedMessage, so they get
    INVALID_ARGUMENT with a message instead of gRPC's generic UNKNOWN."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith("/pdgrpc.v1.") \
                or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(data: bytes):
            try:
                return parse(data)
            except DecodeError as exc:
                return MalformedMessage(str(exc))

        return handler._replace(request_deserializer=lenient)


def new_server(interceptors: list[grpc.aio.ServerInterceptor] = (), *, share_port: bool = False) -> grpc.aio.Server:
    """A server; ``share_port`` lets several processes of one service listen on one port (SO_REUSEPORT),
    which is otherwise off so that a second process on a taken port fails instead of sharing it."""
    options = [(k, 1 if share_port and k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]
    return grpc.aio.server(options=options, interceptors=[*interceptors, RejectMalformed()])


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


async def wait_for_stop_signal() -> None:
    """Return on the first SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


async def health_check(channel: grpc.aio.Channel, timeout_s: float = 1.0, service: str = "") -> bool | None:
    """True: SERVING, False: answering but not serving, None: unreachable."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return False
        return None
    return resp.status == health_pb2.HealthCheckResponse.SERVING
