"""Operability with the real tools: promtool, a real Prometheus server, systemd-analyze, sd_notify, drain.

The tools come from Debian (`prometheus` for promtool and the server, `systemd` for systemd-analyze;
tools/install_system_deps.sh). Without them these tests skip locally and fail when $CI is set.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, Proc, free_port, pdgrpc_cmd, start_local_cluster, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdgrpc import convert
from pdgrpc.client import Client
from pdgrpc.errors import PdgrpcError
from pdgrpc.types import DecodeStart, SamplingParams
from pdgrpc.v1 import decode_pb2_grpc

pytestmark = pytest.mark.e2e

DEPLOY = Path(ROOT) / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "pdgrpc.json"
PROM_DIR = DEPLOY / "prometheus"
UNITS = DEPLOY / "systemd"
# What Grafana would put in place of its variables when the test queries Prometheus directly.
GRAFANA_BUILTINS = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m"}
# Mock costs that make every latency non-zero: ~30-100 ms of prefill, 10 ms per decode step.
MOCK_PREFILL_COST = ("--mock-prefill-cost-per-token-s", "0.0005")
MOCK_DECODE_COST = ("--mock-decode-cost-per-step-s", "0.01")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing: CI must install it (tools/install_system_deps.sh, Debian package "
                    f"{'systemd' if name.startswith('systemd') else 'prometheus'})")
    pytest.skip(f"{name} not installed (apt-get install {'systemd' if name.startswith('systemd') else 'prometheus'})")


def http_get(url: str, timeout_s: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return resp.read()


def metrics_urls(base: int) -> dict[str, str]:
    """Every process of a start_local_cluster cluster (1 prefill, 1 decode): its /metrics URL."""
    return {
        "coordinator": f"http://127.0.0.1:{base + 1000}/metrics",
        "store": f"http://127.0.0.1:{base + 1}/metrics",
        "prefill": f"http://127.0.0.1:{base + 10 + 1000}/metrics",
        "decode": f"http://127.0.0.1:{base + 40 + 1000}/metrics",
    }


# ---- load ---------------------------------------------------------------------------------------

def run_load(coordinator: str, duration_s: float = 12.0, threads: int = 4, per_thread: int = 15) -> dict[str, int]:
    """About threads*per_thread requests spread over duration_s: mostly complete, some cancelled
    mid-stream, some with a deadline too short, a few invalid. Returns counts by what happened."""
    counts: dict[str, int] = {}
    lock = threading.Lock()
    pause = duration_s / per_thread

    def note(what: str) -> None:
        with lock:
            counts[what] = counts.get(what, 0) + 1

    def worker(t: int) -> None:
        with Client(coordinator, timeout_s=30) as client:
            for i in range(per_thread):
                started = time.monotonic()
                prompt = f"load {t} {i} " + "tokens " * (10 + 7 * ((t + i) % 5))
                kind = (t * per_thread + i) % 10
                try:
                    if kind == 7:  # cancelled during decode
                        stream = client.generate(prompt, max_tokens=64)
                        for n, _ in enumerate(stream):
                            if n == 3:
                                break
                        stream.close()
                        note("cancelled")
                    elif kind == 8:  # deadline during decode
                        client.complete(prompt, max_tokens=200, timeout_s=0.4)
                        note("ok")
                    elif kind == 9 and i % 2:  # invalid: max_tokens above the model limit
                        client.complete(prompt, max_tokens=10**6)
                        note("ok")
                    else:
                        res = client.complete(prompt, max_tokens=8 + 4 * (i % 6))
                        assert res.final.completion_tokens >= 1
                        note("ok")
                except PdgrpcError as exc:
                    note(type(exc).__name__)
                time.sleep(max(0.0, pause - (time.monotonic() - started)))

    workers = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=duration_s + 60)
    return counts


# ---- a live cluster, scraped by a real Prometheus, under load (shared by the tests below) -------

def prometheus_config(base: int, rules: Path) -> dict:
    """deploy/prometheus/prometheus.yml's jobs, pointed at this test cluster, scraped every second.
    (JSON is YAML, so no YAML library is needed to write it.)"""
    targets = {
        "pdgrpc-coordinator": [f"127.0.0.1:{base + 1000}"],
        "pdgrpc-kvstore": [f"127.0.0.1:{base + 1}"],
        "pdgrpc-prefill": [f"127.0.0.1:{base + 1010}"],
        "pdgrpc-decode": [f"127.0.0.1:{base + 1040}"],
    }
    deployed = set(re.findall(r"job_name:\s*(\S+)", (PROM_DIR / "prometheus.yml").read_text()))
    assert deployed == set(targets), f"deploy/prometheus/prometheus.yml jobs {deployed} != {set(targets)}"
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": t}]}
                           for job, t in targets.items()],
    }


class Prometheus:
    def __init__(self, workdir: Path, config: dict) -> None:
        exe = need_tool("prometheus")
        self.port = free_port()
        cfg = workdir / "prometheus.json.yml"
        cfg.write_text(json.dumps(config, indent=1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc([exe, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
                          "--storage.tsdb.retention.time=1h"])
        if not wait_until(self._ready, 30, 0.2):
            self.proc.stop()
            raise RuntimeError("prometheus did not become ready:\n" + "\n".join(self.proc.lines[-30:]))

    def _ready(self) -> bool:
        try:
            return http_get(f"{self.url}/-/ready", 1.0).startswith(b"Prometheus")
        except OSError:
            return False

    def api(self, path: str, **params) -> object:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        body = json.loads(http_get(url, 10.0))
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def loaded_cluster(tmp_path_factory):
    """A 1 prefill + 1 decode cluster with mock costs, a real Prometheus scraping it every second,
    and ~12 s of load already run. Yields (cluster, prometheus, load counts, started_at)."""
    need_tool("prometheus")
    tmp = tmp_path_factory.mktemp("operability")
    lc = start_local_cluster(tmp, prefill_args=MOCK_PREFILL_COST, decode_args=MOCK_DECODE_COST)
    prom = None
    try:
        prom = Prometheus(tmp, prometheus_config(lc.base, PROM_DIR / "pdgrpc-rules.yml"))
        # Every target up before the load starts, so rates have a sample before the first request.
        assert wait_until(lambda: len(prom.query('up{job=~"pdgrpc-.*"} == 1')) == 4, 20, 0.25), \
            prom.api("targets")
        counts = run_load(lc.coordinator)
        time.sleep(2.5)  # the last scrapes and one rule evaluation after the load
        yield lc, prom, counts
    finally:
        if prom is not None:
            prom.stop()
        lc.stop()


def test_load_had_every_outcome(loaded_cluster):
    _, _, counts = loaded_cluster
    assert counts.get("ok", 0) >= 30, counts
    assert counts.get("cancelled", 0) >= 3, counts
    assert counts.get("DeadlineExceeded", 0) >= 1, counts
    assert counts.get("InvalidArgument", 0) >= 1, counts


def test_promtool_check_metrics_passes_on_every_process(loaded_cluster):
    promtool = need_tool("promtool")
    lc, _, _ = loaded_cluster
    for name, url in metrics_urls(lc.base).items():
        text = http_get(url)
        assert b"pdgrpc_" in text, name
        res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30, check=False)
        out = (res.stdout + res.stderr).decode()
        assert res.returncode == 0 and not out.strip(), f"promtool check metrics on {name} ({url}):\n{out}"


def test_metric_labels_stay_bounded(loaded_cluster):
    """No request ids or other unbounded values in any label, and the model label is filled in."""
    lc, _, _ = loaded_cluster
    allowed = {"role", "node", "model", "phase", "outcome", "reason", "location", "path", "api", "le", "quantile"}
    for name, url in metrics_urls(lc.base).items():
        for line in http_get(url).decode().splitlines():
            if not line.startswith("pdgrpc_") or "{" not in line:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.index("}") + 1]))
            assert set(labels) <= allowed, (name, line)
            assert all(len(v) <= 64 and not re.fullmatch(r"[0-9a-f]{32}", v) for v in labels.values()), line
            if line.startswith("pdgrpc_requests_total"):
                assert labels["model"] == "mock", line


def dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                out.append((sub["title"], target["expr"]))
    return out


def grafana_substitute(expr: str) -> str:
    """Replace Grafana's variables by what Grafana would send: built-ins, then the dashboard's own
    template variables at their current value (All -> the variable's allValue)."""
    for var, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(var, value)
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        current = var.get("current", {}).get("value")
        if isinstance(current, list):
            current = current[0] if current else None
        value = var.get("allValue") or ".*" if current in (None, "$__all") else current
        expr = expr.replace("${" + var["name"] + "}", value).replace("$" + var["name"], value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert "datasource" in names and dash["templating"]["list"][names.index("datasource")]["query"] == "prometheus"
    titles = [p["title"] for p in dash["panels"]]
    assert len(titles) == len(set(titles))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
    for title, expr in dashboard_targets():
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window == "$__rate_interval", f"{title}: use [$__rate_interval], not [{window}]"
    # Panels the issue asks for, by what they show.
    exprs = " ".join(e for _, e in dashboard_targets())
    for needed in ("pdgrpc_requests_total", "pdgrpc_time_to_first_token_seconds_bucket",
                   "pdgrpc_inter_token_latency_seconds_bucket", "pdgrpc_e2e_request_latency_seconds_bucket",
                   "pdgrpc_kv_transfer_seconds_bucket", "pdgrpc_kv_transfer_bytes_total",
                   "pdgrpc_kv_transfer_bandwidth_bytes_per_second_bucket", "pdgrpc_kv_transfer_failures_total",
                   "pdgrpc_node_queue_depth", "pdgrpc_node_batch_size", "pdgrpc_node_step_seconds_sum",
                   "pdgrpc_store_bytes"):
        assert needed in exprs, needed
    assert any(p["type"] == "heatmap" for p in dash["panels"])
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(pdgrpc_time_to_first_token_seconds_bucket" in exprs
    # Provisioning files name the conventional keys.
    prov = DEPLOY / "grafana" / "provisioning"
    dashboards_yaml = (prov / "dashboards" / "pdgrpc.yaml").read_text()
    assert "apiVersion: 1" in dashboards_yaml and "type: file" in dashboards_yaml and "path:" in dashboards_yaml
    datasource_yaml = (prov / "datasources" / "prometheus.yaml").read_text()
    assert "apiVersion: 1" in datasource_yaml and "type: prometheus" in datasource_yaml


def test_every_dashboard_query_returns_data_from_a_real_prometheus(loaded_cluster):
    _, prom, _ = loaded_cluster
    empty, nan_only = [], []
    for title, expr in dashboard_targets():
        result = prom.query(grafana_substitute(expr))
        if not result:
            empty.append(f"{title}: {expr}")
        elif not any(math.isfinite(float(s["value"][1])) for s in result):
            nan_only.append(f"{title}: {expr}")
    assert not empty, "dashboard queries with no series:\n" + "\n".join(empty)
    assert not nan_only, "dashboard queries with only NaN/Inf:\n" + "\n".join(nan_only)


def test_every_metric_the_dashboard_names_exists(loaded_cluster):
    _, prom, _ = loaded_cluster
    names = set(prom.api("label/__name__/values"))
    mentioned = {m for _, e in dashboard_targets() for m in re.findall(r"\bpdgrpc_[a-z0-9_]+", e)}
    assert mentioned, "the dashboard names no pdgrpc_ metric"
    missing = sorted(mentioned - names)
    assert not missing, f"dashboard names metrics Prometheus never scraped: {missing}"


def test_node_kv_cache_gauge_rises_under_load_and_returns_to_zero(loaded_cluster):
    """Decode's KV memory is accounted per sequence and freed with it, cancels and deadlines included."""
    _, prom, _ = loaded_cluster
    peak = prom.query('max_over_time(pdgrpc_node_kv_cache_bytes{role="decode"}[1m])')
    assert peak and float(peak[0]["value"][1]) > 0, peak
    now = prom.query("pdgrpc_node_kv_cache_bytes")
    assert len(now) == 2 and all(float(s["value"][1]) == 0 for s in now), now


def test_prometheus_evaluates_the_deployed_rules(loaded_cluster):
    _, prom, _ = loaded_cluster
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 10
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # The TTFT SLO recording rule sees the load (mock costs keep every TTFT well under 1 s).
    assert wait_until(lambda: prom.query('model:pdgrpc_ttft_slo_errors:ratio_rate5m{model="mock"}'), 5, 0.5)
    # Nothing is firing on a healthy cluster.
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing


def test_readme_lists_every_metric(loaded_cluster):
    lc, _, _ = loaded_cluster
    readme = (Path(ROOT) / "README.md").read_text()
    section = readme[readme.index("## Metrics"):]
    section = section[:section.index("\n## ", 3)]
    exported = set()
    for url in metrics_urls(lc.base).values():
        exported |= set(re.findall(r"^# TYPE (pdgrpc_\w+) ", http_get(url).decode(), re.MULTILINE))
    missing = sorted(m for m in exported if m not in section)
    assert not missing, f"README's Metrics section does not list {missing}"


# ---- promtool on the deployed config and rules ----------------------------------------------------

def test_promtool_checks_config_and_rules():
    promtool = need_tool("promtool")
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "pdgrpc-rules.yml"],
                 ["test", "rules", "pdgrpc-rules.test.yml"]):
        res = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60, check=False)
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"promtool {' '.join(args)}:\n{out}"
        assert "WARNING" not in out, f"promtool {' '.join(args)}:\n{out}"
    rules = (PROM_DIR / "pdgrpc-rules.yml").read_text()
    for alert in ("PdgrpcTTFTSLOBurnFast", "PdgrpcKVTransferFailures", "PdgrpcNodeDown", "PdgrpcStoreNearFull"):
        assert f"alert: {alert}" in rules


