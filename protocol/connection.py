"""The client side of one connection, without I/O (as h11 is for HTTP): request ids, the
version check, splitting the byte stream into answers, matching each answer to its request by
id, routing a watch's later frames to a push callback, and failing every request at once when
the connection fails. The caller does the reading and writing:

    connection = ClientConnection(peer="fleetd")
    request_id, frame = connection.send(Ping, {})   # write `frame`
    connection.receive_data(chunk)                  # every chunk read, in order; b"" at EOF
    answer = connection.take(request_id)            # None until it came; raises the failure
    result = result_of(answer, Ping)                # an Empty (Ping is an Op[Empty])

Every client-side connection drives one: fleetctl.connection.AsyncConnection (the async Client
and the links to holders, fleetctl.members_client), fleetctl.blocking.BlockingConnection
(SyncClient, a blocking cluster's status) and fleetctl.logs.MemberPresence (a select loop).
fleetctl._fast does not, and says why.
"""

import enum
from collections.abc import Callable, Mapping
from typing import Any, Generic, cast

import msgspec

from protocol import MAX_FRAME, PROTOCOL_VERSION
from protocol.base import Message, Op, R, Request
from protocol.errors import (
    BadFrame,
    ConnectionLost,
    FleetError,
    Incompatible,
    InvalidRequest,
    error_for_code,
)
from protocol.framing import FrameSplitter, decode_response, encode, leading_id
from protocol.messages import ErrorBody, RawResponse

DEFAULT_TIMEOUT = 10.0
"""Seconds a client gives each call, connecting included, unless told otherwise."""


class State(enum.Enum):
    """A client's lifecycle: connect() once, then requests, then close; a closed client
    stays closed (ClientClosed)."""

    UNOPENED = "unopened"
    OPENED = "opened"
    CLOSED = "closed"


def check_version(version: int, peer: str = "fleetd") -> None:
    """Refuse a peer that speaks another protocol version (its hello or bind answer)."""
    if version != PROTOCOL_VERSION:
        raise Incompatible(
            f"{peer} speaks protocol {version}, this client speaks {PROTOCOL_VERSION}",
            server_version=version,
        )


class TypedResponse(Message, Generic[R], frozen=True):
    """A response decoded in one pass, its result as the type its request expects."""

    id: int | None
    ok: bool
    result: R | None = None
    error: ErrorBody | None = None


Answer = RawResponse | TypedResponse[Any]
"""A response as the connection hands it over: typed if it could be, else with a raw result."""

_result_decoders: dict[type[Message], msgspec.json.Decoder[Any]] = {}
_response_decoders: dict[type[Message], msgspec.json.Decoder[Any]] = {}


def result_of(response: Answer, op: type[Op[R]]) -> R:
    """The answer to an `op` request: its result as the op's `result_type`, or its error
    raised as the matching exception (protocol.errors)."""
    result_type: type[R] = op.result_type  # type: ignore[assignment]  # Op[R] sets it to R
    return decode_result(response, result_type)


def decode_result(response: Answer, result_type: type[R]) -> R:
    """The answer's result as `result_type`, or its error raised as the matching exception."""
    if not response.ok:
        error = response.error
        if error is None:
            raise FleetError("the peer answered not-ok without an error")
        raise error_for_code(error.code, error.message, error.details)
    if isinstance(response, TypedResponse):  # decoded as its request's result type, not None
        return cast(R, response.result)
    decoder = _result_decoders.get(result_type)
    if decoder is None:
        decoder = _result_decoders[result_type] = msgspec.json.Decoder(result_type)
    try:
        result: R = decoder.decode(response.result)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise BadFrame(f"malformed result: {exc}") from None
    return result


