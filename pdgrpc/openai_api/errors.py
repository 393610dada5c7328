"""Errors as OpenAI sends them: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP code.

One table maps each domain error (``pdgrpc.errors``, named after its gRPC status) to the HTTP code an
OpenAI client expects, so the official SDK raises the matching exception (BadRequestError,
AuthenticationError, NotFoundError, RateLimitError, InternalServerError ...). Schema failures
(pydantic) become 400s whose ``param`` names the field the way OpenAI does (``messages.[0].role``).
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from pdgrpc.errors import Code, PdgrpcError
from pdgrpc.openai_api.models import ErrorInfo, ErrorResponse

# gRPC status -> (HTTP code, OpenAI error type, OpenAI error code). NOT_FOUND in pdgrpc means a KV
# entry the store no longer has (a store restart), not a resource the client named: 503, try again.
HTTP_FOR_CODE: dict[Code, tuple[int, str, str | None]] = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    Code.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    Code.CANCELLED: (499, "invalid_request_error", "cancelled"),
    Code.NOT_FOUND: (503, "server_error", "service_unavailable"),
    Code.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "timeout_error", "timeout"),
    Code.FAILED_PRECONDITION: (500, "server_error", None),
    Code.DATA_LOSS: (500, "server_error", None),
    Code.INTERNAL: (500, "server_error", None),
}
# Request fields a domain error message may start with (pdgrpc.types.SamplingParams.validate and the nodes).
_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "stop", "prompt", "seed")
_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\]|ContentPart|StreamOptions)$")


class ApiError(Exception):
    """An answer that is an error: HTTP status, OpenAI body, and headers (Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))
        self.retry_after_s = retry_after_s
        self.grpc_code = Code.INVALID_ARGUMENT if status == 400 else None  # for the outcome metric

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def bad_param(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def from_domain(err: PdgrpcError) -> ApiError:
    status, type_, code = HTTP_FOR_CODE.get(err.code, HTTP_FOR_CODE[Code.INTERNAL])
    param = None
    if err.code is Code.INVALID_ARGUMENT:
        text = err.message.split(": ", 1)[1] if " node " in err.message.split(":", 1)[0] else err.message
        param = "max_tokens" if "max_tokens" in text else next((f for f in _FIELDS if text.startswith(f)), None)
    out = ApiError(status, err.message, type_, param, code, err.retry_after_s)
    out.grpc_code = err.code
    return out


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages.[0].role'; union member tags ('str', 'list[int]') dropped."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _TAG.match(item):
            parts.append(item)
    return ".".join(parts)


def from_validation(exc: ValidationError) -> ApiError:
    errors = exc.errors(include_url=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return ApiError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                             "aren't using your HTTP library correctly.)")
    # Our own validators say the most; then unknown fields (OpenAI's wording); then the deepest error,
    # which for a union is the member the input came closest to.
    by_kind = sorted(errors, key=lambda e: (e["type"] != "value_error", e["type"] != "extra_forbidden",
                                            -len(e["loc"])))
    first = by_kind[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return bad_param(param, f"Unrecognized request argument supplied: {param}")
    if first["type"] == "missing":
        return bad_param(param, f"Missing required parameter: '{param}'.")
    msg = first["msg"].removeprefix("Value error, ")
    return bad_param(param, f"Invalid value for '{param}': {msg}")
