"""The KV store client's small JSON calls (commit, release, renew, arenas, stats) on keep-alive
HTTP/1.1 connections of its own.

A call is one preformatted write on a pooled connection, and its answer is parsed by httptools (the
C parser uvicorn uses). Through aiohttp's client the same commit took ~0.2-0.35 ms of the caller's
time before the request was out (the request and response objects, headers, the connector, tracing
hooks, the timeout context) on the 2-vCPU VM, as long as copying 8 MB: half the fixed cost of a
16 MB hand-off. Bodies of KV bytes (PUT / GET /v1/kv/{key}) stay on aiohttp, which streams them.

In call order:
    channel = JsonChannel("127.0.0.1:9015", headers={"Authorization": "Bearer ..."}, timeout_s=30)
    answer = channel.call("POST", "/v1/kv/k/shm", b'{...}')  # written before call() returns when a
                                                             # pooled connection is free
    status, body = await answer       # OSError (ConnectionError, TimeoutError) when there is none
    await channel.close()

One request at a time per connection (no pipelining): a connection goes back to the pool once its
answer is complete. A call whose caller gives up (cancelled, timed out) closes its connection, whose
state is unknown then. Connections idle longer than ``IDLE_S`` are closed instead of reused, so the
store (aiohttp's server closes keep-alive connections after 75 s) never closes one as we write to it.
"""

from __future__ import annotations

import asyncio
import time

import httptools


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the store, with at most one call in flight."""

    def __init__(self, channel: JsonChannel) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: asyncio.Future | None = None
        self.body: list[bytes] = []
        self.closed = False
        self.idle_since = 0.0

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ConnectionError(f"kv store sent a malformed answer: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"kv store closed the connection{f': {exc}' if exc else ''}"))

    # httptools callbacks
    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        result = (self.parser.get_status_code(), b"".join(self.body))
        self.body = []
        if answer is None or answer.done():  # an answer nobody waits for: the stream is out of step
            self.close()
            return
        if self.parser.should_keep_alive():
            self.channel.give_back(self)
        else:
            self.close()
        answer.set_result(result)

    def send(self, request: bytes, timeout_s: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        answer = self.answer = loop.create_future()
        self.transport.write(request)
        timer = loop.call_later(timeout_s, self.fail, TimeoutError(f"kv store did not answer within {timeout_s:g} s"))
        answer.add_done_callback(lambda fut: self._finished(fut, timer))
        return answer

    def _finished(self, answer: asyncio.Future, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if answer.cancelled():  # the caller gave up mid-call: what is left on this connection is unknown
            self.close()

    def fail(self, exc: Exception) -> None:
        answer, self.answer = self.answer, None
        self.close()
        if answer is not None and not answer.done():
            answer.set_exception(exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.channel.forget(self)
            if self.transport is not None:
                self.transport.close()


class JsonChannel:
    """Pooled connections to one store for JSON calls; see the module docstring."""

    IDLE_S = 30.0  # well below the store's keep-alive timeout (aiohttp: 75 s)
    MAX_IDLE = 8

    def __init__(self, address: str, *, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> None:
        self.host, port = address.rsplit(":", 1)
        self.host = self.host.strip("[]")
        self.port = int(port)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self._head = f"Host: {address}\r\n{extra}Content-Type: application/json\r\nContent-Length: ".encode()
        self.timeout_s = timeout_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def call(self, method: str, path: str, body: bytes = b"") -> asyncio.Future:
        """Send ``method path`` with a JSON ``body``; the future's result is (status, answer body).
        ``path`` must be percent-quoted already."""
        request = b"%s %s HTTP/1.1\r\n%s%d\r\n\r\n%s" % (method.encode(), path.encode(), self._head, len(body), body)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to the loop that made them
            self._close_all()
            self._loop = loop
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < self.IDLE_S and not conn.closed:
                return conn.send(request, self.timeout_s)
            conn.close()
        return loop.create_task(self._connect_and_send(request))

    async def _connect_and_send(self, request: bytes) -> tuple[int, bytes]:
        _, conn = await asyncio.wait_for(
            asyncio.get_running_loop().create_connection(lambda: _Connection(self), self.host, self.port),
            self.timeout_s)
        self._open.add(conn)
        return await conn.send(request, self.timeout_s)

    def give_back(self, conn: _Connection) -> None:
        if len(self._idle) >= self.MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _close_all(self) -> None:
        for conn in list(self._open):
            try:
                conn.close()
            except RuntimeError:  # its loop is closed already: nothing left to close
                pass
        self._open.clear()
        self._idle.clear()

    async def close(self) -> None:
        self._close_all()
