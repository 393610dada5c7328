"""An OpenAI-compatible HTTP front on the coordinator: the API every LLM client already speaks.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events exactly as
OpenAI sends them, or one JSON answer), ``GET /v1/models``, ``GET /health`` and ``GET /metrics``, on
the coordinator's ``http_port``. Requests go to the coordinator's Router as domain objects, in the
same process and event loop as the gRPC servicer: no second hop, the same admission, retries,
cancellation and metrics as a gRPC call.

Modules: ``models`` (the pydantic request and response schemas), ``convert`` (OpenAI parameters to
``pdgrpc.types`` and router events to OpenAI responses), ``errors`` (domain errors and schema
failures to OpenAI's error JSON and HTTP codes, one table), ``app`` (the aiohttp application).
Where OpenAI and vLLM's server differ, OpenAI's API is followed: an unknown field, an unknown chat
role or a parameter pdgrpc does not implement is a 400 that names it, never silently ignored.
"""
