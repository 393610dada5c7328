"""Prometheus metrics of every pdgrpc process (prefix pdgrpc_, base units, bounded labels).

Labels are role, node, model, phase, outcome, reason, location, api: never a request id.
KV transfer phases, one definition for the whole project:
  publish  prefill: from a KV group computed to its entry committed in the store
  deliver  coordinator: from a descriptor received from prefill to it written to decode's stream
  fetch    decode: from a descriptor received to its bytes checked and loaded into the cache
  total    coordinator: from prefill's last descriptor to decode reporting all groups loaded
Effective bandwidth is bytes / seconds of one publish or fetch. The store's own metrics
(pdgrpc_store_*) live in ``pdgrpc.kvstore.entries.StoreMetrics``.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# Bucket boundaries sit on the SLO values operators alert on.
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# 100 MB/s .. 1 TB/s: a TCP hop, host memory copies, NVLink/RDMA-class links.
_BANDWIDTH_BUCKETS = (1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10, 5e10, 1e11, 2.5e11, 1e12)

OUTCOMES = ("ok", "cancelled", "deadline", "invalid", "unavailable", "rejected", "error")
APIS = ("grpc", "openai")   # the coordinator's gRPC service, its OpenAI-compatible HTTP front
PHASES = ("publish", "deliver", "fetch", "total")
FAILURE_REASONS = {"prefill": ("store_full", "store"), "decode": ("not_found", "checksum", "store")}

# ---- coordinator: per request, per model ----
TIME_TO_FIRST_TOKEN = Histogram("pdgrpc_time_to_first_token_seconds", "Request arrival to first token sent",
                                ["model"], buckets=_TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("pdgrpc_inter_token_latency_seconds", "Time between consecutive tokens sent",
                                ["model"], buckets=_ITL_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("pdgrpc_time_per_output_token_seconds",
                                  "(e2e - ttft) / (completion tokens - 1) per request", ["model"], buckets=_ITL_BUCKETS)
E2E_LATENCY = Histogram("pdgrpc_e2e_request_latency_seconds", "Request arrival to final message",
                        ["model"], buckets=_E2E_BUCKETS)
QUEUE_TIME = Histogram("pdgrpc_request_queue_time_seconds", "Request arrival to nodes picked", ["model"],
                       buckets=_KV_BUCKETS)
PREFILL_TIME = Histogram("pdgrpc_request_prefill_time_seconds", "Prefill call sent to first token received",
                         ["model"], buckets=_TTFT_BUCKETS)
DECODE_TIME = Histogram("pdgrpc_request_decode_time_seconds", "First token to final message",
                        ["model"], buckets=_E2E_BUCKETS)
REQUESTS = Counter("pdgrpc_requests_total", "Finished requests by outcome and the API they came by",
                   ["model", "outcome", "api"])
PROMPT_TOKENS = Counter("pdgrpc_prompt_tokens_total", "Prompt tokens of finished requests", ["model"])
GENERATION_TOKENS = Counter("pdgrpc_generation_tokens_total", "Tokens generated", ["model"])
REQUEST_RETRIES = Counter("pdgrpc_request_retries_total",
                          "Requests moved to another node because one died mid-request, by the failed node's role",
                          ["role"])
REQUESTS_INFLIGHT = Gauge("pdgrpc_requests_inflight", "Requests being served now", ["role"])

# ---- KV transfer, by phase ----
KV_TRANSFER = Histogram("pdgrpc_kv_transfer_seconds", "KV hand-off time by phase (see README)",
                        ["role", "phase"], buckets=_KV_BUCKETS)
KV_TRANSFER_BYTES = Counter("pdgrpc_kv_transfer_bytes_total", "KV bytes moved", ["role", "phase"])
KV_TRANSFER_BANDWIDTH = Histogram("pdgrpc_kv_transfer_bandwidth_bytes_per_second",
                                  "Effective bandwidth of one KV publish or fetch (bytes / its seconds)",
                                  ["role", "phase"], buckets=_BANDWIDTH_BUCKETS)
KV_FETCH_PATH = Counter("pdgrpc_kv_fetch_path_bytes_total",
                        "KV bytes decode fetched, by transfer path (shm, http, cuda_ipc, mooncake: pdgrpc.transfer)",
                        ["role", "path"])
KV_TRANSFER_FAILURES = Counter("pdgrpc_kv_transfer_failures_total", "KV hand-offs that failed", ["role", "reason"])

# ---- nodes ----
NODE_QUEUE_DEPTH = Gauge("pdgrpc_node_queue_depth", "Requests waiting in the node", ["role", "node"])
NODE_RUNNING = Gauge("pdgrpc_node_running_requests", "Requests running in the node", ["role", "node"])
NODE_BATCH_SIZE = Histogram("pdgrpc_node_batch_size", "Sequences per engine step", ["role", "node"],
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
NODE_PREFILL_JOINS = Counter("pdgrpc_node_prefill_joins_total",
                             "Prompts that joined a running prefill batch between two chunks (chunked prefill)",
                             ["role", "node"])
NODE_STEP_TIME = Histogram("pdgrpc_node_step_seconds", "Engine step time", ["role", "node"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
ENGINE_BATCH_INVARIANT = Gauge(
    "pdgrpc_engine_batch_invariant",
    "1: the engine's kernels were checked at load to give a sequence the same results whatever else is in its "
    "batch; 0: the check failed (greedy output may differ from colocated; the node's log says why)",
    ["role", "node"])
NODE_KV_CACHE = Gauge("pdgrpc_node_kv_cache_bytes",
                      "KV bytes the node holds: prefill until published, decode per sequence (loaded + generated)",
                      ["role", "node"])


def outcome_for(code_name: str | None) -> str:
    """Map a final status name to the bounded outcome label."""
    return {
        None: "ok", "CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline", "INVALID_ARGUMENT": "invalid",
        "UNAVAILABLE": "unavailable", "RESOURCE_EXHAUSTED": "rejected",
    }.get(code_name, "error")


_models_seen: set[str] = set()


def count_request(model: str, code_name: str | None, api: str = "grpc") -> None:
    """One finished request; the first one of a model creates every outcome of every API at 0
    (dashboards see zeros)."""
    if model not in _models_seen:
        _models_seen.add(model)
        for outcome in OUTCOMES:
            for a in APIS:
                REQUESTS.labels(model, outcome, a)
    REQUESTS.labels(model, outcome_for(code_name), api).inc()


def pool_model(pool: Any) -> str:
    """The model name the coordinator's nodes report (all serve one model), "" before any reported."""
    return next((n.info.model.name for n in getattr(pool, "nodes", ()) if getattr(n, "info", None)), "")


