"""The aiohttp application of the OpenAI front, served by the coordinator process on its http_port.

Each request is validated (``models``), turned into one domain request per choice (``convert``) and
run through the coordinator's Router in this event loop. A stream's HTTP status and headers are sent
with its first token, so anything that fails before it (bad parameters found by a node, no node
serving, a full cluster) is an ordinary error answer with its HTTP code; a failure after it is an
``data: {"error": ...}`` event before ``data: [DONE]``, as vLLM and OpenAI send it. SSE framing is
aiohttp-sse's. The handler is cancelled when the client disconnects (aiohttp's
``handler_cancellation``), which cancels the router's calls to both nodes and releases the request's
KV exactly as a gRPC cancel does. Deadlines: ``http_timeout_s`` of the coordinator's config, or less
with the request header ``x-pdgrpc-timeout-s``; the remaining time goes to the nodes as for gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError

from pdgrpc import metrics
from pdgrpc.coordinator.router import Router
from pdgrpc.errors import Code, DeadlineExceeded, PdgrpcError
from pdgrpc.openai_api import convert
from pdgrpc.openai_api import models as m
from pdgrpc.openai_api.errors import ApiError, from_domain, from_validation
from pdgrpc.types import GenerateEvent, GenerateRequest, NodeHealth, Role

log = logging.getLogger(__name__)
TIMEOUT_HEADER = "x-pdgrpc-timeout-s"
MAX_BODY_BYTES = 16 * 1024 * 1024   # as gRPC's message limit


def _json(body: BaseModel, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=body.model_dump_json(), status=status, content_type="application/json",
                        headers=headers)


def _error(err: ApiError) -> web.Response:
    return _json(err.body, err.status, err.headers())


@web.middleware
async def _openai_http_errors(request: web.Request, handler):
    """aiohttp's own answers (unknown path, wrong method, body too large) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}",
                               "invalid_request_error" if exc.status < 500 else "server_error"))


