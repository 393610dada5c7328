"""Several "hosts" on one machine as Linux network namespaces, each with its own pdgrpc store and
nodes, plus a coordinator: what the cross-host tests (tests/test_hosts.py) and a person trying the
several-host setup use. Needs root (``ip netns``).

Layout: a switch namespace ``pdgrpc-sw-<pid>`` holds a bridge; host *i* is namespace
``pdgrpc-h<i>-<pid>`` with ``eth0`` = 198.18.0.<i+1>/24 (the benchmarking range, RFC 2544), joined
to the bridge by a veth pair. The root namespace gets no address and no route: only these
namespaces' addresses and their loopbacks are ever used. ``rate`` shapes each host's egress with
``tc tbf``; ``link(i, up=False)`` cuts host *i* off (this kernel has no netem: no delay or loss).
Everything is removed on exit, on an exception and on SIGTERM/SIGINT; ``cleanup_stale()`` removes what
a killed run left (namespaces whose pid is gone).

  python tools/netns_hosts.py up --hosts 2 [--rate 1gbit] [--engine mock] [--transfer-engine mooncake]
  python tools/netns_hosts.py down        # what a killed run left
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

SUBNET = "198.18.0"
STORE_PORT, PREFILL_PORT, DECODE_PORT, COORDINATOR_PORT = 9015, 50061, 50071, 50051
_NAME_RE = re.compile(r"^pdgrpc-(?:h\d+|sw)-(\d+)$")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_permitted() -> tuple[bool, str]:
    """Whether this process may create network namespaces, and why not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    name = f"pdgrpc-probe-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return False, f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return True, ""


def cleanup_stale() -> int:
    """Delete pdgrpc namespaces whose creating process is gone; how many."""
    out = _ip("netns", "list", check=False).stdout
    gone = 0
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():  # a killed run's processes
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)
            gone += 1
    return gone


