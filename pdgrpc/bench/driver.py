"""Send benchmark requests to a coordinator and time every token as the client sees it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from pdgrpc.bench.stats import RequestResult
from pdgrpc.bench.workloads import BenchRequest
from pdgrpc.client import AsyncClient
from pdgrpc.errors import PdgrpcError
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


async def send_one(client: AsyncClient, req: BenchRequest, res: RequestResult, t0: float,
                   timeout_s: float) -> RequestResult:
    """One streamed request; fills ``res`` (times relative to its own send)."""
    start = time.perf_counter()
    res.sent_s = start - t0
    try:
        async for ev in client.generate(req.prompt_arg(), timeout_s=timeout_s, **req.client_kwargs()):
            now = time.perf_counter() - start
            if isinstance(ev, GenerateDelta):
                if res.ttft_s is None:
                    res.ttft_s = now
                res.token_times_s.append(now)
                res.output_tokens += len(ev.token_ids)
            elif isinstance(ev, GenerateFinal):
                res.prompt_tokens = ev.prompt_tokens
                res.e2e_s = now
                res.server_prefill_s = ev.timings.prefill_seconds
                res.server_queue_s = ev.timings.queue_seconds
        if res.e2e_s is None:
            res.error = "NoFinal: stream ended without a final message"
    except PdgrpcError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        res.error = "Cancelled: benchmark stopped waiting"
        raise
    except Exception as exc:  # a benchmark reports failures; it does not stop at the first one
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_open_loop(address: str, requests: list[BenchRequest], arrivals: list[float], *,
                        timeout_s: float = 300.0, drain_timeout_s: float = 300.0,
                        on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Send request i at ``arrivals[i]`` seconds after the start, whatever is still running (open
    loop); return every result and the run's duration (first send to last answer)."""
    results = [RequestResult(r.index, r.kind, float(a)) for r, a in zip(requests, arrivals)]
    async with AsyncClient(address, timeout_s=timeout_s) as client:
        tasks: list[asyncio.Task] = []
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            await send_one(client, requests[i], results[i], t0, timeout_s)
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
    ends = [r.sent_s + r.e2e_s for r in results if r.ok]
    duration = max(ends) if ends and not pending else end - t0
    return results, duration