# ---- systemd ---------------------------------------------------------------------------------------

UNIT_FILES = ("pdgrpc-kvstore.service", "pdgrpc-coordinator.service", "pdgrpc-coordinator@.service",
              "pdgrpc-prefill@.service", "pdgrpc-decode@.service", "pdgrpc.target")


def test_systemd_analyze_verify_every_unit(tmp_path):
    """`systemd-analyze verify` on the units as shipped, in a scratch root: the system's own units,
    ours in /etc/systemd/system, and a stand-in /usr/local/bin/pdgrpc (verify wants ExecStart to exist)."""
    analyze = need_tool("systemd-analyze")
    root = tmp_path / "root"
    system_units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNIT_FILES:
        shutil.copy(UNITS / name, root / "etc/systemd/system" / name)
    exe = root / "usr/local/bin/pdgrpc"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    instances = ["pdgrpc-kvstore.service", "pdgrpc-coordinator.service", "pdgrpc-coordinator@1.service",
                 "pdgrpc-prefill@0.service",
                 "pdgrpc-prefill@1.service", "pdgrpc-decode@2.service", "pdgrpc-decode@7.service", "pdgrpc.target"]
    res = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", *instances],
                         capture_output=True, text=True, timeout=60, cwd=root / "etc/systemd/system", check=False)
    out = res.stdout + res.stderr
    # verify only warns about unknown keys or bad values: any output at all is a failure.
    assert res.returncode == 0 and not out.strip(), out
    # The check is real: a unit with a typo does not pass.
    broken = root / "etc/systemd/system/pdgrpc-broken.service"
    broken.write_text((UNITS / "pdgrpc-kvstore.service").read_text().replace("Type=notify", "Typo=notify"))
    res = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", "pdgrpc-broken.service"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert "Typo" in res.stdout + res.stderr


