"""Fuzzing the parsers that take outside input: frames, fleet.toml, and fleetctl's argv.

Each property feeds generated input (random bytes, and structure-aware input: valid frames,
documents and command lines with hostile values put in) and asserts the documented failure
modes only: the decoders raise the FleetError their answer carries, the TOML loader an
InvalidRequest naming where, fleetctl exits with a documented code and prints one envelope
with --json. Anything else (a TypeError, an OverflowError, a traceback) is a crash; each one
found is pinned below, as an `@example` next to the property that found it or a test of its
own.

Bounded for CI: FLEET_FUZZ_EXAMPLES examples a property (default 150, a few seconds each at
most); `FLEET_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py` searches longer.
"""

import json
import math
import os
import re
import socket
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any, ClassVar

import msgspec
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetctl import _fast
from fleetctl.cli import cli, json_requested, run
from fleetctl.sync import SyncClient
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.claims import ClaimGcResult, ClaimList, ClaimResult
from protocol.clusters import ClusterResult, ClusterUp, LogPaths, MemberList
from protocol.connection import ClientConnection, decode_result
from protocol.definitions import ClusterSpec, cluster_from_dict, parse_toml
from protocol.errors import BadFrame, FleetError, InvalidRequest, UnknownOp, error_for_code
from protocol.framing import (
    FrameSplitter,
    decode_request,
    decode_response,
    encode,
    error_response,
    request_id_of,
)
from protocol.members import MEMBER_OPS, BindResult, WatchResult, decode_member_request
from protocol.messages import (
    OPS,
    REQUEST_TYPES,
    Empty,
    HelloResult,
    LeaseEvents,
    LeaseList,
    LeaseResult,
    MetricsText,
    Ping,
    Request,
    Response,
    VersionResult,
)
from protocol.outcomes import EXIT_CODES, Outcome
from protocol.runs import DrainResult, EmitResult, ReceiptResult, RunDetail, RunResult, TaskList
from protocol.status import MemberStatus
from tests.processes import short_tempdir

FUZZ_EXAMPLES = int(os.environ.get("FLEET_FUZZ_EXAMPLES", "150"))
fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,  # pure functions: on a loaded machine a deadline would only measure the load
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- hostile values -----------------------------------------------------------------------------


class RawJson(str):
    """A JSON token written verbatim: numbers json.dumps never writes (1e400, -0, 1E+999)."""


NASTY_NUMBERS = [
    RawJson(t)
    for t in ("1e400", "-1e400", "-0", "1E+999", "0.0000001e-400", "9" * 400, "-" + "9" * 30)
]
NASTY_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**40]
NASTY_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "..",
    "../x",
    "a/b",
    "/",
    "\n",
    "\ud800",
    "é",
    "💥",
    "a" * 300,
    "nan",
    "inf",
    "-1",
    "1e400",
    "9" * 400 + "s",
    "0",
    "5s",
    "1m30s",
    "500ms",
    "TERM",
    "SIGTERM",
    "_DFL",
    "_IGN",
    "_UNBLOCK",
    "_SETMASK",
    "RTMIN",
    "NSIG",
    "log:",
    "log:(",
    "log:a{4294967296}",
    "log:" + "(" * 5000 + ")" * 5000,
    "log:a{1,2}{3}",
    "unix:",
    "unix:/tmp/x",
    "tcp",
    "notify",
    "none",
    "{port}",
    "{dir}",
    "{name}",
    "{",
    "}",
    "{0}",
    "{port!r}",
    "{__class__}",
]

ints = st.sampled_from(NASTY_INTS) | st.integers()
floats = st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 1e308, 0.1, 86_400.0, 86_400.1])
strings = st.sampled_from(NASTY_STRINGS) | st.text(max_size=30)
scalars = st.none() | st.booleans() | ints | floats | strings | st.sampled_from(NASTY_NUMBERS)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=4),
    max_leaves=12,
)


def dump_json(value: Any) -> str:
    """JSON text as a hostile peer might write it: NaN and Infinity tokens included (json.dumps
    writes them), RawJson tokens verbatim, and lone surrogates escaped."""
    if isinstance(value, RawJson):
        return str(value)
    if isinstance(value, list):
        return "[" + ",".join(dump_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ",".join(f"{json.dumps(str(k))}:{dump_json(v)}" for k, v in value.items()) + "}"
        )
    return json.dumps(value)


