"""Prefill and decode nodes: scheduling, the store hand-off, and their gRPC servers."""
