"""Send benchmark requests and time every token as the client sees it.

Two senders fill the same RequestResult fields, so every setup is measured by the same code: a pdgrpc
coordinator over gRPC (``GrpcSender``, the default) and an OpenAI-compatible ``/v1/completions``
endpoint over HTTP (``OpenAISender``: vLLM's own disaggregated serving, pdgrpc.bench.vllm_peer).
``open_sender`` picks one from the address (``http://...`` is HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Protocol

from pdgrpc.bench.stats import RequestResult
from pdgrpc.bench.workloads import BenchRequest
from pdgrpc.client import AsyncClient
from pdgrpc.types import GenerateDelta, GenerateFinal


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (a no-op object when tqdm is missing or the bar is off)."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="req", leave=True, dynamic_ncols=True)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextlib.contextmanager
def failures_recorded(res: RequestResult):
    """A benchmark reports a request's failure in its result and goes on; a cancel still propagates."""
    try:
        yield
    except asyncio.CancelledError:
        res.error = "Cancelled: benchmark stopped waiting"
        raise
    except Exception as exc:  # PdgrpcError, aiohttp's errors, anything: reported, not raised
        res.error = f"{type(exc).__name__}: {exc}"


async def send_one(client: AsyncClient, req: BenchRequest, res: RequestResult, t0: float,
                   timeout_s: float) -> RequestResult:
    """One streamed request; fills ``res`` (times relative to its own send)."""
    start = time.perf_counter()
    res.sent_s = start - t0
    with failures_recorded(res):
        async for ev in client.generate(req.prompt_arg(), timeout_s=timeout_s, **req.client_kwargs()):
            now = time.perf_counter() - start
            if isinstance(ev, GenerateDelta):
                res.add_tokens(now, len(ev.token_ids))
            elif isinstance(ev, GenerateFinal):
                res.prompt_tokens = ev.prompt_tokens
                res.e2e_s = now
                res.server_prefill_s = ev.timings.prefill_seconds
                res.server_queue_s = ev.timings.queue_seconds
        if res.e2e_s is None:
            res.error = "NoFinal: stream ended without a final message"
    return res


class Sender(Protocol):
    """Sends one request and fills its RequestResult (times relative to its own send); closed once."""

    async def send(self, req: BenchRequest, res: RequestResult, t0: float, timeout_s: float) -> RequestResult: ...

    async def close(self) -> None: ...


class GrpcSender:
    """A pdgrpc coordinator through pdgrpc's AsyncClient (``send_one``), over ``connections`` TCP
    connections taken in turn (coordinator processes sharing a port are balanced per connection)."""

    def __init__(self, address: str, timeout_s: float, connections: int = 1) -> None:
        self.clients = [AsyncClient(address, timeout_s=timeout_s, connection_id=k if connections > 1 else None)
                        for k in range(max(connections, 1))]
        self._next = itertools.count()

    async def send(self, req: BenchRequest, res: RequestResult, t0: float, timeout_s: float) -> RequestResult:
        client = self.clients[next(self._next) % len(self.clients)]
        return await send_one(client, req, res, t0, timeout_s)

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