# -- structure-aware frames: valid shapes, hostile values ---------------------------------------

member_names = st.sampled_from(["a", "web", "db-1", "x.y_z", "A", "-a", "a" * 64, ""]) | strings
commands = (
    st.lists(strings, max_size=3) | strings | st.just(["sleep", "60"]) | st.just([""]) | json_values
)


@st.composite
def member_tables(draw: st.DrawFn, *, with_name: bool) -> dict[str, Any]:
    """A member definition, as a `[members.X]` table (or with its name, as on the wire): each
    key valid, hostile or missing, and sometimes a key nobody knows."""
    keys: dict[str, st.SearchStrategy[Any]] = {
        "command": commands,
        "ready": st.sampled_from(["tcp", "notify", "none", "unix:/tmp/s", "log:ready"]) | strings,
        "restart": st.sampled_from(["no", "on-failure", "always"]) | strings,
        "env": st.dictionaries(strings, strings | json_values, max_size=3) | json_values,
        "cwd": st.none() | strings,
        "stop_signal": st.sampled_from(["TERM", "INT", "KILL", "USR1"]) | strings,
        "stop_timeout": floats | ints | strings | st.sampled_from(NASTY_NUMBERS),
        "start_timeout": floats | ints | strings | st.sampled_from(NASTY_NUMBERS),
        "prepare": st.none() | commands,
    }
    table: dict[str, Any] = {"command": ["sleep", "60"]}
    if with_name:
        table["name"] = draw(member_names)
    for key, values in keys.items():
        choice = draw(st.sampled_from(["keep", "set", "set", "drop"]))
        if choice == "set":
            table[key] = draw(values)
        elif choice == "drop":
            table.pop(key, None)
    if draw(st.booleans()):
        table[draw(strings)] = draw(json_values)
    return table


@st.composite
def cluster_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": draw(member_names),
        "members": draw(st.lists(member_tables(with_name=True), max_size=3)),
    }
    if draw(st.booleans()):
        spec[draw(strings)] = draw(json_values)
    return spec


FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "spec": cluster_specs() | member_tables(with_name=True) | json_values,
    "names": st.lists(member_names, max_size=3) | json_values,
    "content": st.binary(max_size=64).map(lambda b: __import__("base64").b64encode(b).decode())
    | json_values,
    "ttl": floats | ints | st.sampled_from(NASTY_NUMBERS),
    "wait": floats | ints | st.sampled_from(NASTY_NUMBERS),
    "token": ints,
    "pid": ints,
    "version": st.just(PROTOCOL_VERSION) | ints,
    "after": st.none() | ints,
}


@st.composite
def request_frames(draw: st.DrawFn, ops: frozenset[str]) -> bytes:
    """One frame: an op (known or not), an id, each field of a request plausible or hostile,
    then maybe a few bytes overwritten."""
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        body["op"] = draw(st.sampled_from(sorted(ops)) | strings | json_values)
    if draw(st.integers(0, 9)):
        body["id"] = draw(ints | json_values)
    names = [*FIELD_VALUES, "name", "owner", "key", "kind", "cluster", "sibling", "prefix"]
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        body[name] = draw(FIELD_VALUES.get(name, strings | json_values))
    frame = bytearray(dump_json(body).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 2))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame).replace(b"\n", b" ")


any_frame = st.binary(max_size=200) | request_frames(OPS) | request_frames(MEMBER_OPS)

DECODER_ERRORS = (BadFrame, UnknownOp, InvalidRequest)
"""What decode_request documents raising (FrameTooLarge, a BadFrame, is the splitter's)."""


def check_decodes_or_refuses(decode: Callable[[bytes], Request], frame: bytes) -> None:
    try:
        request = decode(frame)
    except DECODER_ERRORS as exc:
        assert exc.message
        request_id_of(frame)  # the error's answer echoes the id: reading it never raises
        return
    again = encode(request)  # what fleetd relays (a spec to a holder) decodes to the same
    assert again.count(b"\n") == 1
    assert decode(again[:-1]) == request


