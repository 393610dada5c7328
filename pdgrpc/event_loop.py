"""Which asyncio event loop every pdgrpc process runs: uvloop where it is installed, else asyncio's.

A request costs the cluster a few milliseconds of CPU, nearly all of it per gRPC message and call:
grpc.aio's completion-queue thread wakes the event loop for every completion, and the loop's own
scheduling (callbacks, task steps, epoll) is a large share of each. uvloop runs that scheduling in
C (libuv). Measured with ``pdgrpc bench coordinator --rates 100 200 260`` (mock engines, 16 tokens a
request, two cores), two runs on each loop, interleaved: CPU per request over the whole cluster 6-11 %
lower, 214-219 instead of 190-200 req/s served at 260 offered.

``PDGRPC_EVENT_LOOP`` chooses, for every process at once (``pdgrpc up`` passes its environment on):
``auto`` (the default: uvloop when importable), ``uvloop`` (required: start fails without it) or
``asyncio`` (the standard library's loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)
ENV = "PDGRPC_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")
T = TypeVar("T")


def loop_factory(choice: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """(the loop's name, a factory for it; None for asyncio's default). ValueError for an unknown
    choice, or ``uvloop`` asked for and not installed."""
    choice = (choice if choice is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r}: must be one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio", None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(f"{ENV}=uvloop but uvloop is not installed (pip install uvloop)") from None
        return "asyncio", None
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], choice: str | None = None) -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    try:
        name, factory = loop_factory(choice)
    except ValueError:
        main.close()  # never awaited: no "coroutine was never awaited" warning on the way out
        raise
    return _run_on(main, name, factory)


def run_process(main: Callable[[], Coroutine[Any, Any, int]], prog: str) -> int:
    """A process's entry point: ``main()`` on the chosen loop, or exit status 2 and the reason on
    stderr when PDGRPC_EVENT_LOOP names no usable loop (checked before anything starts)."""
    try:
        name, factory = loop_factory()
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return _run_on(main(), name, factory)


def _run_on(main: Coroutine[Any, Any, T], name: str, factory: Callable[[], asyncio.AbstractEventLoop] | None) -> T:
    log.info("event loop: %s", name)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