class Proc:
    """A process in a namespace, its output collected."""

    def __init__(self, argv: list[str], env: dict | None = None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, needle: str, timeout_s: float = 120.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"{self.argv[4:8]} exited {self.proc.returncode}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.05)
        raise TimeoutError(f"no line {needle!r} from {self.argv}:\n" + "\n".join(self.lines[-40:]))

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Hosts:
    """``n`` namespaces on one bridge (a context manager)."""

    n: int
    rate: str = ""  # e.g. "1gbit": tc tbf on each host's egress
    tag: str = field(default_factory=lambda: str(os.getpid()))
    procs: list[Proc] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"pdgrpc-sw-{self.tag}"

    def name(self, i: int) -> str:
        return f"pdgrpc-h{i}-{self.tag}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Hosts:
        cleanup_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        for i in range(self.n):
            ns = self.name(i)
            _ip("netns", "add", ns)
            # Both ends made in the switch namespace, one moved into the host: nothing in the root one.
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.switch, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                                "rate", self.rate, "burst", "256kb", "latency", "50ms"], check=True,
                               capture_output=True)

    def link(self, i: int, *, up: bool) -> None:
        """Connect or cut host ``i`` (its switch port; its own address and routes stay)."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "up" if up else "down")

    def run(self, i: int, argv: list[str], env: dict | None = None) -> Proc:
        """Start ``argv`` in host ``i``; stopped by ``close``."""
        proc = Proc(["ip", "netns", "exec", self.name(i), *argv], env)
        self.procs.append(proc)
        return proc

    def python(self, i: int, code: str, *args: str, env: dict | None = None, timeout_s: float = 120.0) -> str:
        """Run Python ``code`` in host ``i`` (its stdout; RuntimeError with its output if it fails)."""
        done = subprocess.run(["ip", "netns", "exec", self.name(i), sys.executable, "-c", code, *args],
                              capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                              env={**os.environ, **(env or {})})
        if done.returncode != 0:
            raise RuntimeError(f"python in {self.name(i)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def put(self, i: int, store: str, size: int, key: str, owner: str) -> dict:
        """Put ``size`` bytes under ``key`` in ``store`` from host ``i``; the descriptor fields (PUT_SCRIPT)."""
        return json.loads(self.python(i, PUT_SCRIPT, store, str(size), key, owner).strip().splitlines()[-1])

    def fetch(self, i: int, url: str) -> str:
        """GET ``url`` from inside host ``i`` (e.g. a node's /metrics)."""
        return self.python(i, "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10)"
                              ".read().decode())", url)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        for i in range(self.n):
            _ip("netns", "del", self.name(i), check=False)
        _ip("netns", "del", self.switch, check=False)


# Run in a host: put one entry of argv[2] bytes (a repeating byte pattern) under key argv[3], owner
# argv[4], in the store at argv[1] (its shm arena on that host), and print the fields of its descriptor.
PUT_SCRIPT = """
import asyncio, json, sys
from pdgrpc.kvstore.client import KVStoreClient
async def main():
    async with KVStoreClient(sys.argv[1]) as c:
        p = await c.put(sys.argv[3], bytes(range(256)) * (int(sys.argv[2]) // 256), owner=sys.argv[4], lease_s=600)
    print(json.dumps({"key": p.key, "size_bytes": p.size, "crc32": p.crc32, "shm_name": p.shm_name,
                      "shm_offset": p.shm_offset, "transfer_endpoint": p.transfer_endpoint,
                      "transfer_address": p.transfer_address}))
asyncio.run(main())
"""


def pdgrpc(*args: str) -> list[str]:
    return [sys.executable, "-m", "pdgrpc", *args]


@dataclass
class HostCluster:
    """A store per host, nodes by role per host, a coordinator on host 0."""

    hosts: Hosts
    roles: list[tuple[str, ...]]  # per host: ("prefill", "decode"), ("prefill",), ...
    engine: str = "mock"
    model: str = ""
    transfer_engine: str = ""  # "mooncake": every store registers its arenas with a TransferEngine
    coordinator_host: int = 0
    env: dict = field(default_factory=dict)
    stores: list[Proc] = field(default_factory=list)
    config_path: str = ""

    def store_address(self, i: int) -> str:
        return f"{self.hosts.ip(i)}:{STORE_PORT}"

    @property
    def coordinator_address(self) -> str:
        return f"{self.hosts.ip(self.coordinator_host)}:{COORDINATOR_PORT}"

    def start(self) -> HostCluster:
        env = {"PDGRPC_PEER_STORES": "*", **self.env}
        started: list[tuple[Proc, str]] = []
        for i in range(self.hosts.n):
            args = ["kvstore", "--host", self.hosts.ip(i), "--port", str(STORE_PORT), "--max-memory", "1GB"]
            if self.transfer_engine:
                args += ["--transfer-engine", self.transfer_engine]
            store = self.hosts.run(i, pdgrpc(*args), env)
            self.stores.append(store)
            started.append((store, "listening on"))
        nodes = []
        for i, roles in enumerate(self.roles):
            for role in roles:
                port = PREFILL_PORT if role == "prefill" else DECODE_PORT
                args = [role, "--name", f"{role}-h{i}", "--host", self.hosts.ip(i), "--port", str(port),
                        "--metrics-port", str(port + 1000), "--store", self.store_address(i), "--engine", self.engine]
                if self.model:
                    args += ["--model", self.model]
                started.append((self.hosts.run(i, pdgrpc(*args), env), "listening on"))
                nodes.append((role, f"{role}-h{i}", self.hosts.ip(i), port))
        for proc, needle in started:
            proc.wait_for_line(needle)
        fd, self.config_path = tempfile.mkstemp(prefix="pdgrpc-hosts-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            here = self.hosts.ip(self.coordinator_host)
            f.write(f'[store]\nhost = "{here}"\nport = {STORE_PORT}\n'
                    f'[coordinator]\nhost = "{here}"\nport = {COORDINATOR_PORT}\nhttp_port = 0\n'
                    f'health_interval_s = 0.5\n[defaults]\nengine = "{self.engine}"\n')
            for role, name, host, port in nodes:
                f.write(f'[[{role}]]\nname = "{name}"\nhost = "{host}"\nport = {port}\n')
        coord = self.hosts.run(self.coordinator_host, pdgrpc("coordinator", "--config", self.config_path), env)
        coord.wait_for_line("listening on")
        return self

    def close(self) -> None:
        self.hosts.close()
        if self.config_path:
            with contextlib.suppress(OSError):
                os.unlink(self.config_path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="N hosts, each with a store, a prefill and a decode node; a coordinator")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--rate", default="", help="tc tbf rate per host, e.g. 1gbit")
    up.add_argument("--engine", default="mock")
    up.add_argument("--model", default="")
    up.add_argument("--transfer-engine", default="", choices=("", "mooncake"))
    sub.add_parser("down", help="remove namespaces a killed run left")
    args = parser.parse_args()
    if args.cmd == "down":
        print(f"removed {cleanup_stale()} namespaces")
        return 0
    ok, why = netns_permitted()
    if not ok:
        print(f"netns_hosts: {why}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Hosts(args.hosts, rate=args.rate) as hosts:
        cluster = HostCluster(hosts, [("prefill", "decode")] * args.hosts, engine=args.engine, model=args.model,
                              transfer_engine=args.transfer_engine)
        try:
            cluster.start()
            for i in range(args.hosts):
                print(f"host {i}: netns {hosts.name(i)} address {hosts.ip(i)} store {cluster.store_address(i)}")
            print(f"coordinator {cluster.coordinator_address} (in {hosts.name(0)}): "
                  f"ip netns exec {hosts.name(0)} pdgrpc generate --coordinator {cluster.coordinator_address} ...")
            print("Ctrl-C tears everything down", flush=True)
            stop.wait()
        finally:
            cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
