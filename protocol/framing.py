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
    outgrows `max_frame`, however the bytes were chunked.

    A chunk of whole frames is split as it is, with nothing copied to a buffer. A frame cut
    across chunks is held in a bytearray that each chunk extends, and only that chunk is
    searched for a newline: a frame fed in small pieces costs time linear in its length
    (concatenating bytes made it quadratic), and memory within an eighth of it. A chunk
    with one newline is cut there, not split: bytes.split looks at one byte at a time, where
    find and rfind go through a large frame (a 110 KB answer) at memchr's speed."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._partial: bytearray | None = None
        """The start of an unfinished frame: never empty, at most max_frame bytes."""

    def feed(self, data: bytes) -> list[bytes]:
        first = data.find(b"\n")
        if first < 0:
            self._hold(data)
            return []
        if first == data.rfind(b"\n"):  # one frame ends here, maybe a large one
            frames, tail = [data[:first]], data[first + 1 :]
        else:
            frames = data.split(b"\n")
            tail = frames.pop()
        if self._partial is not None:
            frames[0] = self._finish(frames[0])
        if len(data) > self.max_frame and self._outgrown(frames, tail):
            raise self._too_large()
        if tail:
            self._partial = bytearray(tail)
        return frames

    def _hold(self, piece: bytes) -> None:
        """A piece of a frame with no end in it."""
        if self._partial is not None:
            self._extend(piece)
        elif piece:
            if len(piece) > self.max_frame:
                raise self._too_large()
            self._partial = bytearray(piece)

    def _outgrown(self, frames: list[bytes], tail: bytes) -> bool:
        """Whether a line of one chunk is too long (only a chunk over max_frame can hold one)."""
        return len(tail) > self.max_frame or any(len(f) > self.max_frame for f in frames)

    def _extend(self, piece: bytes) -> None:
        assert self._partial is not None
        if len(self._partial) + len(piece) > self.max_frame:
            raise self._too_large()
        self._partial += piece

    def _finish(self, piece: bytes) -> bytes:
        """The held frame completed by `piece`, as bytes; nothing is held after it."""
        self._extend(piece)
        assert self._partial is not None
        frame = bytes(self._partial)
        self._partial = None
        return frame

    def _too_large(self) -> FrameTooLarge:
        return FrameTooLarge(f"frame exceeds {self.max_frame} bytes")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back (a peer that stops mid-frame leaves some)."""
        return 0 if self._partial is None else len(self._partial)

    def discard(self) -> None:
        """Drop the incomplete frame held back (the stream is being given up)."""
        self._partial = None


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
    if not frame.isascii():  # almost every request is: spare it the call
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


_ID_PREFIX = b'{"id":'
_ID_DIGITS = 20
"""At most this many characters of an id (a 64-bit integer) are looked at."""


def leading_id(frame: bytes) -> int | None:
    """The id of a response frame that begins with it as msgspec encodes a Response (`id` its
    first field, no space), read without decoding the frame; None for any other spelling,
    which a client then decodes the slow way (protocol.connection)."""
    if not frame.startswith(_ID_PREFIX):
        return None
    start = len(_ID_PREFIX)
    end = frame.find(b",", start, start + _ID_DIGITS + 1)
    digits = frame[start:end]
    if end < 0 or not digits.isdigit():
        return None
    return int(digits)


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
