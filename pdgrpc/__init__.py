"""pdgrpc: prefill/decode disaggregated LLM serving over gRPC, with KV in a gswarm data store."""

__version__ = "0.1.0"
