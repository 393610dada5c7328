"""Membership (pdgrpc.membership): node records, the [membership] config, the pool following it, etcd
registration and watch with real processes, and `pdgrpc up` restarting a node that dies.

The etcd tests start their own throwaway etcd on free ports (never 2379) and skip only where the
`etcd` binary is absent (`make system-deps` installs Debian's etcd-server)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import Proc, free_port, free_port_base, http_json, pdgrpc_cmd, wait_until

from pdgrpc import config as cfgmod
from pdgrpc.client import Client
from pdgrpc.membership import NodeRecord, RecordError
from pdgrpc.types import NodeHealth

needs_etcd = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="no etcd binary (make system-deps installs Debian's etcd-server)")


# ---- fast: records, config, pool, backoff ----------------------------------------------------

@pytest.mark.fast
def test_node_record_json_round_trip_and_refusals():
    r = NodeRecord("decode-3", "decode", "10.0.0.7:50071", "gpu-7", "10.0.0.7:50052", "abc123", 64)
    assert NodeRecord.from_json(r.to_json()) == r
    # Keys a newer writer adds are ignored, not fatal.
    assert NodeRecord.from_json(r.to_json()[:-1] + ', "gpu": "H200"}') == r
    for bad in (b"\x80not json", "[1, 2]", '{"name": "a", "role": "router", "address": "h:1"}',
                '{"name": "", "role": "decode", "address": "h:1"}', '{"name": "a", "role": "decode"}',
                '{"name": "a", "role": "decode", "address": "h:1", "max_requests": -1}',
                '{"name": "a", "role": "decode", "address": "h:1", "max_requests": true}',
                '{"name": "a", "role": "decode", "address": "h:1", "host": 5}'):
        with pytest.raises(RecordError):
            NodeRecord.from_json(bad)


@pytest.mark.fast
def test_membership_config_validated():
    cfg = cfgmod.from_dict({"prefill": [{}], "decode": [{}]})
    assert cfg.membership.etcd == ""  # default: the static lists, no etcd
    # With etcd the file need not list nodes: they register themselves.
    cfg = cfgmod.from_dict({"membership": {"etcd": "http://10.0.0.5:2379", "lease_ttl_s": 3}})
    assert (cfg.membership.etcd, cfg.membership.lease_ttl_s, cfg.nodes) == ("http://10.0.0.5:2379", 3, ())
    several = "http://10.0.0.5:2379, http://10.0.0.6:2379,http://10.0.0.7:2379"
    assert cfgmod.from_dict({"membership": {"etcd": several}}).membership.etcd == several
    with pytest.raises(cfgmod.ConfigError, match="URL"):
        cfgmod.from_dict({"membership": {"etcd": "http://10.0.0.5:2379,10.0.0.6:2379"}})
    with pytest.raises(cfgmod.ConfigError, match="at least one prefill"):
        cfgmod.from_dict({})
    for bad, what in (({"lease_ttl_s": 1}, "lease_ttl_s"), ({"lease_ttl_s": 2.5}, "lease_ttl_s"),
                      ({"etcd": "10.0.0.5:2379"}, "URL"), ({"prefix": "pdgrpc"}, "prefix"),
                      ({"ttl": 5}, "unknown keys")):
        with pytest.raises(cfgmod.ConfigError, match=what):
            cfgmod.from_dict({"membership": {"etcd": "http://127.0.0.1:2379", **bad}})


@pytest.mark.fast
async def test_pool_follows_membership_changes():
    from pdgrpc.coordinator.pool import NodePool

    pool = NodePool([], interval_s=0.5)
    a = NodeRecord("prefill-a", "prefill", "127.0.0.1:1", "h1", "127.0.0.1:2")
    b = NodeRecord("decode-b", "decode", "127.0.0.1:3", "h2", "127.0.0.1:2")
    pool.apply({"prefill-a": a, "decode-b": b})
    assert sorted(n.name for n in pool.nodes) == ["decode-b", "prefill-a"]
    first_b = next(n for n in pool.nodes if n.name == "decode-b")
    first_b.inflight = 1
    # b moves to another address (restarted elsewhere): a new handle; a leaves.
    b2 = NodeRecord("decode-b", "decode", "127.0.0.1:4", "h3", "127.0.0.1:2")
    pool.apply({"decode-b": b2})
    assert [(n.name, n.address) for n in pool.nodes] == [("decode-b", "127.0.0.1:4")]
    assert [(s.name, s.host) for s in pool.status()] == [("decode-b", "h3")]
    assert len(pool._background) == 2  # both old handles wait for their requests before closing
    first_b.inflight = 0
    await pool.close()


@pytest.mark.fast
def test_launcher_restarts_with_backoff():
    from pdgrpc.launcher import RESTART_MAX_S, Cluster

    procs = Cluster()
    exit3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
    procs.start("decode-0", exit3, restartable=True)
    procs.start("store", exit3)
    procs.children[0].proc.wait()
    procs.children[1].proc.wait()
    assert procs.dead() == ["store (exit 3)"]  # the store is not restarted
    now, delays = time.monotonic(), []
    for _ in range(7):
        procs.supervise(now)                       # notices the exit, schedules
        delays.append(procs.children[0].delay_s)
        procs.supervise(now + 0.5 * delays[-1])    # too early: nothing happens
        restarts = procs.children[0].restarts
        now += delays[-1]
        procs.supervise(now)                       # due: started again
        assert procs.children[0].restarts == restarts + 1
        procs.children[0].proc.wait()
    assert delays == [1, 2, 4, 8, 16, RESTART_MAX_S, RESTART_MAX_S]
    # A process that ran a minute before dying starts over at 1 s.
    procs.supervise(now + 61)
    assert procs.children[0].delay_s == 1


@pytest.mark.fast
def test_up_passes_etcd_to_nodes_and_coordinator(tmp_path):
    from pdgrpc.launcher import node_command, write_toml

    cfg = cfgmod.from_dict({"prefill": [{}], "decode": [{}],
                            "membership": {"etcd": "http://127.0.0.1:23999", "lease_ttl_s": 3}})
    cmd = node_command(cfg.nodes[0], cfg, [])
    i = cmd.index("--etcd")
    assert cmd[i:i + 6] == ["--etcd", "http://127.0.0.1:23999", "--etcd-prefix", "/pdgrpc/", "--lease-ttl-s", "3"]
    write_toml(cfg, str(tmp_path / "c.toml"))
    assert cfgmod.load(str(tmp_path / "c.toml")).membership == cfg.membership
    # Without etcd nothing changes: no flag, no [membership] table.
    plain = cfgmod.from_dict({"prefill": [{}], "decode": [{}]})
    assert "--etcd" not in node_command(plain.nodes[0], plain, [])
    write_toml(plain, str(tmp_path / "p.toml"))
    assert "[membership]" not in (tmp_path / "p.toml").read_text()


# ---- e2e with etcd --------------------------------------------------------------------------

class Etcd:
    """A throwaway etcd on free ports (data in tmp_path), restartable on the same ports and data."""

    def __init__(self, tmp_path) -> None:
        self.client, self.peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.client}"
        self.cmd = ["etcd", "--name", "t", "--data-dir", str(tmp_path / "etcd"),
                    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                    "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
                    "--initial-cluster", f"t=http://127.0.0.1:{self.peer}", "--log-level", "warn"]
        self.proc: Proc | None = None
        self.start()

    def healthy(self) -> bool:
        try:
            return http_json(f"{self.url}/health", 1.0).get("health") == "true"
        except OSError:
            return False

    def start(self) -> None:
        self.proc = Proc(self.cmd)
        assert wait_until(self.healthy, 20), "etcd did not become healthy:\n" + "\n".join(self.proc.lines[-20:])

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.proc.wait(timeout=10)

    def stop(self) -> None:
        self.proc.stop()


async def _until(pred, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return pred()


@needs_etcd
@pytest.mark.e2e
async def test_watch_and_read_use_only_valid_records(tmp_path):
    """The watch (changes) and the read (a coordinator starting later) agree, and both ignore values
    that are not a record or sit under another node's key; a registration's revoke removes it."""
    from pdgrpc.membership.etcd import EtcdGateway, EtcdMembership, Registration

    etcd = Etcd(tmp_path)
    gateway, watching, later = EtcdGateway(etcd.url), EtcdMembership(etcd.url, "/t/"), None
    try:
        seen: list[dict] = []
        await watching.start(seen.append)
        assert seen == [{}] and watching.etcd_up
        d0 = NodeRecord("d0", "decode", "127.0.0.1:1", "h", "127.0.0.1:2", "fp", 8)
        registration = Registration(etcd.url, "/t/", 2, d0)
        await registration.start()
        lease = await gateway.grant(5)
        await gateway.put("/t/nodes/junk", "not json", lease)
        await gateway.put("/t/nodes/d7", NodeRecord("d9", "decode", "127.0.0.1:3").to_json(), lease)
        await gateway.put("/other/nodes/d8", NodeRecord("d8", "decode", "127.0.0.1:4").to_json(), lease)
        assert await _until(lambda: seen[-1] == {"d0": d0}), seen[-1]
        # Several members: the first one listed is down, the next one answers.
        later = EtcdMembership(f"http://127.0.0.1:{free_port()},{etcd.url}", "/t/")
        read: list[dict] = []
        await later.start(read.append)
        assert read[-1] == {"d0": d0}
        await registration.close()
        assert await _until(lambda: seen[-1] == {}), seen[-1]
    finally:
        for m in (watching, later):
            if m is not None:
                await m.close()
        await gateway.close()
        etcd.stop()


class EtcdCluster:
    """Store, coordinators and nodes as processes; nodes register in etcd, coordinators watch it."""

    def __init__(self, tmp_path, etcd: Etcd, coordinators: int = 1) -> None:
        self.etcd, self.base, self.procs = etcd, free_port_base(), {}
        self.store = f"127.0.0.1:{self.base + 1}"
        # Ports free_port_base reserved: coordinator k on base + 2k (base + 2 is no HTTP front here).
        self.coordinators = [f"127.0.0.1:{self.base + 2 * k}" for k in range(coordinators)]
        self.procs["store"] = Proc(pdgrpc_cmd("kvstore", "--port", str(self.base + 1), "--max-memory", "128MB"))
        self.procs["store"].wait_for_line("kvstore ")
        for k, address in enumerate(self.coordinators):
            port = int(address.rsplit(":", 1)[1])
            path = tmp_path / f"coordinator-{k}.toml"
            path.write_text(f'[store]\nport = {self.base + 1}\n[coordinator]\nport = {port}\nmetrics_port = '
                            f'{port + 1000}\nhttp_port = 0\nhealth_interval_s = 0.5\n[membership]\netcd = '
                            f'"{etcd.url}"\nlease_ttl_s = 2\n')
            self.procs[f"coordinator-{k}"] = Proc(pdgrpc_cmd("coordinator", "--config", str(path), "--grace-s", "1"))
            self.procs[f"coordinator-{k}"].wait_for_line("coordinator coordinator listening")

    def start_node(self, role: str, name: str, offset: int) -> Proc:
        port = self.base + offset
        self.procs[name] = Proc(pdgrpc_cmd(role, "--name", name, "--port", str(port), "--store", self.store,
                                           "--engine", "mock", "--etcd", self.etcd.url, "--lease-ttl-s", "2",
                                           "--grace-s", "1"))
        return self.procs[name]

    def status(self, k: int = 0) -> dict[str, NodeHealth]:
        with Client(self.coordinators[k]) as c:
            return {n.name: n.health for n in c.cluster_status().nodes}

    def serving(self, k: int = 0) -> set[str]:
        return {name for name, h in self.status(k).items() if h is NodeHealth.SERVING}

    def metric(self, name: str, k: int = 0) -> float:
        port = int(self.coordinators[k].rsplit(":", 1)[1]) + 1000
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            self.procs[name].stop()


@pytest.fixture
def etcd_cluster(tmp_path):
    made = []

    def make(coordinators: int = 1) -> EtcdCluster:
        etcd = Etcd(tmp_path)
        made.append(etcd)
        try:
            made.append(EtcdCluster(tmp_path, etcd, coordinators))
        except BaseException:
            etcd.stop()
            raise
        return made[-1]

    yield make
    for m in reversed(made):
        m.stop()


def _complete(address: str, prompt: str = "hello membership") -> str:
    with Client(address, timeout_s=20) as c:
        return c.complete(prompt, max_tokens=6).final.decode_node


@needs_etcd
@pytest.mark.e2e
def test_node_added_at_run_time_serves_and_a_dead_one_leaves(etcd_cluster):
    """No node in any file: nodes register in etcd; both coordinators see the same membership; a decode
    node started while serving takes requests without a coordinator restart; a SIGKILLed one leaves
    when its 2 s lease expires."""
    lc = etcd_cluster(coordinators=2)
    assert lc.status(0) == {} and lc.status(1) == {}
    lc.start_node("prefill", "p0", 10).wait_for_line("prefill p0 listening")
    lc.start_node("decode", "d0", 40).wait_for_line("decode d0 listening")
    assert wait_until(lambda: lc.serving(0) == lc.serving(1) == {"p0", "d0"}, 10), (lc.status(0), lc.status(1))
    assert _complete(lc.coordinators[0]) == "d0"

    lc.start_node("decode", "d1", 41).wait_for_line("decode d1 listening")
    t0 = time.monotonic()
    assert wait_until(lambda: "d1" in lc.serving(0) and "d1" in lc.serving(1), 10), lc.status(0)
    print(f"d1 serving in both coordinators {time.monotonic() - t0:.3f}s after it printed 'listening'")

    lc.procs["d0"].signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_until(lambda: "d0" not in lc.status(0) and "d0" not in lc.status(1), 10), lc.status(0)
    print(f"d0 left both memberships {time.monotonic() - t0:.3f}s after SIGKILL")
    # Only d1 is left to decode, and it does, through either coordinator.
    assert {_complete(a) for a in lc.coordinators} == {"d1"}
    assert any("joined the pool" in line and "d1" in line for line in lc.procs["coordinator-0"].lines)

    # A node stopped with SIGTERM leaves at once (it revokes its lease before draining).
    assert lc.procs["d1"].stop() == 0
    assert any("deregistered /pdgrpc/nodes/d1 from etcd" in x for x in lc.procs["d1"].lines)
    assert wait_until(lambda: "d1" not in lc.status(0) and "d1" not in lc.status(1), 5)


@needs_etcd
@pytest.mark.e2e
def test_etcd_killed_serving_continues_and_registration_resumes(etcd_cluster):
    lc = etcd_cluster()
    lc.start_node("prefill", "p0", 10).wait_for_line("prefill p0 listening")
    lc.start_node("decode", "d0", 40).wait_for_line("decode d0 listening")
    assert wait_until(lambda: lc.serving() == {"p0", "d0"}, 10), lc.status()
    assert lc.metric("pdgrpc_membership_etcd_up") == 1

    lc.etcd.kill()
    assert wait_until(lambda: lc.metric("pdgrpc_membership_etcd_up") == 0, 10)
    coordinator = lc.procs["coordinator-0"]
    down = re.compile(r"etcd at \S+ unreachable .*last membership")
    assert wait_until(lambda: any(down.search(x) for x in coordinator.lines), 5)
    # Serving goes on with the last membership seen, for longer than the nodes' 2 s lease.
    for i in range(8):
        assert _complete(lc.coordinators[0], f"while etcd is down {i}") == "d0"
        time.sleep(0.5)
    assert lc.serving() == {"p0", "d0"}
    assert sum(bool(down.search(x)) for x in coordinator.lines) == 1  # said once, not per retry
    node = lc.procs["d0"]
    assert wait_until(lambda: any(re.search(r"etcd at \S+ unreachable", x) for x in node.lines), 5)

    lc.etcd.start()  # same data, same ports
    assert wait_until(lambda: lc.metric("pdgrpc_membership_etcd_up") == 1, 15)
    # The node says so once it reaches etcd again (after its "unreachable" line).
    assert wait_until(lambda: re.search(r"etcd at \S+ unreachable[\s\S]*etcd at \S+ reachable",
                                        "\n".join(node.lines)), 15)
    # Registration works again: a node started now joins.
    lc.start_node("decode", "d1", 41).wait_for_line("decode d1 listening")
    assert wait_until(lambda: lc.serving() == {"p0", "d0", "d1"}, 10), lc.status()
    assert _complete(lc.coordinators[0])


# ---- e2e: pdgrpc up replaces a node that dies (no etcd) -------------------------------------

def _child_pid(launcher_pid: int, name: str) -> int | None:
    with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
        for pid in f.read().split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as c:
                    if f"--name\0{name}\0".encode() in c.read():
                        return int(pid)
            except FileNotFoundError:
                continue
    return None


@pytest.mark.e2e
def test_up_restarts_a_dead_node_and_keeps_serving():
    base = free_port_base()
    # 20 ms per decode step: a 200-token request runs long enough to be seen holding KV.
    up = Proc(pdgrpc_cmd("up", "--engine", "mock", "--decode", "2", "--no-pin", "--port-base", str(base),
                         "--node-arg=--mock-decode-cost-per-step-s=0.02"))
    address = f"127.0.0.1:{base}"
    try:
        up.wait_for_line("cluster ready", timeout_s=120)
        # `pdgrpc status --json` shows the running request and the KV its decode node holds.
        def long_request():
            with Client(address, timeout_s=60) as c:
                return c.complete("a long one", max_tokens=200)

        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(long_request)

            def busy() -> dict | None:
                out = subprocess.run(pdgrpc_cmd("status", "--coordinator", address, "--json"), capture_output=True,
                                     text=True, timeout=30)
                nodes = json.loads(out.stdout)["nodes"]
                return next((n for n in nodes if n["role"] == "decode" and n["info"]["running_requests"] == 1
                             and n["info"]["kv_cache_bytes"] > 0 and n["inflight_requests"] == 1), None)

            assert wait_until(busy, 20), "no decode node reported the running request and its KV"
            assert len(long.result(timeout=60).token_ids) == 200
        old = _child_pid(up.proc.pid, "decode-1")
        assert old is not None
        os.kill(old, signal.SIGKILL)
        t0 = time.monotonic()
        up.wait_for_line("pdgrpc up: decode-1 exited with status -9", timeout_s=10)
        # Meanwhile the cluster serves, on decode-0.
        assert _complete(address) == "decode-0"
        up.wait_for_line("pdgrpc up: decode-1 restarted (restart 1", timeout_s=10)
        new = _child_pid(up.proc.pid, "decode-1")
        assert new not in (None, old)
        with Client(address) as c:
            assert wait_until(lambda: all(n.health is NodeHealth.SERVING for n in c.cluster_status().nodes), 20)
        print(f"decode-1 serving again {time.monotonic() - t0:.2f}s after SIGKILL")
        out = subprocess.run(pdgrpc_cmd("status", "--coordinator", address), capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:-1]}
        assert sorted(rows) == ["decode-0", "decode-1", "prefill-0"]
        assert rows["decode-1"][1:6] == ["decode", "127.0.0.1", f"127.0.0.1:{base + 41}", f"127.0.0.1:{base + 1}",
                                         "serving"]
        assert up.alive()
        up.proc.send_signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0
        assert "cluster stopped" in up.lines and "pdgrpc up: restarts: decode-1 1" in up.lines
    finally:
        if up.alive():
            os.killpg(up.proc.pid, signal.SIGKILL)
