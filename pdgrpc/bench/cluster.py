"""Clusters for the benchmarks, each started with ``pdgrpc up --config`` on its own free ports.

A setup is a name plus the cluster file's text. Several run at once on the same cores (idle ones cost
next to nothing), so the benchmark can interleave them and machine noise hits all of them alike.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from pdgrpc.engine.torch_options import LINEAR_KERNELS, MKL_DISPATCHES

_TICKS = os.sysconf("SC_CLK_TCK")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base(taken: set[int]) -> int:
    """A port base whose derived ports (see pdgrpc.config) and their metrics ports are all free.
    ``taken`` holds the bases already handed out: a new one is at least 2000 away from each, so a
    cluster's metrics ports (+1000) never meet another's gRPC ports while both are still starting.
    Bases stay below the kernel's ephemeral range (32768+)."""
    for _ in range(500):
        base = random.randrange(20000, 31000, 100)
        if any(abs(base - other) < 2000 for other in taken):
            continue
        ports = [base, base + 1, base + 2, *range(base + 10, base + 14), *range(base + 40, base + 44),
                 *range(base + 70, base + 74)]
        if all(port_free(p) and port_free(p + 1000) for p in ports):
            taken.add(base)
            return base
    raise RuntimeError("no free port range")


@dataclass(frozen=True)
class NodeSpec:
    role: str  # prefill | decode | colocated
    cpus: tuple[int, ...] = ()
    threads: int = 0