class OpenAISender:
    """A streamed, greedy ``/v1/completions`` request per benchmark request, over one pooled aiohttp
    session. Timed like ``send_one``: TTFT = first chunk carrying tokens, one token time per such
    chunk (a chunk is vLLM's token message, as a GenerateDelta is pdgrpc's), e2e = the final usage
    chunk (as GenerateFinal); tokens are counted from each chunk's ``token_ids``
    (``return_token_ids``), the total from the usage chunk."""

    def __init__(self, url: str, timeout_s: float) -> None:
        import aiohttp

        self.url = url.rstrip("/") + "/v1/completions"  # timeout_s: unused, each send() has its own deadline
        # no connection limit: an open loop may have every request in flight at once
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))

    async def send(self, req: BenchRequest, res: RequestResult, t0: float, timeout_s: float) -> RequestResult:
        start = time.perf_counter()
        res.sent_s = start - t0
        if req.messages is not None:
            res.error = "Unsupported: chat messages (the OpenAI peer takes token-id or text prompts)"
            return res
        prompt = list(req.token_ids) if req.token_ids is not None else (req.text or "")
        with failures_recorded(res):
            try:
                await self._stream(prompt, req, res, start, timeout_s)
            except TimeoutError:
                res.error = f"DeadlineExceeded: no answer within {timeout_s:g} s"
        return res

    async def _stream(self, prompt: list[int] | str, req: BenchRequest, res: RequestResult, start: float,
                      timeout_s: float) -> None:
        from pdgrpc.bench.vllm_peer import DONE, completion_body, sse_event

        async with asyncio.timeout(timeout_s), self.session.post(
                self.url, json=completion_body(prompt, req.max_tokens)) as r:
            if r.status != 200:
                res.error = f"HTTP{r.status}: {(await r.text())[:300]}"
                return
            async for line in r.content:  # one SSE line at a time, as it arrives
                now = time.perf_counter() - start
                ev = sse_event(line)
                if ev is None or ev is DONE:
                    continue
                if "error" in ev:  # vLLM reports errors met after the first byte in the stream
                    err = ev["error"]
                    res.error = f"ServerError: {err.get('message', err) if isinstance(err, dict) else err}"
                    continue
                for choice in ev.get("choices") or ():
                    n = len(choice["token_ids"]) if choice.get("token_ids") is not None else int(
                        bool(choice.get("text")))  # a server without return_token_ids: one per chunk
                    if n:
                        res.add_tokens(now, n)
                if ev.get("usage"):
                    res.prompt_tokens = int(ev["usage"].get("prompt_tokens") or 0)
                    res.output_tokens = int(ev["usage"].get("completion_tokens") or res.output_tokens)
                    res.e2e_s = now
        if res.e2e_s is None and not res.error:
            res.error = "NoFinal: stream ended without a usage chunk"

    async def close(self) -> None:
        await self.session.close()


def open_sender(address: str, timeout_s: float, connections: int = 1) -> Sender:
    """``http(s)://host:port``: an OpenAI-compatible server; anything else: a pdgrpc coordinator.
    Call it inside the event loop that will use it."""
    if address.startswith(("http://", "https://")):
        return OpenAISender(address, timeout_s)
    return GrpcSender(address, timeout_s, connections)


async def run_open_loop(address: str, requests: list[BenchRequest], arrivals: list[float], *,
                        timeout_s: float = 300.0, drain_timeout_s: float = 300.0,
                        on_done: Callable[[RequestResult], None] | None = None,
                        sender: Sender | None = None, connections: int = 1,
                        start_at: float | None = None) -> tuple[list[RequestResult], float]:
    """Send request i at ``arrivals[i]`` seconds after the start, whatever is still running (open
    loop); return every result and the run's duration (first send to last answer). ``sender``
    (closed here) defaults to ``open_sender(address)``. ``start_at`` (a ``time.perf_counter()``
    value, the same clock in every process on the host) lets several client processes share one
    schedule; the default is now."""
    results = [RequestResult(r.index, r.kind, float(a)) for r, a in zip(requests, arrivals)]
    client = sender if sender is not None else open_sender(address, timeout_s, connections)
    try:
        tasks: list[asyncio.Task] = []
        t0 = time.perf_counter() if start_at is None else start_at

        async def one(i: int) -> None:
            await client.send(requests[i], results[i], t0, timeout_s)
            if on_done is not None:
                on_done(results[i])

        for i, at in enumerate(arrivals):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        done, pending = await asyncio.wait(tasks, timeout=max(drain_timeout_s, 1.0)) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(BaseException):
                await t
        end = time.perf_counter()
    finally:
        await client.close()
    ends = [r.sent_s + r.e2e_s for r in results if r.ok]
    duration = max(ends) if ends and not pending else end - t0
    return results, duration