# Crashes this found, each pinned: a ready regex whose repetition overflows, or nested past
# the recursion limit, raised OverflowError / RecursionError out of MemberSpec's validation.
OVERFLOWING_READY = (
    b'{"op":"cluster_up","id":1,"spec":{"name":"a","members":[{"name":"a",'
    b'"command":["x"],"ready":"log:a{4294967296}"}]}}'
)
NESTED_READY = (
    b'{"op":"addmember","id":1,"spec":{"name":"a","command":["x"],"ready":"log:'
    + b"(" * 5000
    + b")" * 5000
    + b'"}}'
)


@fuzz
@given(any_frame)
@example(OVERFLOWING_READY)
@example(NESTED_READY)
def test_control_frames_decode_or_are_refused_with_a_fleet_error(frame: bytes) -> None:
    check_decodes_or_refuses(decode_request, frame)


@fuzz
@given(any_frame)
@example(OVERFLOWING_READY.replace(b"cluster_up", b"addmember").replace(b'"members":[', b"x:["))
@example(NESTED_READY)
def test_member_socket_frames_decode_or_are_refused_with_a_fleet_error(frame: bytes) -> None:
    check_decodes_or_refuses(decode_member_request, frame)


@fuzz
@given(st.lists(st.binary(max_size=40) | any_frame.map(lambda f: f + b"\n"), max_size=8))
def test_the_splitter_gives_back_exactly_the_lines_it_was_fed(chunks: list[bytes]) -> None:
    splitter = FrameSplitter(max_frame=64)
    frames: list[bytes] = []
    for chunk in chunks:
        try:
            frames += splitter.feed(chunk)
        except BadFrame:  # FrameTooLarge, only for a line over the limit
            assert any(len(line) > 64 for line in b"".join(chunks).split(b"\n"))
            return
    stream = b"".join(chunks)
    assert b"\n".join([*frames, stream[len(stream) - splitter.pending :]]) == stream
    assert all(b"\n" not in frame and len(frame) <= 64 for frame in frames)


# -- responses: what a client decodes ----------------------------------------------------------

RESULT_TYPES = (
    Empty,
    HelloResult,
    VersionResult,
    LeaseResult,
    LeaseList,
    LeaseEvents,
    ClaimResult,
    ClaimList,
    ClaimGcResult,
    ClusterResult,
    MemberList,
    MemberStatus,
    LogPaths,
    BindResult,
    WatchResult,
)


@st.composite
def response_frames(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {"id": draw(st.none() | ints | json_values), "ok": draw(scalars)}
    if draw(st.booleans()):
        body["result"] = draw(json_values)
    if draw(st.booleans()):
        body["error"] = draw(
            st.fixed_dictionaries(
                {"code": strings, "message": strings},
                optional={"details": st.dictionaries(strings, json_values, max_size=3)},
            )
            | json_values
        )
    return dump_json(body).encode("utf-8", "surrogatepass").replace(b"\n", b" ")


# Found: error details with a key "message" (or any name FleetError's __init__ takes) made
# error_for_code raise TypeError.
DETAILS_NAMED_MESSAGE = (
    b'{"id":1,"ok":false,"error":{"code":"x","message":"m","details":{"message":2}}}'
)


@fuzz
@given(st.binary(max_size=200) | response_frames())
@example(DETAILS_NAMED_MESSAGE)
@example(DETAILS_NAMED_MESSAGE.replace(b'"x"', b'"absent"'))
def test_responses_decode_to_a_result_or_a_fleet_error(frame: bytes) -> None:
    try:
        response = decode_response(frame)
    except BadFrame:
        return
    for result_type in RESULT_TYPES:
        with suppress(FleetError):
            decode_result(response, result_type)


@fuzz
@given(st.lists(st.binary(max_size=60) | response_frames().map(lambda f: f + b"\n"), max_size=6))
@example([DETAILS_NAMED_MESSAGE + b"\n"])
@example([DETAILS_NAMED_MESSAGE.replace(b'"id":1', b'"id":null') + b"\n"])
def test_a_conversation_fed_anything_answers_or_fails_with_a_fleet_error(
    chunks: list[bytes],
) -> None:
    check_conversation(chunks)


def check_conversation(chunks: list[bytes]) -> None:
    """A client fed `chunks` gives each waiting caller an answer or a FleetError, and each
    answer a result of any type or a FleetError."""
    connection = ClientConnection(max_frame=4096)
    ids = [connection.send(Ping, {})[0] for _ in range(3)]
    for chunk in chunks:
        if chunk:  # b"" is the end of the stream
            connection.receive_data(chunk)
    connection.receive_data(b"")
    for request_id in ids:
        try:
            answer = connection.take(request_id)
        except FleetError:
            continue
        for result_type in RESULT_TYPES if answer is not None else ():
            with suppress(FleetError):
                decode_result(answer, result_type)


@fuzz
@given(strings, strings, st.dictionaries(strings, json_values, max_size=4))
@example("absent", "m", {"message": 1, "code": 2, "details": 3, "self": 4})
def test_any_error_code_and_details_rebuild_a_fleet_error(
    code: str, message: str, details: dict[str, Any]
) -> None:
    error = error_for_code(code, message, details)
    assert isinstance(error, FleetError) and error.message == message
    assert error.outcome in EXIT_CODES


# -- fleet.toml -------------------------------------------------------------------------------

BARE_KEY = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)


