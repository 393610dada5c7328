"""Python client of the Coordinator, sync (``Client``) and asyncio (``AsyncClient``).

    from pdgrpc.client import Client
    with Client("127.0.0.1:50051") as c:
        for event in c.generate("Hello", max_tokens=32):
            ...                       # GenerateDelta events, then one GenerateFinal
        print(c.complete("Hello").text)

Failures raise ``pdgrpc.errors.PdgrpcError`` subclasses named after the gRPC status
(InvalidArgument, Unavailable, ResourceExhausted, DeadlineExceeded, Cancelled, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc

from pdgrpc import convert
from pdgrpc.errors import PdgrpcError, error_for
from pdgrpc.grpcutil import RETRY_AFTER_KEY
from pdgrpc.security import GrpcSecurity
from pdgrpc.types import (
    ChatMessage,
    ClusterStatus,
    GenerateDelta,
    GenerateEvent,
    GenerateFinal,
    GenerateRequest,
    Prompt,
    SamplingParams,
)
from pdgrpc.v1 import coordinator_pb2_grpc


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    final: GenerateFinal


def build_request(prompt: str | None = None, *, messages: Sequence[dict | ChatMessage] | None = None,
                  token_ids: Sequence[int] | None = None, max_tokens: int = 16, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (),
                  stop_token_ids: Sequence[int] = (), ignore_eos: bool = False, logprobs: bool = False,
                  request_id: str = "") -> GenerateRequest:
    if prompt is not None and not isinstance(prompt, str):  # else protobuf's "bad argument type" later
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}; pass token ids as token_ids=[...] "
                        "and chat turns as messages=[...]")
    chat = None
    if messages is not None:
        chat = tuple(m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"]) for m in messages)
    return GenerateRequest(
        Prompt(text=prompt, chat=chat, token_ids=tuple(token_ids) if token_ids is not None else None),
        SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       stop=tuple(stop), stop_token_ids=tuple(stop_token_ids), ignore_eos=ignore_eos,
                       logprobs=logprobs),
        request_id)


def _error(exc: grpc.RpcError) -> PdgrpcError:
    err = error_for(exc.code().name, exc.details() or exc.code().name)
    for key, value in (exc.trailing_metadata() or ()):
        if key == RETRY_AFTER_KEY:
            err.retry_after_s = int(value) / 1000
    return err


def _collect(events: list[GenerateEvent]) -> Completion:
    deltas = [e for e in events if isinstance(e, GenerateDelta)]
    final = next(e for e in events if isinstance(e, GenerateFinal))
    return Completion("".join(d.text for d in deltas), tuple(t for d in deltas for t in d.token_ids), final)


class Client:
    """``token`` and ``tls_ca`` default to $PDGRPC_AUTH_TOKEN and $PDGRPC_TLS_CA (see pdgrpc.security)."""

    def __init__(self, address: str, timeout_s: float | None = 300.0, *, token: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        security = GrpcSecurity.from_env(token=token, tls_ca=tls_ca)
        self._metadata = security.metadata()
        self._channel = security.channel(address)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    def generate(self, prompt: str | None = None, *, timeout_s: float | None = None,
                 **kwargs) -> Iterator[GenerateEvent]:
        request = convert.generate_request_to_pb(build_request(prompt, **kwargs))
        call = self._stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        try:
            for msg in call:
                yield convert.generate_event_from_pb(msg)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # no-op when finished; ends the stream when the caller stops early

    def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        return _collect(list(self.generate(prompt, **kwargs)))

    def cluster_status(self, timeout_s: float = 5.0) -> ClusterStatus:
        try:
            return convert.cluster_status_from_pb(
                self._stub.GetClusterStatus(convert.cluster_status_request_pb(), timeout=timeout_s,
                                           metadata=self._metadata))
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    def __init__(self, address: str, timeout_s: float | None = 300.0, *, token: str | None = None,
                 tls_ca: str | None = None, connection_id: int | None = None) -> None:
        """``connection_id``: clients with different ids never share a TCP connection (grpc shares
        one between channels with equal options), e.g. to spread load over coordinator processes that
        share a port, which the kernel balances per connection."""
        self.address = address
        self.timeout_s = timeout_s
        security = GrpcSecurity.from_env(token=token, tls_ca=tls_ca)
        self._metadata = security.metadata()
        extra = () if connection_id is None else (("pdgrpc.connection_id", connection_id),)
        self._channel = security.aio_channel(address, extra)
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)

    async def generate(self, prompt: str | None = None, *, timeout_s: float | None = None,
                       **kwargs) -> AsyncIterator[GenerateEvent]:
        request = convert.generate_request_to_pb(build_request(prompt, **kwargs))
        call = self._stub.Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        try:
            async for msg in call:
                yield convert.generate_event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def complete(self, prompt: str | None = None, **kwargs) -> Completion:
        return _collect([e async for e in self.generate(prompt, **kwargs)])

    async def cluster_status(self, timeout_s: float = 5.0) -> ClusterStatus:
        try:
            return convert.cluster_status_from_pb(
                await self._stub.GetClusterStatus(convert.cluster_status_request_pb(), timeout=timeout_s,
                                           metadata=self._metadata))
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
