"""pdgrpc's gswarm-compatible KV data store: the server (`pdgrpc kvstore`, ``pdgrpc.kvstore.server``),
its async client (``KVStoreClient``) and the same-host shared-memory path (``pdgrpc.kvstore.shm``)."""

from pdgrpc.kvstore.client import KVStoreClient, PutResult

__all__ = ["KVStoreClient", "PutResult"]