def toml_key(key: str) -> str:
    bare = key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key)
    return key if bare else json.dumps(key)


def toml_value(value: Any) -> str:
    """A TOML value for `value`: strings as basic strings (JSON's escapes are TOML's, except
    for lone surrogates, which TOML refuses: that is a syntax error to report, not a crash)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, RawJson):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int | str):
        return json.dumps(value) if isinstance(value, str) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return '""'  # None has no TOML form: an empty string is as wrong


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    """A fleet.toml: a name, member tables written as [members.X] sections, dotted keys or
    inline tables, values valid or hostile; sometimes a line broken or a key repeated."""
    lines: list[str] = []
    if draw(st.booleans()):
        lines.append(f"name = {toml_value(draw(member_names | json_values))}")
    if draw(st.integers(0, 5)) == 0:
        lines.append(f"{toml_key(draw(strings))} = {toml_value(draw(json_values))}")
    for name in draw(st.lists(member_names | BARE_KEY, max_size=3)):
        table = draw(member_tables(with_name=False))
        style = draw(st.sampled_from(["section", "dotted", "inline"]))
        if style == "section":
            lines.append(f"[members.{toml_key(name)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
        elif style == "dotted":
            prefix = f"members.{toml_key(name)}"
            lines += [f"{prefix}.{toml_key(k)} = {toml_value(v)}" for k, v in table.items()]
            lines.append("")
        else:
            lines.insert(0, f"members.{toml_key(name)} = {toml_value(table)}")
    if lines and draw(st.integers(0, 4)) == 0:
        index = draw(st.integers(0, len(lines) - 1))
        lines.insert(index, lines[index])  # a key or table twice
    if lines and draw(st.integers(0, 4)) == 0:
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))]  # cut short
    return "\n".join(lines) + "\n"


# Found: a ready regex that overflows (OverflowError) or nests too deep (RecursionError), and
# stop_signal "_DFL" / "_UNBLOCK" accepted because signal.SIG_DFL exists (0: a stop that sent
# nothing; 1: SIGHUP).
@fuzz
@given(toml_documents() | st.text(max_size=200))
@example('[members.a]\ncommand = ["x"]\nready = "log:a{4294967296}"\n')
@example('[members.a]\ncommand = ["x"]\nready = "log:' + "(" * 5000 + ")" * 5000 + '"\n')
@example('[members.a]\ncommand = ["x"]\nstop_signal = "_DFL"\n')
@example('[members.a]\ncommand = ["x"]\nstop_signal = "_UNBLOCK"\n')
@example('[members.a]\ncommand = ["x"]\nstop_timeout = ' + "9" * 400 + "\n")
def test_fleet_toml_loads_or_is_refused_naming_where(text: str) -> None:
    check_fleet_toml(text)


def check_fleet_toml(text: str) -> None:
    """The loader's contract on `text` (tests/fuzz_targets.py checks it too)."""
    try:
        spec = parse_toml(text)
    except InvalidRequest as exc:
        assert exc.message.startswith("fleet.toml")
        line = exc.details.get("line")
        assert line is None or 1 <= line <= len(text.splitlines())
        return
    assert all(
        m.stop_signal not in ("_DFL", "_IGN", "_BLOCK", "_UNBLOCK", "_SETMASK")
        for m in spec.members
    )
    # What the file defines, the wire carries: fleetd relays it to the holder as it is.
    frame = encode(ClusterUp(id=1, spec=spec))
    decoded = decode_request(frame[:-1])
    assert isinstance(decoded, ClusterUp) and decoded.spec == spec
    # And the library's dict form gives the same cluster.
    assert cluster_from_dict(tomllib.loads(text)) == spec


