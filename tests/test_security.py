"""Optional gRPC security (shared token, TLS), loopback binding and the store's token."""

from __future__ import annotations

import subprocess

import grpc
import pytest
from conftest import mock_reference

from pdgrpc import config as cfgmod
from pdgrpc.client import Client
from pdgrpc.errors import Unauthenticated, Unavailable
from pdgrpc.types import NodeHealth

pytestmark = pytest.mark.e2e


def test_everything_binds_loopback_by_default():
    cfg = cfgmod.from_dict({"prefill": [{}], "decode": [{}]})
    assert cfg.store.host == cfg.coordinator.host == "127.0.0.1"
    assert all(n.host == "127.0.0.1" for n in cfg.nodes)


def test_shared_token_guards_every_pdgrpc_call(local_cluster):
    lc = local_cluster(env={"PDGRPC_AUTH_TOKEN": "s3cret"})
    with Client(lc.coordinator, token="s3cret") as ok:
        # The coordinator passes the token to the nodes, so the whole path works.
        assert ok.complete("with token", max_tokens=5).text == mock_reference("with token", 5)[1]
        assert all(n.health is NodeHealth.SERVING for n in ok.cluster_status().nodes)
    for token in ("", "wrong"):
        with Client(lc.coordinator, token=token or None) as bad:
            with pytest.raises(Unauthenticated, match="token"):
                bad.complete("no", max_tokens=2)
    # Health stays open for probes.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(lc.coordinator) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_tls_between_every_process(local_cluster, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    env = {"PDGRPC_TLS_CERT": str(cert), "PDGRPC_TLS_KEY": str(key), "PDGRPC_TLS_CA": str(cert)}
    lc = local_cluster(env=env)
    with Client(lc.coordinator, tls_ca=str(cert)) as client:
        assert client.complete("over tls", max_tokens=5).text == mock_reference("over tls", 5)[1]
    with Client(lc.coordinator, timeout_s=5) as plain:
        with pytest.raises(Unavailable):
            plain.complete("plaintext", max_tokens=2)