class ClientConnection:
    """One connection's protocol state. Answers are filed for `take`, or handed to
    `on_answer(request_id, response)` when given (from the caller's reader). After a request
    sent with `pushes=True` is answered, later frames with its id go to `on_push` (a member
    socket's watch). A late answer to an abandoned request is dropped. The first failure (a bad
    frame, an error frame without an id, the end of the stream) sticks: `failure`, raised by
    `take` and `send`."""

    def __init__(
        self,
        *,
        peer: str = "fleetd",
        max_frame: int = MAX_FRAME,
        on_answer: Callable[[int, Answer], None] | None = None,
        on_push: Callable[[RawResponse], None] | None = None,
    ) -> None:
        self.peer = peer
        """Who answers, for error messages ("fleetd", "the holder")."""
        self.failure: FleetError | None = None
        self._splitter = FrameSplitter(max_frame)
        self._next_id = 0
        self._waiting: dict[int, type[Message] | None] = {}
        """Requests waiting for their answer, and the type of the result each expects."""
        self._answers: dict[int, Answer] = {}
        self._pushing: set[int] = set()
        self._watches: set[int] = set()
        self._on_answer = on_answer
        self._on_push = on_push

    def send(
        self, request_type: type[Request], fields: Mapping[str, Any], *, pushes: bool = False
    ) -> tuple[int, bytes]:
        """The id and frame of a new request. Raises the failure if the connection failed, and
        InvalidRequest, before anything is sent, for text JSON cannot carry (a lone surrogate:
        what Python makes of an argument that was not UTF-8)."""
        if self.failure is not None:
            raise self.failure
        request_id = self._next_id + 1
        try:
            frame = encode(request_type(id=request_id, **fields))
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"{request_type.__struct_config__.tag}: {_printable(exc.object)!r} is not "
                "UTF-8 text: nothing sent"
            ) from None
        self._next_id = request_id
        self._waiting[request_id] = getattr(request_type, "result_type", None)
        if pushes:
            self._watches.add(request_id)
        return request_id, frame

    @property
    def waiting(self) -> int:
        """How many requests wait for their answer (or have one filed, not taken)."""
        return len(self._waiting) + len(self._answers)

    def abandon(self, request_id: int) -> None:
        """Forget a request whose caller gave up or got its answer; a late answer is dropped."""
        self._waiting.pop(request_id, None)
        self._answers.pop(request_id, None)

    def take(self, request_id: int) -> Answer | None:
        """The answer to `request_id` if it came; raises the failure if the connection failed
        before it did."""
        answer = self._answers.pop(request_id, None)
        if answer is None and self.failure is not None:
            self._waiting.pop(request_id, None)
            raise self.failure
        return answer

    def receive_data(self, data: bytes) -> None:
        """What was read, in order; b"" for the end of the stream."""
        if self.failure is not None:
            return
        if not data:
            self.fail(ConnectionLost(f"{self.peer} closed the connection"))
            return
        try:
            frames = self._splitter.feed(data)
        except BadFrame as exc:
            self.fail(ConnectionLost(f"{self.peer} sent a bad frame: {exc.message}"))
            return
        for frame in frames:
            try:
                response = self._decode(frame)
            except BadFrame as exc:
                self.fail(ConnectionLost(f"{self.peer} sent a bad frame: {exc.message}"))
                return
            request_id = response.id
            if request_id in self._waiting:
                del self._waiting[request_id]
                if self._watches and request_id in self._watches:
                    self._watches.discard(request_id)
                    self._pushing.add(request_id)
                if self._on_answer is None:
                    self._answers[request_id] = response
                else:
                    self._on_answer(request_id, response)
            elif request_id in self._pushing:
                if self._on_push is not None:
                    assert isinstance(response, RawResponse)  # typed only while waited for
                    self._on_push(response)
            elif request_id is None:
                self.fail(_connection_error(response, self.peer))
                return

    def _decode(self, frame: bytes) -> Answer:
        """An answer to a request waiting here is decoded once, as the response of its result
        type: decoding the frame with its result raw, then the result, parsed it twice (a
        status of 1,000 members is 110 KB). Anything else, or what does not fit its type
        (the error then surfaces from decode_result, as for any answer), is decoded raw."""
        request_id = leading_id(frame)
        result_type = None if request_id is None else self._waiting.get(request_id)
        if result_type is not None and frame.isascii():  # else decode_response checks UTF-8
            try:
                typed: TypedResponse[Any] = _response_decoder(result_type).decode(frame)
            except (msgspec.MsgspecError, RecursionError):
                pass
            else:
                if typed.id == request_id and (typed.result is not None or not typed.ok):
                    return typed
        return decode_response(frame)

    def fail(self, error: FleetError) -> None:
        """Every request still waiting fails with `error`, and so does every later one."""
        if self.failure is None:
            self.failure = error
            self._splitter.discard()


def _response_decoder(result_type: type[Message]) -> msgspec.json.Decoder[Any]:
    decoder = _response_decoders.get(result_type)
    if decoder is None:
        decoder = _response_decoders[result_type] = msgspec.json.Decoder(
            TypedResponse[result_type]  # type: ignore[valid-type]  # a type known at run time
        )
    return decoder


def _printable(text: str) -> str:
    return text.encode(errors="backslashreplace").decode()


def _connection_error(response: Answer, peer: str) -> FleetError:
    error = response.error
    if error is None:
        return ConnectionLost(f"{peer} sent a frame without an id")
    return error_for_code(error.code, error.message, error.details)
