"""Prometheus metrics of every pdgrpc process (prefix pdgrpc_, base units, bounded labels).

Labels are role, node, model, phase, outcome, reason, location: never a request id.
KV transfer phases, one definition for the whole project:
  publish  prefill: from a KV group computed to its entry committed in the store
  deliver  coordinator: from a descriptor received from prefill to it written to decode's stream
  fetch    decode: from a descriptor received to its bytes checked and loaded into the cache
  total    coordinator: from prefill's last descriptor to decode reporting all groups loaded
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Bucket boundaries sit on the SLO values operators alert on.
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_KV_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

TIME_TO_FIRST_TOKEN = Histogram("pdgrpc_time_to_first_token_seconds", "Request arrival to first token sent",
                                ["model"], buckets=_TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("pdgrpc_inter_token_latency_seconds", "Time between consecutive tokens sent",
                                ["model"], buckets=_ITL_BUCKETS)
TIME_PER_OUTPUT_TOKEN = Histogram("pdgrpc_time_per_output_token_seconds",
                                  "(e2e - ttft) / (completion tokens - 1) per request", ["model"], buckets=_ITL_BUCKETS)
E2E_LATENCY = Histogram("pdgrpc_e2e_request_latency_seconds", "Request arrival to final message",
                        ["model"], buckets=_E2E_BUCKETS)
QUEUE_TIME = Histogram("pdgrpc_request_queue_time_seconds", "Time waiting for a node", ["model"],
                       buckets=_KV_BUCKETS)
REQUESTS = Counter("pdgrpc_requests_total", "Finished requests by outcome", ["model", "outcome"])
PROMPT_TOKENS = Counter("pdgrpc_prompt_tokens_total", "Prompt tokens of finished requests", ["model"])
GENERATION_TOKENS = Counter("pdgrpc_generation_tokens_total", "Tokens generated", ["model"])
REQUESTS_INFLIGHT = Gauge("pdgrpc_requests_inflight", "Requests being served now", ["role"])

KV_TRANSFER = Histogram("pdgrpc_kv_transfer_seconds", "KV hand-off time by phase (see README)",
                        ["role", "phase"], buckets=_KV_BUCKETS)
KV_TRANSFER_BYTES = Counter("pdgrpc_kv_transfer_bytes_total", "KV bytes moved", ["role", "phase"])
KV_TRANSFER_FAILURES = Counter("pdgrpc_kv_transfer_failures_total", "KV hand-offs that failed", ["role", "reason"])

NODE_QUEUE_DEPTH = Gauge("pdgrpc_node_queue_depth", "Requests waiting in the node", ["role", "node"])
NODE_RUNNING = Gauge("pdgrpc_node_running_requests", "Requests running in the node", ["role", "node"])
NODE_BATCH_SIZE = Histogram("pdgrpc_node_batch_size", "Sequences per engine step", ["role", "node"],
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
NODE_STEP_TIME = Histogram("pdgrpc_node_step_seconds", "Engine step time", ["role", "node"],
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


def outcome_for(code_name: str | None) -> str:
    """Map a final status name to the bounded outcome label."""
    return {
        None: "ok", "CANCELLED": "cancelled", "DEADLINE_EXCEEDED": "deadline", "INVALID_ARGUMENT": "invalid",
        "UNAVAILABLE": "unavailable", "RESOURCE_EXHAUSTED": "rejected",
    }.get(code_name, "error")


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics on its own port (a thread in this process)."""
    start_http_server(port, addr=host)
