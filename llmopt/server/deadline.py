"""How long one request may take, as one finite number of seconds or ``None`` (no limit).

A remaining time reaches the server three ways: the client's gRPC deadline, a KServe
``timeout`` request parameter (microseconds) and the server's own default. Without a client
deadline grpc reports a remaining time of hundreds of years, and a KServe client may send
2**63-1 µs; either, handed to ``Semaphore.acquire`` or ``Event.wait``, overflows the
platform's time_t. So every remaining time goes through :func:`request_timeout`, which calls
anything beyond :data:`NO_LIMIT_BEYOND_S` what it means: no deadline at all.
"""

from __future__ import annotations

import math
from typing import Any

NO_LIMIT_BEYOND_S = 365 * 24 * 3600.0  # a year: longer "deadlines" are the absence of one


def finite(seconds: float | None) -> float | None:
    """``seconds`` clamped at 0, or ``None`` where it is absent, not a number or unbounded."""
    if seconds is None or math.isnan(seconds) or seconds > NO_LIMIT_BEYOND_S:
        return None
    return max(float(seconds), 0.0)


def request_timeout(context: Any, parameter: float | None = None,
                    default: float | None = None) -> float | None:
    """The seconds a request may take: the shorter of the client's deadline (``context``, a
    ``grpc.ServicerContext`` or None) and its ``timeout`` parameter; ``default`` (the served
    model's ``request_timeout_s``) when the client set neither; ``None`` to wait as needed."""
    client = finite(context.time_remaining()) if context is not None else None
    parameter = finite(parameter)
    chosen = [s for s in (client, parameter) if s is not None]
    if chosen:
        return min(chosen)
    return finite(default)