@dataclass(frozen=True)
class SetupSpec:
    """One cluster shape to benchmark."""

    name: str
    nodes: tuple[NodeSpec, ...]
    description: str = ""
    coordinators: int = 1  # coordinator processes on the one port
    engine_overrides: tuple[tuple[str, object], ...] = ()  # [defaults] keys this setup sets otherwise

    @property
    def mode(self) -> str:
        return "colocated" if all(n.role == "colocated" for n in self.nodes) else "disaggregated"

    def config_text(self, base: int, engine: dict, max_inflight: int = 4096) -> str:
        lines = [f"port_base = {base}", f'mode = "{self.mode}"', "", "[store]", 'max_memory = "4GB"', "",
                 "[coordinator]", f"max_inflight = {max_inflight}", f"processes = {self.coordinators}", "",
                 "[defaults]"]
        for k, v in {**engine, **dict(self.engine_overrides)}.items():
            lines.append(f"{k} = {_toml(v)}")
        for n in self.nodes:
            lines += ["", f"[[{n.role}]]", f"cpus = {list(n.cpus)}"]
            if n.threads:
                lines.append(f"threads = {n.threads}")
        return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def split_cores(cores: list[int]) -> tuple[list[int], list[int]]:
    """The disaggregated pinning every benchmark uses: prefill on the first half of the cores, decode
    on the rest (both on the one core when there is only one)."""
    half = max(len(cores) // 2, 1)
    return list(cores[:half]), list(cores[half:] or cores)


def standard_setups(cores: list[int]) -> dict[str, SetupSpec]:
    """The shapes compared on this machine's cores (P:D on separate cores needs at least two)."""
    first, rest = map(tuple, split_cores(cores))
    every = tuple(cores)
    specs = [
        SetupSpec("disagg", (NodeSpec("prefill", first), NodeSpec("decode", rest)),
                  f"1 prefill on cores {list(first)}, 1 decode on cores {list(rest)}"),
        SetupSpec("disagg-shared", (NodeSpec("prefill", every), NodeSpec("decode", every)),
                  f"1 prefill and 1 decode, both allowed on cores {list(every)} (decode: half the threads)"),
        SetupSpec("colocated", (NodeSpec("colocated", every),),
                  f"1 colocated node on cores {list(every)}, {len(every)} threads"),
        SetupSpec("colocated-split", tuple(NodeSpec("colocated", (c,)) for c in cores),
                  f"{len(cores)} colocated nodes, one per core"),
    ]
    return {s.name: s for s in specs}


def setup_variant(name: str, known: dict[str, SetupSpec]) -> SetupSpec:
    """A standard setup, or one with engine options changed, each after an ``@``: ``@chunkN`` prefills in
    chunks of N tokens (0: none), ``@linear-KERNEL`` picks the torch engine's linear kernel (onednn or
    torch). One run can so compare, say, disaggregated serving with chunks against colocated serving
    with and without them (``colocated@chunk256``), or the two kernels (``disagg@linear-torch``).
    ValueError for anything else."""
    base, *options = name.split("@")
    if base not in known:
        raise ValueError(f"unknown setup {base!r}; choose from {sorted(known)}")
    if not options:
        return known[base]
    desc, overrides = known[base].description, []
    for option in options:
        if option.startswith("chunk") and option[5:].isdigit():
            tokens = int(option[5:])
            desc += f", prefill in chunks of {tokens} tokens" if tokens else ", prefill without chunks"
            overrides.append(("prefill_chunk_tokens", tokens))
        elif option.startswith("linear-") and option[7:] in LINEAR_KERNELS:
            desc += f", {option[7:]} linear kernel"
            overrides.append(("linear_kernel", option[7:]))
        elif option.startswith("mkl-") and option[4:] in MKL_DISPATCHES:
            desc += f", MKL kernels by CPU {option[4:]}"
            overrides.append(("mkl_dispatch", option[4:]))
        else:
            raise ValueError(f"setup {name!r}: options are @chunkN (prefill in chunks of N tokens; 0: none), "
                             f"@linear-KERNEL (KERNEL: {', '.join(LINEAR_KERNELS)}) and @mkl-HOW "
                             f"(HOW: {', '.join(MKL_DISPATCHES)})")
    return dataclasses.replace(known[base], name=name, description=desc, engine_overrides=tuple(overrides))


def process_role(pid: int) -> str:
    """coordinator / prefill-N / decode-N / colocated-N / store, from a child's command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    if "kvstore" in argv:
        return "store"
    if "coordinator" in argv:
        worker = argv[argv.index("--worker") + 1] if "--worker" in argv else "0"
        return "coordinator" if worker == "0" else f"coordinator-{worker}"
    for role in ("prefill", "decode", "colocated"):
        if role in argv:
            name = argv[argv.index("--name") + 1] if "--name" in argv else role
            return name
    return "?"


def children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and of every process below it alive now: a vLLM node's (or server's) model
    runs in engine-core processes it spawned, which its own counters leave out."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu_seconds(p)
        todo += children(p)
    return total


@dataclass
class Setup:
    """A running cluster: the ``pdgrpc up`` process and where its coordinator listens."""

    spec: SetupSpec
    engine: dict
    base: int = 0
    proc: subprocess.Popen | None = None
    config_path: str = ""
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.base}"

    def start(self, taken: set[int]) -> "Setup":
        self.base = free_base(taken)
        fd, self.config_path = tempfile.mkstemp(prefix=f"bench-{self.name}-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(self.spec.config_text(self.base, self.engine))
        self.proc = subprocess.Popen([sys.executable, "-m", "pdgrpc", "up", "--config", self.config_path],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("cluster ready"):
                self.ready.set()

    def wait(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-30:])
                raise RuntimeError(f"setup {self.name} did not start:\n{tail}")

    def pids(self) -> dict[str, int]:
        """Role name -> pid of every process of the cluster."""
        if self.proc is None:
            return {}
        return {process_role(p): p for p in children(self.proc.pid)}

    def cpu_by_process(self) -> dict[str, float]:
        return {role: cpu_seconds(pid) for role, pid in self.pids().items()}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.config_path:
            try:
                os.unlink(self.config_path)
            except OSError:
                pass


def start_setups(specs: list[SetupSpec], engine: dict, timeout_s: float = 600) -> list[Setup]:
    """Start every setup at once and wait for all; on failure stop those already started."""
    taken: set[int] = set()
    setups = [Setup(s, engine) for s in specs]
    try:
        for s in setups:
            s.start(taken)
        for s in setups:
            s.wait(timeout_s)
    except BaseException:
        for s in setups:
            s.stop()
        raise
    return setups


def machine_info() -> dict:
    """What the numbers ran on."""
    info = {"cpus_allowed": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    for dist in ("torch", "transformers", "grpcio", "aiohttp"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info
