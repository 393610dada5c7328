"""Optional gRPC security: a shared token in call metadata, and TLS.

Every process reads the same environment, so `pdgrpc up` and systemd units configure a whole
cluster in one place:
  PDGRPC_AUTH_TOKEN  every pdgrpc.v1 call must carry ``authorization: Bearer <token>``;
                     others get UNAUTHENTICATED (health and reflection stay open, as /health does
                     on the store, so load balancers and probes keep working)
  PDGRPC_TLS_CERT, PDGRPC_TLS_KEY   servers listen with TLS (PEM files)
  PDGRPC_TLS_CA      clients (coordinator -> nodes, pdgrpc.client, the launcher) verify servers
                     against this PEM root and connect with TLS
Without them, servers bind 127.0.0.1 by default and speak plaintext.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

import grpc

from pdgrpc.grpcutil import CHANNEL_OPTIONS


@dataclass(frozen=True)
class GrpcSecurity:
    token: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    @classmethod
    def from_env(cls, **overrides: str | None) -> "GrpcSecurity":
        values = {
            "token": os.environ.get("PDGRPC_AUTH_TOKEN", ""),
            "tls_cert": os.environ.get("PDGRPC_TLS_CERT", ""),
            "tls_key": os.environ.get("PDGRPC_TLS_KEY", ""),
            "tls_ca": os.environ.get("PDGRPC_TLS_CA", ""),
        }
        values.update({k: v for k, v in overrides.items() if v})
        sec = cls(**values)
        if bool(sec.tls_cert) != bool(sec.tls_key):
            raise ValueError("PDGRPC_TLS_CERT and PDGRPC_TLS_KEY go together")
        return sec

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuth(self.token)] if self.token else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if not self.tls_cert:
            return server.add_insecure_port(address)
        with open(self.tls_key, "rb") as k, open(self.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        return server.add_secure_port(address, creds)

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        with open(self.tls_ca, "rb") as f:
            return grpc.ssl_channel_credentials(f.read())

    def aio_channel(self, address: str, extra_options: tuple = ()) -> grpc.aio.Channel:
        options = [*CHANNEL_OPTIONS, *extra_options]
        if self.tls_ca:
            return grpc.aio.secure_channel(address, self._channel_credentials(), options=options)
        return grpc.aio.insecure_channel(address, options=options)

    def channel(self, address: str) -> grpc.Channel:
        if self.tls_ca:
            return grpc.secure_channel(address, self._channel_credentials(), options=CHANNEL_OPTIONS)
        return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses pdgrpc.v1 calls without the shared token (constant-time comparison)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/pdgrpc.v1."):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        message = "missing or wrong authorization token (set PDGRPC_AUTH_TOKEN)"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # an async generator, as streaming handlers are

        if handler.unary_unary:
            return handler._replace(unary_unary=deny)
        if handler.stream_unary:
            return handler._replace(stream_unary=deny)
        if handler.unary_stream:
            return handler._replace(unary_stream=deny_stream)
        return handler._replace(stream_stream=deny_stream)
