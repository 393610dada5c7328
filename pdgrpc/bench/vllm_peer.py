"""vLLM's own disaggregated serving, started on given cores so the benchmarks can compare pdgrpc with it.

The setup is the one of vLLM's disaggregated prefill example, with its debugging KV connector:

  producer  ``python -m vllm.entrypoints.openai.api_server`` with ``ExampleConnector``,
            ``kv_role="kv_producer"``: every prompt's KV is written as safetensors files (one per
            layer) under a shared storage folder, keyed by a hash of the prompt's token ids
  consumer  the same server with ``kv_role="kv_consumer"``: a prompt whose files exist is loaded
            from them instead of recomputed (all but its last partial block)
  proxy     for each ``/v1/completions`` request: the prompt to the producer with ``max_tokens=1``
            (read to the end, so the files are written), then the real request to the consumer,
            whose answer is streamed back as is; then the prompt's files are removed (see
            ``make_proxy_app``: left there, they would serve the next request with the same prompt)

The producer runs with chunked prefill off. ExampleConnector saves a prompt's KV only in the step
that first schedules the request, from that step's blocks; when several prompts in flight exceed the
step's token budget (2048) and vLLM chunks one, the first chunk is saved under the whole prompt's key,
and the consumer's engine dies loading it (seen here under load: ``RuntimeError: shape mismatch: value
tensor of shape [128, 3, 128] cannot be broadcast to indexing result of shape [512, 3, 128]`` in
``inject_kv_into_layer``, then ``EngineDeadError`` for every request). Without chunking a prompt of up
to ``max_model_len`` tokens is prefilled in one step; one request at a time nothing changes.

Fairness with pdgrpc's vLLM nodes (pdgrpc.engine.vllm_engine): the same model folder, dtype,
``enforce_eager``, block size 32, ``max_model_len``, prefix caching off, seed 0 and KV cache size
(``VLLM_CPU_KVCACHE_SPACE``, default 1 GiB). Each server is pinned with ``taskset`` to its cores
and its OpenMP threads bound to them (``VLLM_CPU_OMP_THREADS_BIND``): two vLLM engines on shared
cores must be kept apart, since vLLM's worker busy-polls for a second after each step. The storage
folder is a fresh temporary folder on /dev/shm (tmpfs) when there is one, so the example connector's
files never touch a disk; it is removed on stop.

The proxy runs as its own process (``python -m pdgrpc.bench.vllm_peer --port P --prefill URL
--decode URL``), like pdgrpc's coordinator, unpinned like it, and keeps its upstream connections
open (vLLM's example opens new ones per request). ``time_request`` times one streamed request
through it, at the client. tools/bench_vllm.py runs this peer beside pdgrpc's vLLM setups, and
``pdgrpc bench serve --engine vllm --peer vllm`` as one of its setups (``VllmNativeDisagg`` is
setup-like; pdgrpc.bench.driver.OpenAISender sends its requests).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from pdgrpc.bench.cluster import free_port, tree_cpu_seconds

PEER_NAME = "vllm-native-disagg"  # its setup name in the benchmarks' reports
SERVED_NAME = "smollm2"
BLOCK_SIZE = 32          # as pdgrpc.engine.vllm_engine (CPU attention wants a multiple of 32)
MAX_MODEL_LEN = 2048     # as pdgrpc.engine.vllm_engine
CONNECTOR = "ExampleConnector"
HIT_LINE = "External Cache Hit"  # the consumer's log line for a prompt loaded from the producer's files


# ---- the proxy -----------------------------------------------------------------------------------

def prefill_body(body: dict) -> dict:
    """The producer's copy of a request: one token, not streamed (the proxy only waits for it)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "max_completion_tokens")}
    out["max_tokens"] = 1
    return out


def kv_folder(storage: str, prompt: object, block_size: int = BLOCK_SIZE) -> str | None:
    """Where ExampleConnector keeps a token-id prompt's KV (vLLM 0.32 example_connector.py: md5 of the
    int64 bytes of the first ``(len - 2) // block_size * block_size`` tokens); None for a text prompt."""
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        return None
    n = (len(prompt) - 2) // block_size * block_size  # a negative n slices like vLLM's tensor does
    return os.path.join(storage, hashlib.md5(array.array("q", prompt[:n]).tobytes(), usedforsecurity=False).hexdigest())


