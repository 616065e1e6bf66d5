"""What the HTTP routes share: the context they run in, the JSON body, the error response.

Kept apart from :mod:`llmopt.server.http` (the app and server), which imports the routes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmopt.errors import InvalidInputError, LlmoptError
from llmopt.server.http_errors import kserve_body, openai_body, status_of
from llmopt.server.metrics import Metrics
from llmopt.server.repository import ModelRepository

T = TypeVar("T")


@dataclass
class HttpContext:
    """What every route needs: the repository, metrics, and the pool for blocking work."""

    repository: ModelRepository
    metrics: Metrics
    pool: ThreadPoolExecutor
    draining: Callable[[], bool]
    max_body_bytes: int
    kserve: Any  # the gRPC KServeService, which the REST routes call

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


def error_response(error: LlmoptError, path: str, param: str | None = None) -> Response:
    """The error in the shape the route's clients read: Triton's on /v2, OpenAI's elsewhere."""
    body = kserve_body(error) if path.startswith("/v2") else openai_body(error, param)
    headers = {"WWW-Authenticate": "Bearer"} if status_of(error) == 401 else None
    return JSONResponse(body, status_of(error), headers=headers)


async def json_body(request: Request) -> Any:
    data = await request.body()
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"the request body is not valid JSON: {exc}",
                                fix="send a JSON object (Content-Type: application/json)"
                                ) from None