class OpenAIFront:
    def __init__(self, router: Router, token: str | None = None, timeout_s: float = 600.0) -> None:
        self.router = router
        self.token = os.environ.get("PDGRPC_AUTH_TOKEN", "") if token is None else token
        self.timeout_s = timeout_s
        self.draining = False
        self.started = int(time.time())
        self._runner: web.AppRunner | None = None

    # ---- lifecycle ----

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_openai_http_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def start(self, host: str, port: int, share_port: bool = False, grace_s: float = 30.0) -> None:
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=grace_s)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_port=share_port or None).start()

    async def stop(self) -> None:
        """Stop taking requests; running ones get up to the grace period to finish."""
        self.draining = True
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- endpoints ----

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, m.CompletionRequest)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, m.ChatCompletionRequest)

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except ApiError as err:
            return _error(err)
        cards: dict[str, m.ModelCard] = {}
        for n in self.router.pool.nodes:
            if n.info is not None and n.info.model.name not in cards:
                spec = n.info.model
                cards[spec.name] = m.ModelCard(id=spec.name, created=self.started, root=spec.fingerprint,
                                               max_model_len=spec.max_model_len)
        return _json(m.ModelList(data=list(cards.values())))

    async def health(self, request: web.Request) -> web.Response:
        serving = {r.value: sum(1 for n in self.router.pool.nodes if n.role is r and n.health is NodeHealth.SERVING)
                   for r in Role}
        status = 503 if self.draining else 200
        return web.json_response({"status": "draining" if self.draining else "ok", "serving_nodes": serving},
                                 status=status)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- generation ----

    def _check_auth(self, request: web.Request) -> None:
        if not self.token:
            return
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise ApiError(401, "Incorrect or missing API key: pass PDGRPC_AUTH_TOKEN as the bearer token "
                                "(the openai SDK's api_key)", "authentication_error", None, "invalid_api_key")

    def _served(self):
        return next((n.info.model for n in self.router.pool.nodes if n.info is not None), None)

    def _timeout(self, request: web.Request) -> float:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.timeout_s
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise ApiError(400, f"header {TIMEOUT_HEADER} must be a positive number of seconds, not {raw!r}",
                           param=TIMEOUT_HEADER)
        return min(value, self.timeout_s)

    async def _generate(self, request: web.Request, schema: type[m.CompletionRequest | m.ChatCompletionRequest]):
        code: Code | None = None
        spec = self._served()
        try:
            self._check_auth(request)
        except ApiError as err:
            return _error(err)
        try:
            if self.draining:
                raise ApiError(503, "the coordinator is shutting down", "server_error", None, "service_unavailable")
            try:
                req = schema.model_validate_json(await request.read())
            except ValidationError as exc:
                raise from_validation(exc) from None
            if spec is not None and req.model != spec.name:
                raise ApiError(404, f"The model `{req.model}` does not exist (this cluster serves `{spec.name}`).",
                               "invalid_request_error", "model", "model_not_found")
            rid = convert.new_id(schema is m.ChatCompletionRequest)
            reqs = convert.generate_requests(req, rid)
            responder = convert.Responder(req, rid, req.model, spec.fingerprint if spec else None, len(reqs),
                                          len(reqs) // req.n)
            timeout_s = self._timeout(request)
            events = self._events(reqs, timeout_s)
            async with contextlib.aclosing(events):
                if req.stream:
                    resp, code = await self._stream(request, events, responder, timeout_s)
                    return resp
                async with asyncio.timeout(timeout_s):
                    async for index, event in events:
                        responder.record(index, event)
                return _json(responder.response(), headers={"x-request-id": rid})
        except TimeoutError:
            err = from_domain(DeadlineExceeded(f"no answer within {timeout_s:g} s"))
            code = err.grpc_code
            return _error(err)
        except PdgrpcError as exc:
            code = exc.code
            return _error(from_domain(exc))
        except ApiError as err:
            code = err.grpc_code
            return _error(err)
        except asyncio.CancelledError:
            code = Code.CANCELLED   # the client went away: the router has cancelled both nodes' calls
            raise
        finally:
            metrics.count_request(spec.name if spec else metrics.pool_model(self.router.pool),
                                  code.value if code else None, api="openai")

    async def _stream(self, request: web.Request, events: AsyncIterator, responder: convert.Responder,
                      timeout_s: float) -> tuple[web.StreamResponse, Code | None]:
        code: Code | None = None
        async with asyncio.timeout(timeout_s) as deadline:
            first = await anext(events, None)   # errors before the first token are plain HTTP errors
        resp = EventSourceResponse(sep="\n", allow_all_methods=True, headers={"x-request-id": responder.id})
        await resp.prepare(request)
        try:
            for chunk in responder.first_chunks():
                await resp.send(chunk)
            try:
                async with asyncio.timeout_at(deadline.when()):
                    pending = [first] if first is not None else []
                    while pending:
                        chunk = responder.on_event(*pending.pop())
                        if chunk is not None:
                            await resp.send(chunk)
                        if (nxt := await anext(events, None)) is not None:
                            pending.append(nxt)
            except (PdgrpcError, TimeoutError) as exc:
                err = from_domain(exc if isinstance(exc, PdgrpcError) else DeadlineExceeded(f"no answer within "
                                                                                            f"{timeout_s:g} s"))
                code = err.grpc_code
                await resp.send(err.body.model_dump_json())
            else:
                if (usage := responder.usage_chunk()) is not None:
                    await resp.send(usage)
            await resp.send("[DONE]")
        except ConnectionResetError:
            code = Code.CANCELLED   # the client went away; closing ``events`` cancels the nodes' calls
        finally:
            resp.stop_streaming()
        return resp, code

    async def _events(self, reqs: list[GenerateRequest], timeout_s: float) -> AsyncIterator[tuple[int,
                                                                                                  GenerateEvent]]:
        """(choice index, event) from the router; several choices run at once, merged as they come."""
        if len(reqs) == 1:
            async with contextlib.aclosing(self.router.generate(reqs[0], timeout_s)) as gen:
                async for ev in gen:
                    yield 0, ev
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int, req: GenerateRequest) -> None:
            try:
                async with contextlib.aclosing(self.router.generate(req, timeout_s)) as gen:
                    async for ev in gen:
                        queue.put_nowait((index, ev))
                queue.put_nowait((index, None))
            except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(run(i, r)) for i, r in enumerate(reqs)]
        try:
            left = len(tasks)
            while left:
                index, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