def make_proxy_app(prefill_url: str, decode_url: str, timeout_s: float = 600.0, storage: str = ""):
    """An aiohttp app: POST /v1/completions through producer then consumer; GET /health. With
    ``storage`` (the connector's folder), a token-id prompt's KV files are removed once no request
    in flight has that prompt: each request hands its KV over once, as with a transfer connector
    (left there, the files are a cache for the next request with the same prompt, on both servers,
    and /dev/shm fills up: 47 MB per 1,024-token prompt)."""
    import aiohttp
    from aiohttp import web

    session_key = web.AppKey("session", aiohttp.ClientSession)
    in_flight: dict[str, int] = {}  # KV folder -> requests using it

    async def session_ctx(app: web.Application):
        # one pooled session for all requests: no connection set-up on the measured path
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
            app[session_key] = s
            yield

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        folder = kv_folder(storage, body.get("prompt")) if storage else None
        if folder is None:
            return await forward(request, body)
        in_flight[folder] = in_flight.get(folder, 0) + 1
        try:
            return await forward(request, body)
        finally:
            in_flight[folder] -= 1
            if not in_flight[folder]:  # the consumer loaded the KV before its first token: done with it
                del in_flight[folder]
                await asyncio.to_thread(shutil.rmtree, folder, True)

    async def forward(request: web.Request, body: dict) -> web.StreamResponse:
        session = request.app[session_key]
        async with session.post(f"{prefill_url}/v1/completions", json=prefill_body(body)) as r:
            data = await r.read()  # the KV files are written once the producer has answered
            if r.status != 200:
                return web.Response(status=r.status, body=data, content_type=r.content_type)
        async with session.post(f"{decode_url}/v1/completions", json=body) as r:
            if not body.get("stream") or r.status != 200:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)
            out = web.StreamResponse(status=r.status, headers={"Content-Type": r.headers.get(
                "Content-Type", "text/event-stream")})
            await out.prepare(request)
            try:
                async for chunk in r.content.iter_any():  # pass each chunk on as soon as it arrives
                    await out.write(chunk)
                await out.write_eof()
            except ConnectionResetError:
                pass  # the client went away: nothing left to send it
            return out

    async def health(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    return app


def proxy_main(argv: list[str] | None = None) -> int:
    from aiohttp import web

    p = argparse.ArgumentParser(description="vLLM disaggregated-prefill proxy (producer max_tokens=1, then consumer)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefill", required=True, help="producer base URL, e.g. http://127.0.0.1:8100")
    p.add_argument("--decode", required=True, help="consumer base URL")
    p.add_argument("--storage", default="", help="the connector's folder: remove a prompt's KV once served")
    a = p.parse_args(argv)
    web.run_app(make_proxy_app(a.prefill.rstrip("/"), a.decode.rstrip("/"), storage=a.storage), host="127.0.0.1",
                port=a.port, print=None, access_log=None)
    return 0


# ---- the two servers and the proxy ---------------------------------------------------------------

def cpu_list(cpus: list[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def model_max_len(folder: str) -> int:
    """min(2048, max_position_embeddings): what pdgrpc's vLLM engine uses."""
    with open(os.path.join(folder, "config.json")) as f:
        return min(MAX_MODEL_LEN, int(json.load(f).get("max_position_embeddings", MAX_MODEL_LEN)))


def server_command(folder: str, port: int, role: str, storage: str, dtype: str) -> list[str]:
    transfer = {"kv_connector": CONNECTOR, "kv_role": role,
                "kv_connector_extra_config": {"shared_storage_path": storage}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--enforce-eager", "--block-size", str(BLOCK_SIZE), "--max-model-len", str(model_max_len(folder)),
           "--no-enable-prefix-caching", "--seed", "0", "--kv-transfer-config", json.dumps(transfer)]
    if role == "kv_producer":
        # ExampleConnector cannot store a chunked prompt (see the module docstring): never chunk one
        cmd.append("--no-enable-chunked-prefill")
    return cmd


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen
    log_path: str
    url: str
    cmd: list[str]

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            # ExampleConnector warns on every step without attention metadata: leave those out
            return "".join([line for line in f if "attn_metadata is None" not in line][-n:])
        return ""


class VllmNativeDisagg:
    """Producer on ``prefill_cores``, consumer on ``decode_cores``, proxy in front; ``url`` is the proxy.

    Also a setup of `pdgrpc bench serve` (like pdgrpc.bench.cluster.Setup: ``name``, ``address``,
    ``start``/``wait``/``stop``, ``cpu_by_process``); its ``address`` is an http:// URL, which
    pdgrpc.bench.driver.open_sender drives through OpenAI ``/v1/completions``."""

    mode = "peer"  # neither of pdgrpc's modes: bench serve compares it with pdgrpc's disaggregated setups

    def __init__(self, prefill_cores: list[int], decode_cores: list[int], model: str = "", dtype: str = "float32",
                 start_timeout_s: float = 600.0, name: str = PEER_NAME, preload: str = "") -> None:
        """``preload``: a shared library for the servers' LD_PRELOAD (pdgrpc's MKL feature-dispatch shim,
        so vLLM gets the MKL kernels pdgrpc's torch engine gets; see pdgrpc.engine.mkl_dispatch)."""
        self.name = name
        self.preload = preload
        self.prefill_cores, self.decode_cores = list(prefill_cores), list(decode_cores)
        self.model, self.dtype, self.start_timeout_s = model, dtype or "float32", start_timeout_s
        self.procs: list[_Proc] = []
        self.tmp = ""
        self.url = ""
        self.start_s = 0.0
        self._t0 = 0.0

    @property
    def address(self) -> str:
        return self.url

    @property
    def description(self) -> str:
        return (f"vLLM's own disaggregated serving: producer server on cores {self.prefill_cores}, consumer on "
                f"cores {self.decode_cores}, {CONNECTOR} on tmpfs, proxy (unpinned)"
                + (", MKL kernels by CPU features (pdgrpc's shim preloaded)" if self.preload else ""))

    def config_text(self) -> str:
        """The servers' and the proxy's command lines as launched (empty before ``start``)."""
        return "".join(f"{' '.join(shlex.quote(a) for a in p.cmd)}\n" for p in self.procs)

    def pids(self) -> dict[str, int]:
        """producer / consumer / proxy -> pid (vLLM's engine processes are their children)."""
        return {p.name: p.proc.pid for p in self.procs}

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds of each server (its engine processes included) and of the proxy."""
        return {name: tree_cpu_seconds(pid) for name, pid in self.pids().items()}

    def clear_kv(self) -> None:
        """Remove every prompt's KV files. ExampleConnector's files outlive their request, and both
        servers load a prompt found there instead of computing it: a prompt sent again (bench serve
        sends the same requests at every rate) would be a cache hit pdgrpc's setups never get."""
        storage = os.path.join(self.tmp, "kv") if self.tmp else ""
        if os.path.isdir(storage):
            for name in os.listdir(storage):
                shutil.rmtree(os.path.join(storage, name), ignore_errors=True)

    def __enter__(self) -> "VllmNativeDisagg":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            self.print_logs()  # the logs go with the temporary folder: show why first
        self.stop()

    def print_logs(self, lines: int = 40) -> None:
        for p in self.procs:
            print(f"---- vLLM peer {p.name} log (last {lines} lines) ----\n{p.tail(lines)}", file=sys.stderr)

    def start(self, wait: bool = True) -> "VllmNativeDisagg":
        """Launch the servers and the proxy; with ``wait`` also wait until all answer /health
        (else call ``wait``: bench serve starts its pdgrpc clusters meanwhile)."""
        from pdgrpc.model_prep import resolve_model

        self._t0 = time.monotonic()
        folder = resolve_model(self.model, self.dtype)
        self.tmp = tempfile.mkdtemp(prefix="pdgrpc-vllm-peer-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        storage = os.path.join(self.tmp, "kv")
        os.makedirs(storage)
        try:
            # both engines start at once: they are pinned apart, so neither slows the other much
            producer = self._server("producer", folder, "kv_producer", storage, self.prefill_cores)
            consumer = self._server("consumer", folder, "kv_consumer", storage, self.decode_cores)
            port = free_port()
            self._spawn("proxy", [sys.executable, "-m", "pdgrpc.bench.vllm_peer", "--port", str(port),
                                  "--prefill", producer.url, "--decode", consumer.url, "--storage", storage],
                        os.environ.copy(),
                        f"http://127.0.0.1:{port}")
        except BaseException:
            self.stop()
            raise
        self.url = self.procs[-1].url
        return self.wait(self.start_timeout_s) if wait else self

    def wait(self, timeout_s: float | None = None) -> "VllmNativeDisagg":
        """Until every process answers /health; on failure print the logs, stop all and raise."""
        try:
            self._wait_healthy(self.start_timeout_s if timeout_s is None else timeout_s)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                self.print_logs()
            self.stop()
            raise
        self.start_s = time.monotonic() - self._t0
        return self

    def _server(self, name: str, folder: str, role: str, storage: str, cores: list[int]) -> _Proc:
        port = free_port()
        env = os.environ.copy()
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(cores)  # with a connector vLLM keeps no core back itself
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if self.preload:
            env["LD_PRELOAD"] = " ".join(filter(None, (self.preload, env.get("LD_PRELOAD", ""))))
        cmd = ["taskset", "-c", cpu_list(cores), *server_command(folder, port, role, storage, self.dtype)]
        return self._spawn(name, cmd, env, f"http://127.0.0.1:{port}")

    def _spawn(self, name: str, cmd: list[str], env: dict, url: str) -> _Proc:
        log_path = os.path.join(self.tmp, f"{name}.log")
        with open(log_path, "w") as log:
            # own process group: stop() ends the server and every engine process it spawned
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)
        p = _Proc(name, proc, log_path, url, cmd)
        self.procs.append(p)
        return p

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(self.procs)
        while waiting:
            for p in list(waiting):
                if p.proc.poll() is not None:
                    raise RuntimeError(f"vLLM peer: {p.name} exited ({p.proc.returncode}):\n{p.tail()}")
                if _healthy(p.url):
                    waiting.remove(p)
            if time.monotonic() > deadline:
                names = [p.name for p in waiting]
                raise RuntimeError(f"vLLM peer: {names} not healthy in {timeout_s:.0f} s")
            time.sleep(0.5)

    def kv_loads(self) -> int:
        """How many prompts the consumer loaded from the producer's files (its log says so each time)."""
        consumer = next((p for p in self.procs if p.name == "consumer"), None)
        if consumer is None:
            return 0
        with contextlib.suppress(OSError), open(consumer.log_path, errors="replace") as f:
            return sum(HIT_LINE in line for line in f)
        return 0

    def stop(self) -> None:
        for p in self.procs:
            _signal_group(p.proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for p in self.procs:
            try:
                p.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            # the group too: engine processes may outlive the server that spawned them
            _signal_group(p.proc, signal.SIGKILL)
            p.proc.wait()
        self.procs = []
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = ""


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: the group id is the leader's pid


# ---- clients -------------------------------------------------------------------------------------

def completion_body(prompt: list[int] | str, max_tokens: int) -> dict:
    """A streamed, greedy completion of exactly ``max_tokens`` tokens, usage in the last chunk and
    each chunk's token ids (``return_token_ids``: a chunk's text may hold several tokens, or none)."""
    return {"model": SERVED_NAME, "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}


DONE: dict = {}  # what sse_event returns for ``data: [DONE]``


def sse_event(raw: bytes | str) -> dict | None:
    """The JSON object of one server-sent-event line; ``DONE`` for ``data: [DONE]``, None for others."""
    line = (raw.decode() if isinstance(raw, bytes) else raw).strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == "[DONE]" else json.loads(data)


def time_request(url: str, token_ids: list[int], max_tokens: int,
                 timeout_s: float = 600.0) -> tuple[float, float, int]:
    """(TTFT, total seconds, completion tokens) of one streamed request, measured here."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(completion_body(token_ids, max_tokens)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:500]!r}")
        ttft, n, other = None, 0, []
        for line in resp:  # read to the end of the stream, past [DONE]: the proxy then closes cleanly
            ev = sse_event(line)
            if ev is None or ev is DONE:
                continue
            if ev.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
            if not ev.get("choices") and not ev.get("usage"):
                other.append(ev)  # vLLM reports errors met after the first byte in the stream
        total = time.perf_counter() - t0
    finally:
        conn.close()
    if ttft is None or other:
        raise RuntimeError(f"no token from vLLM's disaggregated serving: {other[:2] or 'empty stream'}")
    return ttft, total, n


if __name__ == "__main__":
    sys.exit(proxy_main())
