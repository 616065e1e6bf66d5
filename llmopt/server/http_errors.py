"""One table from llmopt's error types to HTTP status codes, and the two error bodies.

The OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}`` as OpenAI does,
so the ``openai`` SDK raises its typed errors (``BadRequestError``, ``NotFoundError``, ...);
the KServe v2 routes answer ``{"error": "<message>"}`` as Triton does, which
``tritonclient.http`` turns into an ``InferenceServerException``. The table mirrors
:data:`llmopt.server.status.CODES`: the most specific listed type in an error's MRO wins.
"""

from __future__ import annotations

from typing import Any

from llmopt.errors import (
    BusyError,
    InvalidInputError,
    LlmoptError,
    MissingDependencyError,
    PackageError,
    ProviderError,
    UnsupportedError,
)
from llmopt.server.status import (
    AuthenticationError,
    CancelledError,
    DeadlineExceededError,
    ModelNotFoundError,
    ModelNotReadyError,
    RequestTooLargeError,
    ServerError,
    ServerUnavailableError,
)

STATUS: dict[type[LlmoptError], int] = {
    ModelNotFoundError: 404,
    RequestTooLargeError: 413,
    BusyError: 429,
    InvalidInputError: 400,
    UnsupportedError: 400,  # OpenAI answers an unsupported parameter 400, not 501
    AuthenticationError: 401,
    ModelNotReadyError: 503,
    ServerUnavailableError: 503,
    DeadlineExceededError: 504,
    CancelledError: 499,
    PackageError: 503,  # the model failed to load: not the request's fault
    ProviderError: 503,
    MissingDependencyError: 503,
    ServerError: 500,
    LlmoptError: 500,
}
# HTTP status -> OpenAI's error "type"
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
                499: "cancelled", 500: "server_error", 503: "service_unavailable",
                504: "timeout"}


def status_of(error: BaseException) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def openai_body(error: LlmoptError, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; ``code`` carries llmopt's error type, as OpenAI's carries its own."""
    status = status_of(error)
    name = next(c.__name__ for c in type(error).__mro__ if c in STATUS)
    return {"error": {"message": str(error), "type": OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": name}}


def kserve_body(error: LlmoptError) -> dict[str, Any]:
    return {"error": str(error)}
