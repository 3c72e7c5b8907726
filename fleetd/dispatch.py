"""Request dispatch without I/O: a frame and its peer in, a response out.

Handlers that never block are plain functions and are answered inline, in the order their
frames arrived; handlers that wait (on the store, on processes) are coroutine functions and
run concurrently, so one slow request never holds up the pipeline behind it.
"""

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from fleetd.identity import identify
from protocol.errors import BadFrame, FleetError, Internal
from protocol.framing import decode_request, error_response, request_id_of
from protocol.leases import Identity
from protocol.messages import Message, Request, Response

log = structlog.get_logger("fleetd.dispatch")


@dataclass(eq=False, slots=True)
class Peer:
    """Who is on the other end, from SO_PEERCRED: the kernel's word, not the client's. One
    per connection: a connection's peer process does not change while it lasts."""

    pid: int
    uid: int
    gid: int
    _identity: Identity | None = None

    def identity(self) -> Identity:
        """The peer process's identity (its start time pins it among reused pids), read from
        /proc once per connection rather than once per request. Raises ProcessGone."""
        if self._identity is None:
            self._identity = identify(self.pid, self.uid)
        return self._identity


Handler = Callable[[Any, Peer], Message] | Callable[[Any, Peer], Awaitable[Message]]
Pending = Coroutine[Any, Any, Response]


@dataclass(frozen=True, slots=True)
class _Route:
    handler: Handler
    is_async: bool
    chatty: bool


class Dispatcher:
    def __init__(self, decode: Callable[[bytes], Request] = decode_request) -> None:
        """`decode` turns a frame into a request of this socket's ops (default: the control
        socket's), raising the FleetError its response should carry."""
        self._decode = decode
        self._routes: dict[type[Request], _Route] = {}

    def register(
        self, request_type: type[Request], handler: Handler, *, chatty: bool = False
    ) -> None:
        """Route `request_type` to `handler`. A `chatty` op (liveness pings, heartbeats) is
        logged at debug level, so that a busy fleet does not flood the journal."""
        is_async = inspect.iscoroutinefunction(handler)
        self._routes[request_type] = _Route(handler, is_async, chatty)

    def handle(self, frame: bytes, peer: Peer) -> Response | Pending:
        """Answer `frame`: a Response now, or a coroutine that produces one.

        Raises BadFrame when the bytes are not a JSON object at all: the stream is not
        speaking our protocol and the caller should close it after reporting the error.
        """
        started = time.perf_counter()
        try:
            request = self._decode(frame)
        except BadFrame:
            raise
        except FleetError as exc:
            _log_rejected(exc, request_id_of(frame))
            return error_response(request_id_of(frame), exc.code, exc.message, **exc.details)
        route = self._routes.get(type(request))
        if route is None:
            return error_response(request.id, "unknown_op", f"op {_op(request)!r} not served")
        if route.is_async:
            return self._finish(request, route, peer, started)
        try:
            result = route.handler(request, peer)
        except Exception as exc:
            return _failed(request, route, exc, started)
        return _succeeded(request, route, result, started)  # type: ignore[arg-type]

    async def _finish(
        self, request: Request, route: _Route, peer: Peer, started: float
    ) -> Response:
        try:
            result = await route.handler(request, peer)  # type: ignore[misc]
        except Exception as exc:
            return _failed(request, route, exc, started)
        return _succeeded(request, route, result, started)


def _op(request: Request) -> str:
    return str(type(request).__struct_config__.tag)


def _succeeded(request: Request, route: _Route, result: Message, started: float) -> Response:
    outcome = getattr(result, "outcome", "ok")
    emit = log.debug if route.chatty else log.info
    emit(
        "request_handled",
        op=_op(request),
        id=request.id,
        outcome=str(outcome),
        duration_us=round((time.perf_counter() - started) * 1e6),
    )
    return Response(id=request.id, ok=True, result=result)


def _failed(request: Request, route: _Route, exc: Exception, started: float) -> Response:
    duration_us = round((time.perf_counter() - started) * 1e6)
    if isinstance(exc, FleetError):
        log.info(
            "request_failed",
            op=_op(request),
            id=request.id,
            outcome=str(exc.outcome),
            code=exc.code,
            duration_us=duration_us,
        )
        return error_response(request.id, exc.code, exc.message, **exc.details)
    log.error(
        "request_crashed", op=_op(request), id=request.id, duration_us=duration_us, exc_info=exc
    )
    return error_response(request.id, Internal.code, f"internal error: {type(exc).__name__}")


def _log_rejected(exc: FleetError, request_id: int | None) -> None:
    log.info("request_rejected", id=request_id, code=exc.code, reason=exc.message)
