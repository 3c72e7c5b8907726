"""A start-up fast path for the commands that scripts and health checks run in loops.

The interpreter starts in about 12 ms; importing click and msgspec would add about 40 ms more,
four times the cost of the work itself. For `ping`, `version` and the table form of `status`
with plain global options, fleetctl speaks the protocol here with only the C modules `_socket`
and `_json`, printing exactly what the click commands print (tests/test_cli.py and
tests/test_detached.py run both and compare). Anything else (other commands, --help, a typo)
returns None and goes through click.

It does not drive the connection core every other client shares (protocol.connection): that
core decodes frames with msgspec and raises protocol.errors, and importing those (msgspec
alone, and typing under protocol.errors) costs more than the whole command takes
(tests/test_layering.py keeps them out; `python -X importtime -c "import msgspec"` shows the
cost). What the core would give it is small here: one request after the hello at a time, so
answers are split at the next newline and checked against the id they answer, in order.
"""

from __future__ import annotations

import _json
import _socket
import os
import sys
import time

from fleetctl import _stdout
from fleetctl.table import status_table
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.paths import client_socket_path, socket_path_problem

TYPE_CHECKING = False  # typing itself costs 3 ms of start-up
if TYPE_CHECKING:
    from typing import Any, ClassVar, NoReturn

_COMMANDS = ("ping", "version")
"""Taking no arguments; `status [NAME…]` is parsed on its own."""
_DEFAULT_TIMEOUT = 10.0
_HELLO = f'"op":"hello","version":{PROTOCOL_VERSION},"client":"fleetctl"'


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
_quote = _json.encode_basestring


class _Failure(Exception):
    """`outcome` is an Outcome's value: protocol.outcomes (an enum) is imported only to exit
    with a failure, since success is always exit 0."""

    def __init__(self, outcome: str, code: str, message: str) -> None:
        self.outcome, self.code, self.message = outcome, code, message


def parse(argv: list[str]) -> tuple[str, str | None, bool, list[str]] | None:
    """(command, socket, json, arguments) when argv is a plain fast-path command line, else
    None. `status` takes member names, and only the table form (its --json list goes through
    click, which encodes it)."""
    socket_path, json_mode, rest = None, False, list(argv)
    while rest and rest[0].startswith("--"):
        option = rest.pop(0)
        if option == "--json":
            json_mode = True
        elif option == "--socket" and rest:
            socket_path = rest.pop(0)
        elif option.startswith("--socket="):
            socket_path = option.removeprefix("--socket=")
        else:
            return None
    if not rest or socket_path == "":
        return None
    command, arguments = rest[0], rest[1:]
    if command in _COMMANDS and not arguments:
        return command, socket_path, json_mode, arguments
    if command == "status" and not json_mode and not any(a.startswith("-") for a in arguments):
        try:
            "".join(arguments).encode()
        except UnicodeEncodeError:  # a name that was not UTF-8: click's path refuses it
            return None
        return command, socket_path, json_mode, arguments
    return None


def run(command: str, socket_path: str | None, json_mode: bool, arguments: list[str]) -> int:
    path = socket_path or client_socket_path(os.environ, os.path.exists)
    try:
        with _Connection(path) as connection:
            if command == "ping":  # times a round trip of its own, after the hello's
                connection.send(_HELLO)
                hello = connection.receive()
                _check_version(hello)
                return _ping(connection, hello, json_mode)
            # The hello and the request go out in one write: fleetd answers both inline, in
            # order, and the answer is read only once the hello's version has been checked.
            if command == "status":
                connection.send(_HELLO, _status_request(arguments))
                _check_version(connection.receive())
                return _status(connection.receive())
            connection.send(_HELLO, '"op":"version"')
            _check_version(connection.receive())
            return _version(connection.receive(), json_mode)
    except _Failure as failure:
        return _fail(failure, json_mode)


def _check_version(hello: dict[str, Any]) -> None:
    """The same refusal as protocol.connection.check_version."""
    if hello.get("version") != PROTOCOL_VERSION:
        raise _Failure(
            "incompatible",
            "incompatible",
            f"fleetd speaks protocol {hello.get('version')}, this client speaks {PROTOCOL_VERSION}",
        )


def _ping(connection: _Connection, hello: dict[str, Any], json_mode: bool) -> int:
    started = time.perf_counter()
    connection.send('"op":"ping"')
    connection.receive()
    rtt_us = round((time.perf_counter() - started) * 1e6)
    server, pid = hello["server"], hello["pid"]
    if json_mode:
        return _envelope(f'"daemon":{{"version":{_quote(server)},"pid":{pid:d}}},"rtt_us":{rtt_us}')
    return _print(f"pong from fleetd {server} (pid {pid}) in {rtt_us} µs")


def _version(daemon: dict[str, Any], json_mode: bool) -> int:
    version, protocol = daemon["version"], daemon["protocol"]
    if json_mode:
        return _envelope(
            f'"client":{{"version":{_quote(RELEASE)},"protocol":{PROTOCOL_VERSION}}},'
            f'"daemon":{{"version":{_quote(version)},"protocol":{protocol:d}}}'
        )
    return _print(
        f"fleetctl {RELEASE} (protocol {PROTOCOL_VERSION})\nfleetd {version} (protocol {protocol})"
    )


def _status_request(names: list[str]) -> str:
    quoted = ",".join(_quote(name) for name in names)
    return f'"op":"member_status","names":[{quoted}]'