def observe_kv_transfer(role: str, phase: str, seconds: float, nbytes: int) -> None:
    """One publish or fetch: its time, its bytes and its effective bandwidth."""
    KV_TRANSFER.labels(role, phase).observe(seconds)
    KV_TRANSFER_BYTES.labels(role, phase).inc(nbytes)
    if seconds > 0:
        KV_TRANSFER_BANDWIDTH.labels(role, phase).observe(nbytes / seconds)


class _KVHeld:
    """Per-sequence KV bytes behind ``pdgrpc_node_kv_cache_bytes`` (keyed by the engine's sequence object)."""

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, role: str, node: str, seq: object, nbytes: int) -> None:
        with self._lock:
            self._held[id(seq)] = self._held.get(id(seq), 0) + nbytes
        NODE_KV_CACHE.labels(role, node).inc(nbytes)

    def grow(self, role: str, node: str, seqs: list, nbytes_each: int) -> None:
        """Each of ``seqs`` took ``nbytes_each`` more (one decode step: one token of KV per sequence)."""
        with self._lock:
            for seq in seqs:
                self._held[id(seq)] = self._held.get(id(seq), 0) + nbytes_each
        NODE_KV_CACHE.labels(role, node).inc(nbytes_each * len(seqs))

    def free(self, role: str, node: str, seq: object) -> None:
        with self._lock:
            nbytes = self._held.pop(id(seq), 0)
        NODE_KV_CACHE.labels(role, node).dec(nbytes)


KV_HELD = _KVHeld()


def init_coordinator() -> None:
    """Create the coordinator's unlabelled-by-request series at start, so they exist before traffic."""
    REQUESTS_INFLIGHT.labels("coordinator").set(0)
    for phase in ("deliver", "total"):
        KV_TRANSFER.labels("coordinator", phase)


def init_node(role: str, node: str) -> None:
    """Create a node's gauges and failure counters at start (0), so dashboards and alerts see them."""
    roles = ("prefill", "decode") if role == "colocated" else (role,)
    for r in roles:
        NODE_QUEUE_DEPTH.labels(r, node).set(0)
        NODE_RUNNING.labels(r, node).set(0)
        NODE_KV_CACHE.labels(r, node).set(0)
        for reason in FAILURE_REASONS.get(r, ()):
            KV_TRANSFER_FAILURES.labels(r, reason)


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics on its own port (a thread in this process)."""
    disable_created_metrics()  # *_created series are noise for long-running servers (the store does the same)
    start_http_server(port, addr=host)
