"""Domain errors, one class per gRPC status they map to.

Everything below the servicers raises these; servicers and clients translate them to and from
gRPC status codes (see ``pdgrpc.grpcutil``). Nothing is mapped to INTERNAL on purpose: an
unexpected exception is a bug and is reported as such.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Status names, the same as grpc.StatusCode's, without importing grpc here."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class PdgrpcError(Exception):
    """Base class; ``code`` says which status the caller gets."""

    code = Code.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(PdgrpcError):
    code = Code.INVALID_ARGUMENT


class NotFound(PdgrpcError):
    code = Code.NOT_FOUND


class FailedPrecondition(PdgrpcError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(PdgrpcError):
    code = Code.RESOURCE_EXHAUSTED


class Unavailable(PdgrpcError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(PdgrpcError):
    code = Code.DEADLINE_EXCEEDED


class Cancelled(PdgrpcError):
    code = Code.CANCELLED


class DataLoss(PdgrpcError):
    code = Code.DATA_LOSS


class Unauthenticated(PdgrpcError):
    code = Code.UNAUTHENTICATED


class Internal(PdgrpcError):
    code = Code.INTERNAL


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, NotFound, FailedPrecondition, ResourceExhausted, Unavailable,
    DeadlineExceeded, Cancelled, DataLoss, Unauthenticated, Internal,
)}


def error_for(code_name: str, message: str) -> PdgrpcError:
    """The domain error for a status name (e.g. from a downstream call)."""
    try:
        cls = _BY_CODE[Code(code_name)]
    except (ValueError, KeyError):
        cls = Internal
    return cls(message)
