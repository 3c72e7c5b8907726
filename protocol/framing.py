"""Newline-delimited frames: one compact JSON object per line.

Compact msgspec JSON never contains a raw newline byte, so a newline always ends a frame.
The size limit is enforced on raw bytes before anything is decoded.
"""

from typing import Any

import msgspec

from protocol import MAX_FRAME
from protocol.errors import BadFrame, FrameTooLarge, InvalidRequest, UnknownOp
from protocol.messages import OPS, AnyRequest, ErrorBody, RawResponse, Request, Response

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(AnyRequest)
_response_decoder = msgspec.json.Decoder(RawResponse)


class _Envelope(msgspec.Struct):
    """Just enough of a rejected request to answer it: its id and its op, if readable."""

    id: int | None = None
    op: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_UNDECODABLE = (msgspec.MsgspecError, RecursionError, UnicodeDecodeError)


class FrameSplitter:
    """Splits a byte stream into frames, incrementally; raises FrameTooLarge when a line
    outgrows `max_frame`, however the bytes were chunked."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self._buffer + data if self._buffer else data
        frames = buffer.split(b"\n")
        self._buffer = frames.pop()
        if len(self._buffer) > self.max_frame or any(len(f) > self.max_frame for f in frames):
            raise FrameTooLarge(f"frame exceeds {self.max_frame} bytes")
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (a peer that stops mid-frame leaves some)."""
        return len(self._buffer)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message) + b"\n"


def encode_response(response: Response, buffer: bytearray) -> None:
    """Append a framed response to `buffer`, so that a batch goes out in one write."""
    _encoder.encode_into(response, buffer, len(buffer))
    buffer += b"\n"


def decode_request(frame: bytes) -> Request:
    """Decode one frame into a request, raising the error its response should carry."""
    return decode_request_with(_request_decoder, OPS, frame)


def decode_request_with(
    decoder: msgspec.json.Decoder[Any], ops: frozenset[str], frame: bytes
) -> Request:
    """Decode `frame` with `decoder`, a decoder of a union of requests whose tags are `ops`
    (the member sockets speak their own ops in the same framing)."""
    _require_utf8(frame)
    try:
        request: Request = decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise _explain_invalid(frame, exc, ops) from None
    except msgspec.DecodeError as exc:
        raise BadFrame(f"malformed frame: {exc}") from None
    except RecursionError:
        raise BadFrame("frame is nested too deeply") from None
    return request


def _require_utf8(frame: bytes) -> None:
    """msgspec skips unknown fields without validating their bytes: check the whole frame
    (cheaply, since almost every frame is ASCII)."""
    if not frame.isascii():
        try:
            frame.decode()
        except UnicodeDecodeError as exc:
            raise BadFrame(f"frame is not UTF-8: {exc.reason} at byte {exc.start}") from None


def request_id_of(frame: bytes) -> int | None:
    """The id a rejected frame carried, so that its error can echo it."""
    try:
        return _envelope_decoder.decode(frame).id
    except _UNDECODABLE:
        return None


_ECHO_LIMIT = 100
"""Characters of a client's bad value echoed back, so an error frame stays small."""


def _explain_invalid(frame: bytes, exc: msgspec.ValidationError, ops: frozenset[str]) -> Exception:
    if not frame.lstrip().startswith(b"{"):
        return BadFrame("frame is not a JSON object")
    try:
        envelope = _envelope_decoder.decode(frame)
    except _UNDECODABLE:
        return InvalidRequest(f"invalid request: {exc}")
    if isinstance(envelope.op, str) and envelope.op not in ops:
        op = envelope.op[:_ECHO_LIMIT]
        return UnknownOp(f"unknown op {op!r}", op=op)
    return InvalidRequest(f"invalid request: {exc}")


def decode_response(frame: bytes) -> RawResponse:
    _require_utf8(frame)
    try:
        response: RawResponse = _response_decoder.decode(frame)
    except msgspec.MsgspecError as exc:
        raise BadFrame(f"malformed response frame: {exc}") from None
    except RecursionError:
        raise BadFrame("response frame is nested too deeply") from None
    return response


def error_response(request_id: int | None, code: str, message: str, **details: Any) -> Response:
    return Response(
        id=request_id, ok=False, error=ErrorBody(code=code, message=message, details=details)
    )
