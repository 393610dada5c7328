"""One worker thread per node runs every engine call, so engines need no locks.

Generators (prefill publishes KV group by group) are driven in the thread and their items are
handed to the event loop one by one, so the node can publish group N while group N+1 computes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


class EngineThread:
    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def iterate(self, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Run a generator in the engine thread, yielding its items as they are produced."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def drive() -> None:
            try:
                for item in make_iter():
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:  # handed to the consumer, re-raised there
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._pool, drive)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            await asyncio.shield(future)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
