"""What a gRPC call costs beyond its messages: a call per request against one long-lived stream.

The coordinator opens two calls per request (Prefill, a server stream; Decode, a bidi stream) and
the nodes serve them. This measures, in grpc.aio on the event loop pdgrpc runs (pdgrpc.event_loop),
the CPU that a request of 1 message in and 3 messages out costs client and server:
  call  a unary-stream call per request (what pdgrpc does)
  mux   every request as one message on a single bidi stream, answered on it (what a multiplexed
        coordinator-node protocol would do; requests told apart by an id in the message)
The server runs in a process of its own; the modes alternate, each ``--requests`` requests at
``--rate`` per second, and the script prints CPU per request on each side and mux / call.

    python tools/bench_grpc_calls.py --rate 400 --requests 3000 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2  # small stock messages: no generated code of its own needed

from pdgrpc import event_loop
from pdgrpc.bench.cluster import free_port

REQUEST, RESPONSE = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
REPLIES = 3  # PrefillStarted, KVDescriptor, PrefillDone


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


async def _serve(port: int) -> None:
    async def per_call(request, context):
        for _ in range(REPLIES):
            yield RESPONSE(status=RESPONSE.SERVING)

    async def multiplexed(requests, context):
        out: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            async for _ in requests:
                for _ in range(REPLIES):
                    out.put_nowait(RESPONSE(status=RESPONSE.SERVING))
            out.put_nowait(None)

        reader = asyncio.create_task(read())
        while (msg := await out.get()) is not None:
            yield msg
        await reader

    handler = grpc.method_handlers_generic_handler("bench.Calls", {
        "PerCall": grpc.unary_stream_rpc_method_handler(per_call, REQUEST.FromString, _serialize),
        "Multiplexed": grpc.stream_stream_rpc_method_handler(multiplexed, REQUEST.FromString, _serialize)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _client(port: int, mode: str, rate: float, n: int) -> float:
    """CPU seconds this process spent sending ``n`` requests and reading every answer."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        per_call = channel.unary_stream("/bench.Calls/PerCall", request_serializer=_serialize,
                                        response_deserializer=RESPONSE.FromString)
        multiplexed = channel.stream_stream("/bench.Calls/Multiplexed", request_serializer=_serialize,
                                            response_deserializer=RESPONSE.FromString)
        await channel.channel_ready()
        cpu0 = time.process_time()
        if mode == "call":
            async def one() -> None:
                async for _ in per_call(REQUEST(service="r")):
                    pass

            tasks = []
            for _ in range(n):
                tasks.append(asyncio.ensure_future(one()))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)
        else:
            call = multiplexed()

            async def read() -> None:
                seen = 0
                async for _ in call:
                    seen += 1
                    if seen == REPLIES * n:
                        return

            reader = asyncio.ensure_future(read())
            for _ in range(n):
                await call.write(REQUEST(service="r"))
                await asyncio.sleep(1 / rate)
            await reader
            await call.done_writing()
        return time.process_time() - cpu0


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=400.0, help="requests per second")
    p.add_argument("--requests", type=int, default=3000, help="requests per mode and round")
    p.add_argument("--rounds", type=int, default=2, help="call, mux, call, mux, ...")
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)  # the server process
    args = p.parse_args()
    if args.serve:
        event_loop.run(_serve(args.serve))
        return 0
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        server.stdout.readline()  # "ready"
        cpu: dict[str, list[tuple[float, float]]] = {"call": [], "mux": []}
        for _ in range(args.rounds):
            for mode in cpu:
                before = _cpu_seconds(server.pid)
                client = event_loop.run(_client(port, mode, args.rate, args.requests))
                cpu[mode].append((client / args.requests * 1e3,
                                  (_cpu_seconds(server.pid) - before) / args.requests * 1e3))
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"{args.requests} requests of 1 message in and {REPLIES} out at {args.rate:g}/s, {args.rounds} rounds "
          f"(median), CPU ms per request:")
    med = {m: (statistics.median(c for c, _ in v), statistics.median(s for _, s in v)) for m, v in cpu.items()}
    for mode, (client, served) in med.items():
        print(f"  {mode:5s} client {client:.3f}  server {served:.3f}  both {client + served:.3f}")
    print(f"  mux / call: client {med['mux'][0] / med['call'][0]:.2f}x, server {med['mux'][1] / med['call'][1]:.2f}x, "
          f"both {sum(med['mux']) / sum(med['call']):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
