"""The fast path's side of the control socket, with only the C modules `_socket` and `_json`.

It does not drive the connection core every other client shares (protocol.connection): that
core decodes frames with msgspec and raises protocol.errors, and importing those (msgspec
alone, and typing under protocol.errors) costs more than the whole command takes
(tests/test_layering.py keeps them out). What the core would give it is small here: a request
or two at a time, so answers are split at the next newline and checked against the id they
answer, in order; a deadline per request, as fleetctl.blocking keeps one; and each failure
reported with the message the core's would carry.

Results are read with `fields`, which keeps the text of each value beside its value: what
fleetd encoded (msgspec, as fleetctl's click commands encode the envelope they print) is
printed as it came, so that a thousand members are not decoded and encoded again to be
printed byte for byte the same. fleetd and fleetctl ship together (protocol.RELEASE).
"""

from __future__ import annotations

import _json
import _socket
import os
import sys
import time

from protocol import PROTOCOL_VERSION
from protocol.paths import no_fleetd, socket_path_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

    Fields = dict[str, tuple[Any, str]]
    """A JSON object's members: each one's value, and its text as it came."""


class _ScanContext:
    """What _json.make_scanner reads from json.JSONDecoder, without importing json."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: ClassVar[dict[str, Any]] = {}


_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]  # duck-typed context
quote = _json.encode_basestring
"""A JSON string, escaped as msgspec escapes it (tests/test_fast.py compares them)."""

_SPACE = " \t\n\r"
_READ_SIZE = 1 << 16


class Failure(Exception):
    """What a command reports instead of its result: `outcome` is an Outcome's value
    (protocol.outcomes, an enum, is imported only to exit with it) and `code` a wire code
    (protocol.errors)."""

    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome, self.code, self.message = outcome, code, message


ERROR_OUTCOMES = {
    "error": "error",
    "bad_frame": "error",
    "frame_too_large": "error",
    "unknown_op": "error",
    "invalid_request": "error",
    "unsupported": "error",
    "internal": "error",
    "no_space": "error",
    "compacted": "error",
    "already_running": "error",
    "startup_failed": "error",
    "state_lost": "error",
    "store_corrupt": "error",
    "unsafe_path": "error",
    "closed": "error",
    "permission_denied": "error",
    "member_failed": "error",
    "limit_exceeded": "error",
    "not_owned": "not_owned",
    "not_enabled": "not_enabled",
    "absent": "absent",
    "contested": "contested",
    "timeout": "timeout",
    "unavailable": "unavailable",
    "connection_lost": "unavailable",
    "store_unavailable": "unavailable",
    "incompatible": "incompatible",
}
"""Every error code of protocol/errors.py (which imports typing) and its outcome; a code
this release does not know is reported as `error`, as protocol.errors.error_for_code does.
tests/test_fast.py holds the two together."""


def failure_for(code: str, message: str) -> Failure:
    """The failure an error answer with `code` reports."""
    if code not in ERROR_OUTCOMES:
        code = "error"
    return Failure(ERROR_OUTCOMES[code], code, message)


def fields(text: str, *, inner: str = "") -> Fields:
    """The members of the JSON object `text`: each key's value, and the text of that value;
    the value of key `inner`, when an object, as its own fields (one decoding for both).
    Raises ValueError when `text` is not one JSON object."""
    try:
        found, end = _object(text, _skip(text, 0), inner)
    except (IndexError, StopIteration):
        raise ValueError("not a JSON object") from None
    if _skip(text, end) != len(text):
        raise ValueError("not a JSON object")
    return found


def is_int(value: object) -> bool:
    """Whether `value` decodes as msgspec decodes an int (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def malformed() -> Failure:
    """A result the command cannot read, reported as protocol.connection.decode_result would."""
    return Failure("error", "bad_frame", "malformed result")


def _object(text: str, at: int, inner: str = "") -> tuple[Fields, int]:
    if text[at] != "{":
        raise ValueError(at)
    found: Fields = {}
    at = _skip(text, at + 1)
    if text[at] == "}":
        return found, at + 1
    while True:
        key, at = _scan(text, at)
        at = _skip(text, at)
        if not isinstance(key, str) or text[at] != ":":
            raise ValueError(at)
        start = _skip(text, at + 1)
        if key == inner and text[start] == "{":
            value, at = _object(text, start)
        else:
            value, at = _scan(text, start)
        found[key] = (value, text[start:at])
        at = _skip(text, at)
        if text[at] == "}":
            return found, at + 1
        if text[at] != ",":
            raise ValueError(at)
        at = _skip(text, at + 1)


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in _SPACE:
        at += 1
    return at


class Connection:
    """Requests over a blocking socket, answered in the order sent: each answer must carry
    the id of the oldest request not yet answered, or the connection is given up as broken.
    fleetd answers ops that wait (member_wait) later than ops it answers at once, so at most
    one of those is ever outstanding here, and it is the last."""

    def __init__(self, path: str, timeout: float) -> None:
        problem = socket_path_problem(path)
        if problem:
            raise Failure("unavailable", "unavailable", problem)
        self.path = path
        self.timeout = timeout
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.chunks: list[bytes] = []
        self.next_id = 0
        self.unanswered: list[tuple[int, float]] = []
        """Each request waiting for its answer, with the seconds it was given."""

    def __enter__(self) -> Connection:
        """Connect as fleetctl.boundary.connecting and fleetctl.blocking do, with their
        messages, and check who listens."""
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect(self.path)
        except TimeoutError:
            self.sock.close()
            raise Failure(
                "timeout", "timeout", f"connecting to {self.path} took over {self.timeout}s"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise Failure(
                "unavailable", "unavailable", no_fleetd(self.path, exc.strerror or str(exc))
            ) from None
        try:
            self._check_peer()
        except Failure:
            self.sock.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def _check_peer(self) -> None:
        """fleetctl._peer.check_peer, repeated here with the same message because that module
        imports struct and protocol.errors (typing): who listens must run as our uid or root.
        struct ucred is {pid_t pid; uid_t uid; gid_t gid} in native byte order."""
        cred = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        pid = int.from_bytes(cred[0:4], sys.byteorder, signed=True)
        uid = int.from_bytes(cred[4:8], sys.byteorder)
        me = os.getuid()
        if uid not in (me, 0):
            raise Failure(
                "error",
                "permission_denied",
                f"refusing fleetd at {self.path}: it runs as uid {uid} (pid {pid}), "
                f"not as you (uid {me}) or root",
            )

    def hello(self, *, then: str | None = None, timeout: float | None = None) -> Fields:
        """Exchange protocol versions, as every client does first. A request `then` that
        changes nothing goes out in the same write, given `timeout` (fleetd answers both, in
        order: read it with `receive`); a request that changes something waits for the
        version check, which may refuse to send it."""
        hello = f'"op":"hello","version":{PROTOCOL_VERSION},"client":"fleetctl"'
        if then is None:
            self.send(hello)
        else:
            self.send(hello, then, timeout=timeout)
        answer = self.receive()
        version = answer.get("version", (None, ""))[0]
        if version != PROTOCOL_VERSION:  # protocol.connection.check_version's refusal
            raise Failure(
                "incompatible",
                "incompatible",
                f"fleetd speaks protocol {version}, this client speaks {PROTOCOL_VERSION}",
            )
        return answer

    def request(self, body: str, timeout: float | None = None) -> Fields:
        """Send one request and read its answer, within `timeout` seconds (default: the
        connection's); see `receive`."""
        self.send(body, timeout=timeout)
        return self.receive()

    def send(self, *bodies: str, timeout: float | None = None) -> None:
        """Send requests (their fields, without an id) in one write; the last one is given
        `timeout` seconds to be answered, the others the connection's."""
        frames = []
        for body in bodies:
            self.next_id += 1
            self.unanswered.append((self.next_id, self.timeout))
            frames.append(f'{{{body},"id":{self.next_id}}}\n')
        if timeout is not None:
            self.unanswered[-1] = (self.next_id, timeout)
        try:
            self.sock.settimeout(self.unanswered[-1][1])
            self.sock.sendall("".join(frames).encode())
        except TimeoutError:
            raise self._timeout(self.unanswered[-1][1]) from None
        except OSError as exc:
            raise self._lost(exc) from None

    def receive(self) -> Fields:
        """The fields of the result of the oldest answer not yet read; raises Failure for an
        error answer, or none in time."""
        line, expected = self._next_line()
        return self._result(line, expected)[0]

    def receive_text(self) -> str:
        """The JSON text of the result of the oldest answer not yet read, as `receive` reads
        it, but not decoded when the answer is laid out as fleetd lays out a successful one
        (`{"id":N,"ok":true,"result":RESULT}`): its caller reads what it needs of a page of
        thousands of tasks."""
        line, expected = self._next_line()
        head = f'{{"id":{expected},"ok":true,"result":{{'
        if line.startswith(head) and line.endswith("}}"):
            return line[len(head) - 1 : -1]
        return self._result(line, expected)[1]

    def _next_line(self) -> tuple[str, int]:
        """The oldest answer not yet read, and the id it must carry."""
        expected, seconds = self.unanswered.pop(0)
        try:
            return self._read_line(time.monotonic() + seconds), expected
        except TimeoutError:
            raise self._timeout(seconds) from None
        except OSError as exc:
            raise self._lost(exc) from None

    def _result(self, line: str, expected: int) -> tuple[Fields, str]:
        """The result of answer `line` to request `expected`, and its text."""
        try:
            response = fields(line, inner="result")
        except ValueError:
            raise _bad_frame() from None
        answered = response.get("id", (None, ""))[0]
        if answered != expected and answered is not None:  # null: a request fleetd could not read
            raise _bad_frame(f"the answer to request {answered!r}, not {expected}")
        if response.get("ok", (None, ""))[0] is True:
            result, text = response.get("result", (None, ""))
            if not isinstance(result, dict):
                raise malformed()
            return result, text
        error = response.get("error", (None, ""))[0]
        if not isinstance(error, dict):
            raise _bad_frame()
        raise failure_for(str(error.get("code")), str(error.get("message")))

    def _read_line(self, deadline: float) -> str:
        chunks = self.chunks
        while not chunks or b"\n" not in chunks[-1]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            data = self.sock.recv(_READ_SIZE)
            if not data:
                raise Failure("unavailable", "connection_lost", "fleetd closed the connection")
            chunks.append(data)
        line, _, rest = b"".join(chunks).partition(b"\n")
        self.chunks = [rest] if rest else []
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise _bad_frame() from None

    def _timeout(self, seconds: float) -> Failure:
        return Failure("timeout", "timeout", f"no answer from fleetd within {seconds}s")

    def _lost(self, exc: OSError) -> Failure:
        return Failure("unavailable", "connection_lost", f"fleetd went away: {exc.strerror or exc}")


def _bad_frame(why: str = "not a response") -> Failure:
    """As protocol.connection reports a frame it cannot read: the connection is lost."""
    return Failure("unavailable", "connection_lost", f"fleetd sent a bad frame: {why}")
