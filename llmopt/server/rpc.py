"""Wire a servicer object to a service of llmopt's descriptor pool, with one error policy.

Every method goes through :func:`_guard`: a request that does not parse is INVALID_ARGUMENT
(grpc's own answer would be INTERNAL), an :class:`~llmopt.errors.LlmoptError` ends the call with
the code of :mod:`llmopt.server.status`, anything else is logged with its traceback and ends the
call as INTERNAL, so one bad request never takes the server or other calls down. Each call is
counted and timed by the observer (the metrics), which also knows how many are in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf.message import DecodeError

from llmopt import _proto
from llmopt.errors import BusyError, InvalidInputError, LlmoptError
from llmopt.server.status import ServerError, ServerUnavailableError, code_of, trailers

log = logging.getLogger("llmopt.server")
MAX_DETAILS = 2000


class Observer(Protocol):
    def started(self) -> None: ...

    def ended(self) -> None: ...

    def rpc(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None: ...


class Malformed:
    """A request whose bytes are not a valid message of the method's type."""

    def __init__(self, type_name: str, reason: str) -> None:
        self.type_name = type_name
        self.reason = reason

    def error(self) -> InvalidInputError:
        return InvalidInputError(f"the request is not a valid {self.type_name}: {self.reason}",
                                 fix="send a message built from the published .proto files")


class CallLimit:
    """At most ``limit`` API calls at once; one more is refused RESOURCE_EXHAUSTED at once.

    Counted here rather than by grpc's ``maximum_concurrent_rpcs``, which counts every call:
    health checks and reflection stay outside the limit, so a server busy with ``limit``
    streams still answers its Kubernetes probes instead of being restarted for being busy.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def enter(self) -> None:
        if not self._free.acquire(blocking=False):
            raise BusyError(f"the server is handling its limit of {self.limit} calls",
                            fix="retry with backoff, or raise max_workers")

    def exit(self) -> None:
        self._free.release()


def service_handler(service_name: str, servicer: Any, observer: Observer,
                    draining: Callable[[], bool] = lambda: False,
                    limit: CallLimit | None = None,
                    cut: Callable[[], bool] = lambda: False) -> Any:
    """A ``grpc.GenericRpcHandler`` serving ``servicer``'s methods named as in the service.

    Methods the servicer lacks are left out, so grpc answers them UNIMPLEMENTED. While
    ``draining()``, new calls are refused UNAVAILABLE (retry elsewhere) and running ones go on;
    once ``cut()`` (the drain grace is over) running ones end UNAVAILABLE too, at their next
    response; beyond ``limit``, RESOURCE_EXHAUSTED.
    """
    service = _proto.service(service_name)
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        behaviour = getattr(servicer, method.name, None)
        if behaviour is None:
            continue
        request_type = _proto.message(method.input_type.full_name)
        response_type = _proto.message(method.output_type.full_name)
        kind = (method.client_streaming, method.server_streaming)
        handlers[method.name] = factories[kind](
            _guard(behaviour, method.name, kind, observer, draining, limit, cut),
            request_deserializer=_parser(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _parser(message_type: Any) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(name, str(exc) or type(exc).__name__)

    return parse


def model_of(request: Any) -> str:
    for field in ("model", "model_name", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value
    return ""


def abort(context: grpc.ServicerContext, error: LlmoptError) -> NoReturn:
    """End the call with ``error``'s status code, message and trailers (raises)."""
    context.set_trailing_metadata(trailers(error))
    context.abort(code_of(error), str(error)[:MAX_DETAILS])
    raise AssertionError("context.abort returned")  # it always raises


# Long on purpose: the statements are those of its three short closures (prepare, unary, streaming),
# which share the call's state and are counted toward the function that defines them
def _guard(behaviour: Callable[..., Any], name: str, kind: tuple[bool, bool],  # noqa: PLR0915
           observer: Observer, draining: Callable[[], bool],
           limit: CallLimit | None, cut: Callable[[], bool]) -> Callable[..., Any]:
    client_streaming, server_streaming = kind

    def check_cut() -> None:
        if cut():
            raise ServerUnavailableError(
                "the server is shutting down: its drain grace ended before this call finished",
                fix="retry on another replica, or after the restart")

    def prepare(request: Any) -> Any:
        if draining():
            raise ServerUnavailableError("the server is shutting down",
                                         fix="retry on another replica, or after the restart")
        if client_streaming:
            return _checked(request)
        if isinstance(request, Malformed):
            raise request.error()
        return request

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        observer.started()
        counted = False
        try:
            if limit is not None:
                limit.enter()
                counted = True
            response = behaviour(prepare(request), context)
            check_cut()
            return response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            error = as_llmopt(exc, name)
            code = code_of(error)
            abort(context, error)
        finally:
            if counted and limit is not None:
                limit.exit()
            observer.ended()
            observer.rpc(name, _label(request, client_streaming), code,
                         time.perf_counter() - started)

    def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started, code = time.perf_counter(), grpc.StatusCode.OK
        observer.started()
        counted = False
        try:
            if limit is not None:
                limit.enter()
                counted = True
            responses = behaviour(prepare(request), context)
            try:
                for response in responses:
                    check_cut()
                    yield response
            finally:
                responses.close()  # at once: its own cleanup cancels the engine request
            check_cut()
            if not context.is_active():
                code = grpc.StatusCode.CANCELLED
        except GeneratorExit:  # grpc closes the generator when the client goes away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
            if not context.is_active():  # the client left mid-stream: not a server error
                code = grpc.StatusCode.CANCELLED
                return
            error = as_llmopt(exc, name)
            code = code_of(error)
            abort(context, error)
        finally:
            if counted and limit is not None:
                limit.exit()
            observer.ended()
            observer.rpc(name, _label(request, client_streaming), code,
                         time.perf_counter() - started)

    return streaming if server_streaming else unary


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        if isinstance(request, Malformed):
            raise request.error()
        yield request


def _label(request: Any, client_streaming: bool) -> str:
    return "" if client_streaming or isinstance(request, Malformed) else model_of(request)


def as_llmopt(exc: Exception, name: str) -> LlmoptError:
    """``exc`` itself if it is a user error; otherwise a logged :class:`ServerError`."""
    if isinstance(exc, LlmoptError):
        return exc
    log.exception("%s failed with an unexpected error", name)
    return ServerError(f"internal error in {name}: {type(exc).__name__}: {exc}",
                       fix="this is a bug in llmopt; the server log has the traceback")
