"""One table from llmopt's error types to gRPC status codes, and the way back.

The server ends a failed call with the code of the error's most specific listed type, the
error's message as details, and its type name and fix in trailing metadata
(``llmopt-error``, ``llmopt-fix``). The client turns a ``grpc.RpcError`` back into that type,
or, from servers that send no type (Triton, grpc itself), into the type the code stands for.
"""

from __future__ import annotations

from typing import Any

import grpc

from llmopt.errors import (
    BusyError,
    InvalidInputError,
    LlmoptError,
    MissingDependencyError,
    PackageError,
    ProviderError,
    SourceError,
    UnsupportedError,
    ValidationError,
)

ERROR_KEY = "llmopt-error"
FIX_KEY = "llmopt-fix"


class ModelNotFoundError(InvalidInputError):
    """No model of that name (or version) in the repository."""


class ModelNotReadyError(LlmoptError):
    """The model exists but is loading, unloaded or failed to load."""


class RequestTooLargeError(InvalidInputError):
    """The request exceeds a size limit (batch, elements, message bytes)."""


class AuthenticationError(LlmoptError):
    """No or a wrong bearer token, or the client certificate was refused."""


class DeadlineExceededError(LlmoptError, TimeoutError):
    """The call's deadline passed before it finished."""


class CancelledError(LlmoptError):
    """The call was cancelled."""


class ServerUnavailableError(LlmoptError, ConnectionError):
    """The server cannot be reached, or is shutting down."""


class ServerError(LlmoptError):
    """The server failed on its side (a bug); the details say what happened."""


C = grpc.StatusCode
# llmopt error type -> status code; the most specific type in an error's MRO wins.
CODES: dict[type[LlmoptError], grpc.StatusCode] = {
    ModelNotFoundError: C.NOT_FOUND,
    RequestTooLargeError: C.RESOURCE_EXHAUSTED,
    BusyError: C.RESOURCE_EXHAUSTED,
    InvalidInputError: C.INVALID_ARGUMENT,
    UnsupportedError: C.UNIMPLEMENTED,
    ModelNotReadyError: C.UNAVAILABLE,
    ServerUnavailableError: C.UNAVAILABLE,
    AuthenticationError: C.UNAUTHENTICATED,
    DeadlineExceededError: C.DEADLINE_EXCEEDED,
    CancelledError: C.CANCELLED,
    PackageError: C.FAILED_PRECONDITION,
    ProviderError: C.FAILED_PRECONDITION,
    SourceError: C.FAILED_PRECONDITION,
    ValidationError: C.FAILED_PRECONDITION,
    MissingDependencyError: C.FAILED_PRECONDITION,
    ServerError: C.INTERNAL,
    LlmoptError: C.UNKNOWN,
}
# status code -> error type, for failures that carry no llmopt type
FROM_CODE: dict[grpc.StatusCode, type[LlmoptError]] = {
    C.NOT_FOUND: ModelNotFoundError,
    C.INVALID_ARGUMENT: InvalidInputError,
    C.OUT_OF_RANGE: InvalidInputError,
    C.RESOURCE_EXHAUSTED: BusyError,
    C.UNIMPLEMENTED: UnsupportedError,
    C.UNAVAILABLE: ServerUnavailableError,
    C.UNAUTHENTICATED: AuthenticationError,
    C.PERMISSION_DENIED: AuthenticationError,
    C.DEADLINE_EXCEEDED: DeadlineExceededError,
    C.CANCELLED: CancelledError,
    C.FAILED_PRECONDITION: LlmoptError,
}
_BY_NAME = {cls.__name__: cls for cls in CODES}


def code_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in CODES:
            return CODES[cls]
    return C.INTERNAL


def trailers(error: LlmoptError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the error type and fix (ASCII only, as metadata must be)."""
    name = next(c.__name__ for c in type(error).__mro__ if c in CODES)
    pairs = [(ERROR_KEY, name)]
    if error.fix:
        pairs.append((FIX_KEY, error.fix.encode("ascii", "replace").decode()))
    return tuple(pairs)


def from_rpc_error(error: grpc.RpcError) -> LlmoptError:
    """The llmopt error a failed call stands for."""
    code = error.code() if hasattr(error, "code") else C.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    meta = {}
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        meta[key] = value if isinstance(value, str) else value.decode("utf-8", "replace")
    cls = _BY_NAME.get(meta.get(ERROR_KEY, ""))
    if cls is None:
        cls = FROM_CODE.get(code, ServerError)
        if code == C.RESOURCE_EXHAUSTED and "larger than max" in details:
            cls = RequestTooLargeError  # grpc's own message-size limit
    fix = meta.get(FIX_KEY) or _default_fix(code)
    message = _strip_fix(details, fix)
    out = cls.__new__(cls)
    LlmoptError.__init__(out, message, fix=fix)
    if isinstance(out, ValidationError):
        out.report = {}
    out.code = code  # type: ignore[attr-defined]
    return out


def _strip_fix(details: str, fix: str | None) -> str:
    suffix = f" (fix: {fix})"
    return details[: -len(suffix)] if fix and details.endswith(suffix) else details


def _default_fix(code: Any) -> str | None:
    return {
        C.UNAVAILABLE: "check that the server runs at that address (and TLS settings match)",
        C.UNAUTHENTICATED: "pass the server's bearer token (token=... / --token-file)",
        C.DEADLINE_EXCEEDED: "raise the timeout, or ask for fewer tokens",
    }.get(code)
