"""Request dispatch without I/O: a frame and its peer in, a response out.

Handlers that never block are plain functions and are answered inline, in the order their
frames arrived; handlers that wait (on the store, on processes) are coroutine functions and
run concurrently, so one slow request never holds up the pipeline behind it.

Long polls (requests that may wait for minutes for something to happen) are capped per
connection: past `max_waits` outstanding, one more is answered limit_exceeded at once. Each
runs under a cancel scope of its own, so that a connection whose peer hung up can end them.

Every answer is logged at debug level (`request_handled`, `request_failed`: op, outcome,
duration, peer): a line per request at info would drown the journal of a busy fleet, whose
rates and latencies the metrics count instead (fleetd.core.metrics). A crash is an error.
"""

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from fleetd.core.bounds import MAX_WAITS
from fleetd.core.identity import identify
from fleetd.core.metrics import REQUEST_SECONDS, REQUESTS
from protocol.errors import BadFrame, ConnectionLost, FleetError, Internal, LimitExceeded
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
    waits: set[anyio.CancelScope] = field(default_factory=set)
    """Its connection's long polls outstanding, each in its own scope (see Dispatcher)."""

    def identity(self) -> Identity:
        """The peer process's identity (its start time pins it among reused pids), read from
        /proc once per connection rather than once per request. Raises ProcessGone."""
        if self._identity is None:
            self._identity = identify(self.pid, self.uid)
        return self._identity

    def end_waits(self) -> None:
        """Cancel every long poll outstanding: nobody is left to read its answer."""
        for scope in list(self.waits):
            scope.cancel()


Handler = Callable[[Any, Peer], Message] | Callable[[Any, Peer], Awaitable[Message]]
Pending = Coroutine[Any, Any, Response]


@dataclass(frozen=True, slots=True)
class _Route:
    op: str
    handler: Handler
    is_async: bool
    waits: Callable[[Any], bool] | None
    counted: bool


class Dispatcher:
    def __init__(
        self,
        decode: Callable[[bytes], Request] = decode_request,
        *,
        max_waits: int = MAX_WAITS,
        counted: bool = False,
    ) -> None:
        """`decode` turns a frame into a request of this socket's ops (default: the control
        socket's), raising the FleetError its response should carry. `max_waits` caps the long
        polls outstanding per connection. `counted`: every answer is counted in the metrics
        (fleetd's, which it serves; a holder's dispatcher counts nothing nobody reads)."""
        self._decode = decode
        self._max_waits = max_waits
        self._counted = counted
        self._routes: dict[type[Request], _Route] = {}

    def register(
        self,
        request_type: type[Request],
        handler: Handler,
        *,
        waits: Callable[[Any], bool] | None = None,
    ) -> None:
        """Route `request_type` to `handler`. `waits` tells
        whether a request of a coroutine handler is a long poll: one that may stay outstanding
        until something happens, capped per connection and ended when its peer hangs up (it
        must be safe to cancel)."""
        is_async = inspect.iscoroutinefunction(handler)
        self._routes[request_type] = _Route(
            _op(request_type), handler, is_async, waits, self._counted
        )

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
            op = _op(type(request))
            return error_response(request.id, "unknown_op", f"op {op!r} not served")
        if route.is_async:
            if route.waits is not None and route.waits(request):
                return self._wait(request, route, peer, started)
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

    def _wait(
        self, request: Request, route: _Route, peer: Peer, started: float
    ) -> Response | Pending:
        """A long poll, unless its connection has all it may have outstanding. It counts from
        now (frames read after it in the same chunk see it), not from when a worker starts it."""
        if len(peer.waits) >= self._max_waits:
            exc = LimitExceeded(
                f"{self._max_waits} long polls are outstanding on this connection: wait for "
                "one to be answered, or open another connection",
                limit="waits_per_connection",
                value=self._max_waits,
            )
            return _failed(request, route, exc, started)
        scope = anyio.CancelScope()
        peer.waits.add(scope)
        return self._finish_wait(request, route, peer, started, scope)

    async def _finish_wait(
        self, request: Request, route: _Route, peer: Peer, started: float, scope: anyio.CancelScope
    ) -> Response:
        try:
            with scope:
                return await self._finish(request, route, peer, started)
        finally:
            peer.waits.discard(scope)
        return error_response(request.id, ConnectionLost.code, "the peer hung up")  # unread


def _op(request_type: type[Request]) -> str:
    return str(request_type.__struct_config__.tag)


def _succeeded(request: Request, route: _Route, result: Message, started: float) -> Response:
    outcome = str(getattr(result, "outcome", "ok"))
    seconds = time.perf_counter() - started
    if route.counted:
        _count(route.op, outcome, seconds)
    log.debug(
        "request_handled",
        op=route.op,
        id=request.id,
        outcome=outcome,
        duration_us=round(seconds * 1e6),
    )
    return Response(id=request.id, ok=True, result=result)


def _failed(request: Request, route: _Route, exc: Exception, started: float) -> Response:
    seconds = time.perf_counter() - started
    duration_us = round(seconds * 1e6)
    if route.counted:
        outcome = str(exc.outcome) if isinstance(exc, FleetError) else Internal.code
        _count(route.op, outcome, seconds)
    if isinstance(exc, FleetError):
        log.debug(
            "request_failed",
            op=route.op,
            id=request.id,
            outcome=str(exc.outcome),
            code=exc.code,
            duration_us=duration_us,
        )
        return error_response(request.id, exc.code, exc.message, **exc.details)
    log.error("request_crashed", op=route.op, id=request.id, duration_us=duration_us, exc_info=exc)
    return error_response(request.id, Internal.code, f"internal error: {type(exc).__name__}")


def _count(op: str, outcome: str, seconds: float) -> None:
    REQUESTS.inc(op, outcome)
    REQUEST_SECONDS.observe(seconds, op)


def _log_rejected(exc: FleetError, request_id: int | None) -> None:
    log.info("request_rejected", id=request_id, code=exc.code, reason=exc.message)