@fuzz
@given(st.dictionaries(strings, json_values, max_size=3) | cluster_specs() | json_values)
def test_a_dict_definition_loads_or_is_an_invalid_request(document: Any) -> None:
    with suppress(InvalidRequest):
        assert isinstance(cluster_from_dict(document), ClusterSpec)


# -- fleetctl's argv ----------------------------------------------------------------------------


_RUN = {"id": "run-1", "name": "r", "status": "running", "created_at": "2026-01-01T00:00:00Z"}
_RECEIPT = {
    "run_id": "run-1",
    "task_id": "t",
    "worker_id": "w",
    "completed_at": "2026-01-01T00:00:00Z",
    "result": "pass",
}


class FakeFleetd:
    """A control socket that answers hello as fleetd does and every other request with what
    `answer` says: an error code, or a canned result of the op's result type. It decodes every
    frame, so a request fleetctl sends that fleetd would refuse as malformed is seen too."""

    CANNED: ClassVar[dict[type[Any], dict[str, Any]]] = {
        LeaseResult: {"outcome": "acquired", "lease": None},
        ClaimResult: {"outcome": "acquired"},
        ClusterResult: {"outcome": "acquired", "cluster": "c", "holder_pid": 1},
        MemberList: {"members": [{"name": "a", "state": "running", "pid": 1, "cluster": "c"}]},
        MemberStatus: {"name": "a", "state": "stopped", "cluster": "c"},
        LogPaths: {  # a member socket that is gone: `logs -f` ends (without one it follows on)
            "cluster": "c",
            "member": "a",
            "stdout": "/nonexistent",
            "stderr": "/x",
            "socket": "/nonexistent.sock",
        },
        ClaimGcResult: {"outcome": "ok", "dry_run": False},
        ClaimList: {"claims": []},
        LeaseList: {"leases": []},
        VersionResult: {"version": RELEASE, "protocol": PROTOCOL_VERSION},
        MetricsText: {"text": "# HELP fleet_up Up.\n# TYPE fleet_up gauge\nfleet_up 1\n"},
        LeaseEvents: {"cursor": 1, "epoch": "e"},
        RunResult: {"outcome": "acquired", "run": _RUN},
        RunDetail: {"run": _RUN, "summary": _RUN},
        EmitResult: {"outcome": "acquired", "seq": 1},
        ReceiptResult: {"outcome": "acquired", "receipt": _RECEIPT},
        DrainResult: {"draining": True},
        TaskList: {
            "tasks": [
                {
                    "entry": {"run_id": "run-1", "task_id": "a", "priority": 0, "enqueued_at": "t"},
                    "state": "queued",
                },
            ]
        },
    }

    def __init__(self, path: str) -> None:
        self.path = path
        self.answer: str | Outcome = Outcome.OK
        self.malformed: list[bytes] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with sock:
                self._converse(sock)

    def _converse(self, sock: socket.socket) -> None:
        splitter = FrameSplitter()
        sock.settimeout(5)
        while data := self._receive(sock):
            for frame in splitter.feed(data):
                with suppress(OSError):
                    sock.sendall(encode(self._respond(frame)))

    def _receive(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(65536)
        except OSError:
            return b""

    def _respond(self, frame: bytes) -> Response:
        try:
            request = decode_request(frame)
        except BadFrame as exc:
            self.malformed.append(frame)
            return error_response(None, exc.code, exc.message)
        except FleetError as exc:
            return error_response(request_id_of(frame), exc.code, exc.message)
        if request.__struct_config__.tag == "hello":
            result: Any = HelloResult(version=PROTOCOL_VERSION, server=RELEASE, pid=os.getpid())
        elif isinstance(self.answer, str) and not isinstance(self.answer, Outcome):
            return error_response(request.id, self.answer, f"fake {self.answer}")
        else:
            canned = dict(self.CANNED.get(request.result_type, {}))
            if "outcome" in canned:
                canned["outcome"] = str(self.answer)
            result = msgspec.convert(canned, request.result_type)
        return Response(id=request.id, ok=True, result=result)


def test_the_fake_fleetd_has_an_answer_for_every_op() -> None:
    """A result type it cannot make would kill its thread, and every later example would hang."""
    for op in REQUEST_TYPES:
        if op.result_type is not HelloResult:
            msgspec.convert(FakeFleetd.CANNED.get(op.result_type, {}), op.result_type)


@pytest.fixture
def fake_fleetd() -> Iterator[FakeFleetd]:
    root = short_tempdir()
    daemon = FakeFleetd(os.path.join(root, "f.sock"))
    try:
        yield daemon
    finally:
        daemon.close()
        with suppress(OSError):
            os.unlink(daemon.path)
        os.rmdir(root)


def commands_of(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = []
    for name, command in group.commands.items():
        if name == "coord-run":  # runs its COMMAND: tests/test_coord_run.py covers it
            continue
        if name == "top":  # a live view until killed: tests/test_top.py covers it
            continue
        if hasattr(command, "commands"):
            found += commands_of(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


COMMANDS = commands_of(cli)
TOKENS = st.sampled_from(
    ["--json", "--", "-", "-h", "--help", "--timeout", "--socket", "--no-such", "-f", "--wait"]
) | strings.filter(lambda s: "\x00" not in s)
"""argv cannot hold NUL bytes: the kernel ends each argument at the first."""


@st.composite
def command_lines(draw: st.DrawFn, socket_path: str, toml_path: str) -> list[str]:
    """Global options, a command of fleetctl, each of its options maybe given (with a hostile
    value or the right kind), its arguments, and a few stray tokens."""
    argv: list[str] = []
    if draw(st.booleans()):
        argv.append("--json")
    if draw(st.integers(0, 3)):
        argv += ["--socket", draw(st.sampled_from([socket_path, "/nonexistent/s", "x" * 120]))]
    if draw(st.integers(0, 2)) == 0:
        argv += [
            "--timeout",
            draw(st.sampled_from(["nan", "inf", "-1", "0", "1e400", "1e12", "2"]) | TOKENS),
        ]
    path, command = draw(st.sampled_from(COMMANDS))
    argv += path
    for param in command.params:
        if not draw(st.booleans()):
            continue
        if param.param_type_name == "option":
            argv.append(draw(st.sampled_from(param.opts)))
            if not param.is_flag:
                argv.append(
                    draw(
                        st.sampled_from([toml_path, "nan", "inf", "1e400", "9" * 400 + "s"])
                        | st.sampled_from(["0", "-1", "15s", "99999999999999999999999", "a"])
                        | TOKENS
                    )
                )
        else:
            argv += draw(st.lists(TOKENS, min_size=1, max_size=2))
    for _ in range(draw(st.integers(0, 2))):
        argv.insert(draw(st.integers(0, len(argv))), draw(TOKENS))
    return argv


DOCUMENTED_EXITS = set(EXIT_CODES.values())
SEES_NOT_AN_ENVELOPE = ("-h", "--help", "--version")


def run_fleetctl(argv: list[str], stdin: bytes) -> tuple[int, bytes, bytes]:
    with CliRunner().isolation(input=stdin) as (out, err, _):
        code = run(argv)
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue(), err.getvalue()


@settings(
    fuzz,
    max_examples=max(FUZZ_EXAMPLES, 300),
    suppress_health_check=[*fuzz.suppress_health_check, HealthCheck.function_scoped_fixture],
)
@given(st.data())
def test_fleetctl_exits_with_a_documented_code_and_one_envelope_with_json(
    fake_fleetd: FakeFleetd, tempdir: str, data: st.DataObject
) -> None:
    toml_path = os.path.join(tempdir, "fleet.toml")
    with open(toml_path, "w") as f:
        f.write(data.draw(toml_documents() | st.just('[members.a]\ncommand = ["true"]\n')))
    fake_fleetd.answer = data.draw(
        st.sampled_from(list(Outcome)) | st.sampled_from(["absent", "contested", "internal", "x"])
    )
    argv = data.draw(command_lines(fake_fleetd.path, toml_path))
    stdin = data.draw(st.binary(max_size=32) | st.just(b"content\n"))
    check_command_line(fake_fleetd, argv, stdin)


@pytest.mark.parametrize("options", [[], ["-f"], ["-t"], ["-f", "-t"]])
def test_logs_of_an_answer_that_names_no_log_is_absent(
    fake_fleetd: FakeFleetd, options: list[str]
) -> None:
    code, out, err = run_fleetctl(["--socket", fake_fleetd.path, "logs", "a", *options], b"")
    assert (code, out) == (EXIT_CODES[Outcome.ABSENT], b""), err
    assert b"no member or cluster 'a'" in err


def check_command_line(daemon: FakeFleetd, argv: list[str], stdin: bytes) -> None:
    """fleetctl's contract on `argv` (tests/fuzz_targets.py checks it too), and when the
    start-up fast path takes `argv`, that it does exactly what the click command does."""
    code, out, err = run_fleetctl(argv, stdin)
    assert code in DOCUMENTED_EXITS, (argv, code, out, err)
    if json_requested(argv) and not any(a in SEES_NOT_AN_ENVELOPE for a in argv) and out:
        (line,) = out.splitlines()
        envelope = json.loads(line)
        assert EXIT_CODES[Outcome(envelope["outcome"])] == code, (argv, envelope)
    assert not daemon.malformed, (argv, daemon.malformed)
    command = _fast.parse(argv)
    if command is not None:
        fast = run_fast(command, stdin)
        assert without_round_trip(fast) == without_round_trip((code, out, err)), argv


def run_fast(command: _fast.Command, stdin: bytes) -> tuple[int, bytes, bytes]:
    with CliRunner().isolation(input=stdin) as (out, err, _):
        code = _fast.run(command)
        sys.stdout.flush()
        sys.stderr.flush()
        return code, out.getvalue(), err.getvalue()


def without_round_trip(result: tuple[int, bytes, bytes]) -> tuple[int, bytes, bytes]:
    """`ping` times its round trip: the one figure two runs do not share."""
    code, out, err = result
    out = re.sub(rb'"rtt_us":\d+', b'"rtt_us":0', re.sub(rb" in \d+ \xc2\xb5s", b" in 0 us", out))
    return code, out, err


NOT_UTF8 = b"\xff".decode(errors="surrogateescape")
"""What Python makes of an argument byte that is not UTF-8: a lone surrogate."""


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        # --timeout NaN passed FloatRange (every comparison with NaN is false), then made
        # socket.settimeout raise ValueError; inf and 1e400 made it raise OverflowError.
        (["--timeout", "nan", "ping"], 2),
        (["--timeout", "inf", "ping"], 2),
        (["--timeout", "1e400", "version"], 2),
        # 400 digits of seconds parse to inf: the blocking client's deadline then overflowed.
        (["wait", "a", "--timeout", "9" * 400 + "s"], 2),
        # An argument that is not UTF-8 made msgspec raise UnicodeEncodeError: while encoding
        # the request, or the usage envelope that echoes it.
        (["lease", "inspect", NOT_UTF8], 1),
        (["--json", "status", NOT_UTF8], 1),
        (["claims", "inspect", "--kind", "file", "--key", "k", NOT_UTF8], 2),
        (["--socket", f"/tmp/{NOT_UTF8}/none", "ping"], 14),
        # A wait of 1e23 s made the blocking client's socket timeout overflow a C long.
        (["drain", "--wait", "9" * 23], 2),
    ],
)
def test_command_lines_fuzzing_found(fake_fleetd: FakeFleetd, argv: list[str], code: int) -> None:
    if "--socket" not in argv:
        argv = ["--socket", fake_fleetd.path, *argv]
    assert run_fleetctl(argv, b"")[0] == code


def test_the_blocking_client_takes_a_timeout_past_what_a_c_long_holds(
    fake_fleetd: FakeFleetd,
) -> None:
    with SyncClient(fake_fleetd.path, timeout=1e23) as client:
        client.request(Ping, timeout=1e23)


def test_the_fast_path_leaves_what_is_not_utf8_to_click_and_takes_any_socket_path() -> None:
    assert _fast.parse(["status", NOT_UTF8]) is None  # its request could not be encoded
    with CliRunner().isolation() as (_, err, _):
        assert _fast.run(_fast.Command("ping", {}, socket_path=f"/tmp/{NOT_UTF8}/none")) == 14
        sys.stderr.flush()
        assert err.getvalue().startswith(b"fleetctl: no fleetd at /tmp/\\udcff/none")