def _status(result: dict[str, Any]) -> int:
    """As `fleetctl status [NAME…]` prints it: the table, and exit 11 if a name is absent."""
    members = result.get("members", [])
    if _print(status_table(members)):
        return 1  # the table could not be written
    absent = any(m["state"] == "absent" for m in members)
    return _exit_code("absent") if absent else 0


def exit_now(code: int) -> NoReturn:
    """Exit with `code` once stdout and stderr are flushed, skipping the interpreter's
    teardown: a fast command has no atexit handlers and nothing else to flush, and tearing down
    the modules that site imported costs about as much as the command's own work."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _print(text: str) -> int:
    """0, or 1 when the output could not be written (see fleetctl._stdout)."""
    return 0 if _stdout.write(text) else 1


def _envelope(fields: str) -> int:
    return _print(f'{{"outcome":"ok",{fields}}}')


def _fail(failure: _Failure, json_mode: bool) -> int:
    if json_mode:
        outcome, code = _quote(failure.outcome), _quote(failure.code)
        _print(
            f'{{"outcome":{outcome},"error":{{"code":{code},"message":{_quote(failure.message)}}}}}'
        )
    else:
        sys.stderr.write(f"fleetctl: {failure.message}\n")
    return _exit_code(failure.outcome)


def _exit_code(outcome: str) -> int:
    from protocol.outcomes import Outcome

    return Outcome(outcome).exit_code


_OUTCOME_OF_CODE = {
    "incompatible": "incompatible",
    "unavailable": "unavailable",
    "connection_lost": "unavailable",
    "timeout": "timeout",
    "absent": "absent",
    "contested": "contested",
    "not_owned": "not_owned",
    "not_enabled": "not_enabled",
}
"""Error codes whose outcome (its value) is not `error`, as in protocol/errors.py (which
imports typing)."""


class _Connection:
    """Requests over a blocking socket, answered in the order sent (fleetd answers the fast
    path's ops inline, in order): each answer must carry the id of the oldest request not yet
    answered, or the connection is given up as broken."""

    def __init__(self, path: str) -> None:
        problem = socket_path_problem(path)
        if problem:
            raise _Failure("unavailable", "unavailable", problem)
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(_DEFAULT_TIMEOUT)
        self.buffer = b""
        self.next_id = 0
        self.unanswered: list[int] = []

    def __enter__(self) -> _Connection:
        try:
            self.sock.connect(self.path)
        except TimeoutError:
            self.sock.close()
            raise self._timeout(
                f"connecting to {self.path} took over {_DEFAULT_TIMEOUT}s"
            ) from None
        except OSError as exc:
            self.sock.close()
            raise _Failure(
                "unavailable",
                "unavailable",
                f"no fleetd at {self.path}: {exc.strerror or exc}",
            ) from None
        try:
            self._check_peer()
        except _Failure:
            self.sock.close()
            raise
        return self

    def _check_peer(self) -> None:
        """fleetctl._peer.check_peer, repeated here with the same message because that module
        imports struct and protocol.errors (typing): who listens must run as our uid or root.
        struct ucred is {pid_t pid; uid_t uid; gid_t gid} in native byte order."""
        cred = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        pid = int.from_bytes(cred[0:4], sys.byteorder, signed=True)
        uid = int.from_bytes(cred[4:8], sys.byteorder)
        me = os.getuid()
        if uid not in (me, 0):
            raise _Failure(
                "error",
                "permission_denied",
                f"refusing fleetd at {self.path}: it runs as uid {uid} (pid {pid}), "
                f"not as you (uid {me}) or root",
            )

    def __exit__(self, *_: object) -> None:
        self.sock.close()

    def _timeout(self, message: str) -> _Failure:
        return _Failure("timeout", "timeout", message)

    def send(self, *bodies: str) -> None:
        """Send requests in one write; fleetd answers the fast path's ops in order."""
        frames = []
        for body in bodies:
            self.next_id += 1
            self.unanswered.append(self.next_id)
            frames.append(f'{{{body},"id":{self.next_id}}}\n')
        try:
            self.sock.sendall("".join(frames).encode())
        except TimeoutError:
            raise self._timeout(f"no answer from fleetd within {_DEFAULT_TIMEOUT}s") from None
        except OSError as exc:
            raise self._lost(exc) from None

    def receive(self) -> dict[str, Any]:
        """The result of the next answer; raises _Failure for an error answer."""
        try:
            response = self._read_response()
        except TimeoutError:
            raise self._timeout(f"no answer from fleetd within {_DEFAULT_TIMEOUT}s") from None
        except OSError as exc:
            raise self._lost(exc) from None
        expected = self.unanswered.pop(0)
        answered = response.get("id")
        if answered != expected and answered is not None:  # null: a request fleetd could not read
            raise _Failure(
                "unavailable",
                "connection_lost",
                f"fleetd sent a bad frame: the answer to request {answered!r}, not {expected}",
            )
        if response.get("ok") is True:
            result: dict[str, Any] = response["result"]
            return result
        error = response.get("error") or {}
        code = str(error.get("code", "error"))
        raise _Failure(
            _OUTCOME_OF_CODE.get(code, "error"),
            code,
            str(error.get("message", "fleetd refused the request")),
        )

    def _lost(self, exc: OSError) -> _Failure:
        return _Failure(
            "unavailable", "connection_lost", f"fleetd went away: {exc.strerror or exc}"
        )

    def _read_response(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise _Failure("unavailable", "connection_lost", "fleetd closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        response, _ = _scan(line.decode(), 0)
        if not isinstance(response, dict):
            raise _Failure("error", "bad_frame", "fleetd sent a bad frame")
        return response
