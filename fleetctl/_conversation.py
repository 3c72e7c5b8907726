"""The I/O-free half of a client: request ids, framing, and matching answers to requests.

Both the async Client and the blocking SyncClient drive one of these, so they cannot
disagree about the protocol.
"""

import os
from typing import Any, TypeVar

import msgspec

from protocol import MAX_FRAME, PROTOCOL_VERSION
from protocol.errors import (
    BadFrame,
    ConnectionLost,
    FleetError,
    Incompatible,
    InvalidRequest,
    Unavailable,
    error_for_code,
)
from protocol.framing import FrameSplitter, decode_response, encode
from protocol.messages import HelloResult, Message, RawResponse, Request
from protocol.paths import client_socket_path

R = TypeVar("R", bound=Message)
DEFAULT_TIMEOUT = 10.0


def resolve_socket(socket_path: str | None) -> str:
    return socket_path or client_socket_path(os.environ, os.path.exists)


def check_server_version(hello: HelloResult) -> HelloResult:
    if hello.version != PROTOCOL_VERSION:
        raise Incompatible(
            f"fleetd speaks protocol {hello.version}, this client speaks {PROTOCOL_VERSION}",
            server_version=hello.version,
        )
    return hello


def unavailable(socket_path: str, exc: OSError) -> Unavailable:
    return Unavailable(f"no fleetd at {socket_path}: {exc.strerror or exc}")


_result_decoders: dict[type[Message], msgspec.json.Decoder[Any]] = {}


def decode_result(response: RawResponse, result_type: type[R]) -> R:
    """The typed result of `response`, or its error raised as the matching exception."""
    if not response.ok:
        error = response.error
        if error is None:
            raise FleetError("fleetd answered not-ok without an error")
        raise error_for_code(error.code, error.message, error.details)
    decoder = _result_decoders.get(result_type)
    if decoder is None:
        decoder = _result_decoders[result_type] = msgspec.json.Decoder(result_type)
    try:
        result: R = decoder.decode(response.result)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise BadFrame(f"fleetd sent a malformed result: {exc}") from None
    return result


class Conversation:
    def __init__(self, max_frame: int = MAX_FRAME, *, peer: str = "fleetd") -> None:
        self.peer = peer
        """Who answers, for error messages."""
        self._splitter = FrameSplitter(max_frame)
        self._next_id = 0
        self.answers: dict[int, RawResponse] = {}
        self.waiting: set[int] = set()
        self.failure: FleetError | None = None

    def request(self, request_type: type[Request], fields: dict[str, Any]) -> tuple[int, bytes]:
        """The id and frame of a request; InvalidRequest, before anything is sent, for text
        JSON cannot carry (a lone surrogate: what Python makes of an argument that was not
        UTF-8)."""
        request_id = self._next_id + 1
        try:
            frame = encode(request_type(id=request_id, **fields))
        except UnicodeEncodeError as exc:
            raise InvalidRequest(
                f"{request_type.__struct_config__.tag}: {_printable(exc.object)!r} is not "
                "UTF-8 text: nothing sent"
            ) from None
        self._next_id = request_id
        self.waiting.add(request_id)
        return request_id, frame

    def abandon(self, request_id: int) -> None:
        """Forget a request whose caller gave up; a late answer to it is dropped."""
        self.waiting.discard(request_id)
        self.answers.pop(request_id, None)

    def received(self, data: bytes) -> None:
        try:
            frames = self._splitter.feed(data)
        except BadFrame as exc:
            self.fail(ConnectionLost(f"{self.peer} sent a bad frame: {exc.message}"))
            return
        for frame in frames:
            try:
                response = decode_response(frame)
            except BadFrame as exc:
                self.fail(ConnectionLost(f"{self.peer} sent a bad frame: {exc.message}"))
                return
            if response.id is None:
                self.fail(_connection_error(response, self.peer))
            elif response.id in self.waiting:
                self.waiting.discard(response.id)
                self.answers[response.id] = response

    def ended(self) -> None:
        self.fail(ConnectionLost(f"{self.peer} closed the connection"))

    def fail(self, error: FleetError) -> None:
        """Every request still waiting fails with `error`, and so does every later one."""
        if self.failure is None:
            self.failure = error

    def outcome(self, request_id: int) -> RawResponse | None:
        """The answer to `request_id` if it came; raises if the connection failed first."""
        answer = self.answers.pop(request_id, None)
        if answer is None and self.failure is not None:
            self.waiting.discard(request_id)
            raise self.failure
        return answer


def _printable(text: str) -> str:
    return text.encode(errors="backslashreplace").decode()


def _connection_error(response: RawResponse, peer: str) -> FleetError:
    error = response.error
    if error is None:
        return ConnectionLost(f"{peer} sent a frame without an id")
    return error_for_code(error.code, error.message, error.details)
