"""Test fixtures: real processes on free ports, torn down after each test."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from pdgrpc.bench.cluster import free_port, port_free  # noqa: F401 -- free_port is for the tests
from pdgrpc.engine import mkl_dispatch

# Before anything loads torch: the nodes choose MKL's kernels by CPU features (pdgrpc.engine.mkl_dispatch),
# and the exactness tests' in-process references run the same kernels.
MKL_NOTE = mkl_dispatch.enable()

# One kernel plan cache for the whole run (every engine and node process it starts), new each run:
# the nodes agree with each other and with the in-process references, and no earlier state counts.
if "PDGRPC_KERNEL_PLAN_DIR" not in os.environ:
    import tempfile

    os.environ["PDGRPC_KERNEL_PLAN_DIR"] = tempfile.mkdtemp(prefix="pdgrpc-kernel-plans-")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_reserved_ports: set[int] = set()
_reserve_lock = threading.Lock()


# Prompts of the greedy exactness tests (torch and vLLM engines): disaggregated == colocated.
EXACTNESS_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colours:",
    "1, 2, 3, 4,",
    "Translate to French: good morning",
]
EXACTNESS_MAX_TOKENS = 12


def _base_ports(base: int) -> list[int]:
    ports = [base, base + 1, base + 2, *range(base + 10, base + 20), *range(base + 40, base + 50),
             *range(base + 70, base + 80)]
    return ports + [p + 1000 for p in ports]


def free_port_base() -> int:
    """A base whose derived ports (see pdgrpc.config; +1000 for metrics) are all free and not handed
    to another cluster of this test run, even one still starting in another thread (until
    ``release_port_base``: a run starts more clusters than the range holds at once). Bases stay
    below the kernel's ephemeral range (32768+), where other programs' outgoing ports land."""
    for _ in range(1000):
        base = random.randrange(10000, 31600, 100)
        ports = _base_ports(base)
        with _reserve_lock:
            if _reserved_ports.intersection(ports) or not all(port_free(p) for p in ports):
                continue
            _reserved_ports.update(ports)
        return base
    raise RuntimeError("no free port range")


def release_port_base(base: int) -> None:
    """Its ports may go to another cluster (call once every process that used them has exited)."""
    with _reserve_lock:
        _reserved_ports.difference_update(_base_ports(base))


class Proc:
    """A child process whose output is collected in the background."""

    def __init__(self, cmd: list[str], env: dict | None = None) -> None:
        self.cmd = cmd
        self.env = env
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"{self.cmd[3:5]} exited {self.proc.returncode}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.05)
        raise TimeoutError(f"no line {prefix!r} from {self.cmd}:\n" + "\n".join(self.lines[-40:]))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def pdgrpc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdgrpc", *args]


def http_json(url: str, timeout_s: float = 5.0):
    import json

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def wait_until(pred, timeout_s: float = 10.0, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


@dataclass
class LocalCluster:
    """Store, nodes and coordinator started one by one, so tests can kill any of them."""

    base: int
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def coordinator(self) -> str:
        return f"127.0.0.1:{self.base}"

    @property
    def store(self) -> str:
        return f"127.0.0.1:{self.base + 1}"

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.signal(signal.SIGKILL)
        proc.proc.wait(timeout=10)

    def restart(self, name: str, ready_prefix: str) -> None:
        """Start the same command again (same ports) after the process ended."""
        old = self.procs[name]
        self.procs[name] = Proc(old.cmd, old.env)
        self.procs[name].wait_for_line(ready_prefix, timeout_s=120)

    def store_stats(self) -> dict:
        return http_json(f"http://{self.store}/stats")["stats"]

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
        release_port_base(self.base)


def start_local_cluster(tmp_path, prefill: int = 1, decode: int = 1, node_args: tuple[str, ...] = (),
                        store_memory: str = "256MB", decode_args: tuple[str, ...] = (),
                        prefill_args: tuple[str, ...] = (), colocated: int = 0,
                        coordinator: dict | None = None, env: dict | None = None) -> LocalCluster:
    """Store, nodes and coordinator as separate processes on free ports; call .stop() after."""
    from pdgrpc import config as cfgmod
    from pdgrpc.launcher import node_command, write_toml

    base = free_port_base()
    shape = ({"mode": "colocated", "colocated": [{}] * colocated} if colocated else
             {"prefill": [{}] * prefill, "decode": [{}] * decode})
    cfg = cfgmod.from_dict({**shape, "coordinator": {"health_interval_s": 0.5, **(coordinator or {})}}, base)
    path = tmp_path / f"cluster-{base}.toml"
    write_toml(cfg, str(path))
    lc = LocalCluster(base)
    try:
        lc.procs["store"] = Proc(pdgrpc_cmd("kvstore", "--port", str(base + 1), "--max-memory", store_memory), env)
        lc.procs["store"].wait_for_line("kvstore ")
        for n in cfg.nodes:
            extra = list(node_args) + list(decode_args if n.role == "decode" else
                                           prefill_args if n.role == "prefill" else ())
            lc.procs[n.name] = Proc(node_command(n, cfg, extra), env)
        for n in cfg.nodes:
            lc.procs[n.name].wait_for_line(f"{n.role} {n.name} listening", timeout_s=300)
        lc.procs["coordinator"] = Proc(pdgrpc_cmd("coordinator", "--config", str(path), "--grace-s", "2"), env)
        lc.procs["coordinator"].wait_for_line("coordinator coordinator listening")
    except BaseException:
        lc.stop()
        raise
    return lc


@pytest.fixture
def local_cluster(tmp_path):
    """Factory: local_cluster(prefill=1, decode=1, ...) -> LocalCluster, stopped after the test."""
    made: list[LocalCluster] = []

    def make(**kwargs) -> LocalCluster:
        made.append(start_local_cluster(tmp_path, **kwargs))
        return made[-1]

    yield make
    for lc in made:
        lc.stop()


def mock_reference(prompt: str, max_tokens: int, **sampling) -> tuple[list[int], str]:
    """What the mock engine generates colocated, in this process."""
    from pdgrpc.engine.colocated import generate_colocated
    from pdgrpc.engine.mock import MockEngine
    from pdgrpc.types import SamplingParams

    engine = MockEngine()
    ids, text, _ = generate_colocated(engine, engine.tokenizer.encode(prompt),
                                      SamplingParams(max_tokens=max_tokens, **sampling))
    return ids, text
