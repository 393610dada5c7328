"""The coordinator: picks nodes, streams KV descriptors from prefill into decode, tokens to the client."""