def test_units_follow_the_conventions():
    text = {name: (UNITS / name).read_text() for name in UNIT_FILES}
    for name in ("pdgrpc-prefill@.service", "pdgrpc-decode@.service"):
        unit = text[name]
        for line in ("Type=notify", "NotifyAccess=main", "Environment=CUDA_VISIBLE_DEVICES=%i",
                     "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                     "PrivateTmp=yes", "DeviceAllow=char-nvidia* rw"):
            assert line in unit.splitlines(), (name, line)
        assert "PrivateDevices=yes" not in unit and "MemoryDenyWriteExecute=yes" not in unit, name
        assert re.search(r"^EnvironmentFile=-?/etc/pdgrpc/", unit, re.MULTILINE), name
        grace = int(re.search(r"PDGRPC_GRACE_S=(\d+)", unit).group(1))
        assert int(re.search(r"^TimeoutStopSec=(\d+)", unit, re.MULTILINE).group(1)) > grace, name
    assert "Type=notify" in text["pdgrpc-coordinator.service"]
    for name in UNIT_FILES[:-1]:
        assert "Restart=on-failure" in text[name] and "WantedBy=pdgrpc.target" in text[name], name


def test_example_cluster_files_in_deploy_readme_load():
    """Every ```toml block of deploy/README.md is a cluster file pdgrpc accepts."""
    from pdgrpc import config as cfgmod

    readme = (DEPLOY / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert blocks
    with tempfile.TemporaryDirectory() as tmp:
        for i, block in enumerate(blocks):
            path = Path(tmp) / f"cluster{i}.toml"
            path.write_text(block)
            cluster = cfgmod.load(str(path), None)
            assert cluster.nodes or cluster.membership.etcd  # with etcd, nodes register themselves


# ---- sd_notify and graceful drain --------------------------------------------------------------------

def health_status(address: str, service: str = "") -> str:
    """SERVING / NOT_SERVING, or UNAVAILABLE when the server refuses the call."""
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def node_info(address: str):
    with grpc.insecure_channel(address) as ch:
        return convert.node_info_from_pb(
            decode_pb2_grpc.DecodeStub(ch).GetNodeInfo(convert.node_info_request_pb(), timeout=2))


def test_node_sends_ready_once_serving_and_stopping_on_sigterm():
    sockdir = tempfile.mkdtemp(prefix="pdgrpc-notify-", dir="/tmp")  # AF_UNIX paths must be short
    path = os.path.join(sockdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = Proc(pdgrpc_cmd("decode", "--name", "decode-notify", "--port", str(port),
                           "--store", f"127.0.0.1:{free_port()}", "--engine", "mock"),
                env={"NOTIFY_SOCKET": path})
    try:
        messages = []
        while "READY=1" not in messages:
            messages.append(sock.recv(4096).decode())
        # At the moment READY=1 arrives the model is loaded and health already says SERVING.
        assert health_status(address) == "SERVING"
        assert health_status(address, "pdgrpc.v1.Decode") == "SERVING"
        info = node_info(address)
        assert info.name == "decode-notify" and info.model.name == "mock"
        assert messages == ["READY=1"], messages  # nothing before it
        assert proc.lines and proc.lines[-1].startswith("decode decode-notify listening")

        proc.signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.stop()
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_sigterm_drains_an_inflight_request_then_exits(tmp_path):
    # 160 tokens at 50 ms per decode step: about 8 s of decode to interrupt, so the checks between the
    # SIGTERM and `alive()` (a few hundred ms, seconds on a loaded CI machine) end well before it does.
    lc = start_local_cluster(tmp_path, decode_args=("--mock-decode-cost-per-step-s", "0.05"))
    try:
        decode = lc.procs["decode-0"]
        decode_address = f"127.0.0.1:{lc.base + 40}"
        fingerprint = node_info(decode_address).model.fingerprint
        prompt = "drain me " * 8
        tokens: list[int] = []
        final = []
        with Client(lc.coordinator, timeout_s=60) as client:
            stream = client.generate(prompt, max_tokens=160, ignore_eos=True)
            for event in stream:
                if hasattr(event, "token_ids"):
                    tokens.extend(event.token_ids)
                else:
                    final.append(event)
                if len(tokens) == 5:
                    decode.signal(signal.SIGTERM)
                    # Health turns NOT_SERVING (or the draining server refuses the check outright).
                    assert wait_until(lambda: health_status(decode_address) != "SERVING", 5, 0.05)
                    time.sleep(0.2)
                    # A new call straight to the draining node is refused with UNAVAILABLE.
                    with grpc.insecure_channel(decode_address) as ch:
                        start = convert.decode_input_to_pb(DecodeStart(
                            "after-sigterm", (1, 70, 71), SamplingParams(max_tokens=4), fingerprint))
                        with pytest.raises(grpc.RpcError) as refused:
                            list(decode_pb2_grpc.DecodeStub(ch).Decode(iter([start]), timeout=5))
                        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
                    assert decode.alive(), "the node must drain, not exit, while a request runs"
        # The request finished with every token, on the node that was told to stop.
        assert len(tokens) == 160 and final and final[0].completion_tokens == 160, (len(tokens), final)
        assert final[0].decode_node == "decode-0"
        # Then the node exits on its own, with status 0, well within its 30 s grace.
        assert decode.proc.wait(timeout=15) == 0
    finally:
        lc.stop()


def test_children_of_a_killed_launcher_stop(tmp_path):
    """`pdgrpc up` SIGKILLed: every process it started gets SIGTERM from the kernel and exits."""
    from conftest import free_port_base

    base = free_port_base()
    up = Proc(pdgrpc_cmd("up", "--engine", "mock", "--port-base", str(base)))
    try:
        up.wait_for_line("cluster ready", timeout_s=120)
        with open(f"/proc/{up.proc.pid}/task/{up.proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        assert len(children) >= 4  # store, prefill, decode, coordinator
        up.proc.send_signal(signal.SIGKILL)
        up.proc.wait(timeout=10)

        def gone(pid: int) -> bool:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().split(")")[-1].split()[0] == "Z"  # exited, not reaped yet
            except FileNotFoundError:
                return True

        assert wait_until(lambda: all(gone(p) for p in children), 30), "children outlived the launcher"
    finally:
        try:  # the launcher's process group: whatever is left of it
            os.killpg(up.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
