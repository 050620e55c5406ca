"""One server interceptor: authorise every call, map ota errors to status codes, time it.

A caller's mistake gets a precise status and a message naming the field;
only a genuine bug surfaces as INTERNAL (and is logged with its traceback).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from ota import errors
from ota.api.auth import Authenticator, Caller, bearer, peer_certificate
from ota.api.screening import screened
from ota.metrics import Metrics
from ota.store import audit

log = logging.getLogger(__name__)

STATUS: dict[type[errors.OtaError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: errors.OtaError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, errors.OtaError):
        context.abort(status_of(exc), str(exc))
    # grpc-stubs lags grpcio, which has had ServicerContext.code() since 1.38.
    if context.code() is not None:  # type: ignore[attr-defined]
        raise exc  # the servicer already chose a status with context.abort
    log.error("internal error", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")


if TYPE_CHECKING:  # grpc-stubs makes these generic; grpcio's classes are not at run time
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Interceptor = grpc.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.ServerInterceptor


Observe = Callable[[grpc.StatusCode, float], None]


def _ignore(_code: grpc.StatusCode, _seconds: float) -> None:
    pass


def _final_code(context: grpc.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, errors.OtaError):
        return status_of(exc)
    chosen: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    if chosen is not None:
        return chosen
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.INTERNAL


class OtaInterceptor(_Interceptor):
    def __init__(self, auth: Authenticator, metrics: Metrics | None = None) -> None:
        self._auth = auth
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        token = bearer(details.invocation_metadata)
        observe: Observe = _ignore
        metrics = self._metrics
        if metrics is not None and method.startswith("/ota."):
            observe = lambda code, seconds: metrics.observe_rpc(method, code, seconds)  # noqa: E731
        auth = self._auth
        # A certificate counts only without a bearer token: read it only then.
        return _wrap(
            handler,
            lambda context: auth.authorize(
                method, token, None if token else peer_certificate(context)
            ),
            observe,
        )


def _requester(caller: Caller | None, context: grpc.ServicerContext) -> audit.Requester:
    """Who the audit log names for this call, and from where."""
    return audit.Requester(caller.name if caller is not None else "", context.peer() or "")


def _wrap(
    handler: Handler,
    check: Callable[[grpc.ServicerContext], Caller | None],
    observe: Observe,
) -> Handler:
    h: Any = handler

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                caller = check(context)
                with audit.serving(_requester(caller, context)):
                    return behavior(screened(request), context)
            except Exception as exc:
                failure = exc
                _abort(context, exc)
            finally:
                observe(_final_code(context, failure), time.perf_counter() - start)

        return call

    def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            failure: BaseException | None = None
            try:
                caller = check(context)
                with audit.serving(_requester(caller, context)):
                    yield from behavior(screened(request), context)
            except Exception as exc:
                failure = exc
                if isinstance(exc, grpc.RpcError) and not context.is_active():
                    failure = None
                    return  # the client went away mid-stream (a reflection client closing)
                _abort(context, exc)
            finally:
                observe(_final_code(context, failure), time.perf_counter() - start)

        return call

    if h.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(h.unary_unary), h.request_deserializer, h.response_serializer
        )
    if h.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(h.unary_stream), h.request_deserializer, h.response_serializer
        )
    if h.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(h.stream_unary), h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(h.stream_stream), h.request_deserializer, h.response_serializer
    )
