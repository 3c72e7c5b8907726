"""Hostile and clumsy peers against a real fleetd, over raw unix sockets.

Each test is one behaviour, and each ends by checking that the daemon still serves a fresh
connection and logged no traceback: a peer can lose its own connection, never the daemon.
"""

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
from contextlib import ExitStack

import msgspec
import pytest

from protocol import MAX_FRAME, PROTOCOL_VERSION, RELEASE
from protocol.connection import check_version
from protocol.errors import Incompatible
from protocol.framing import encode
from protocol.messages import Ping, Version
from tests.processes import Fleetd
from tests.wire import (
    TIMEOUT,
    ask,
    assert_ping_answered,
    assert_still_serving,
    drain,
    error_of,
    frames_until_closed,
    raw,
    read_frames,
)

# -- frames that end the connection -------------------------------------------------------------


NOT_A_FRAME = {
    "garbage": b"GET / HTTP/1.1\r\nHost: fleetd\r\n\r\n",
    "invalid_utf8": b"\xff\xfe\xfd\xfc\n",
    "invalid_utf8_inside_a_string": b'{"op":"hello","id":1,"version":1,"client":"\xff"}\n',
    "deeply_nested": b'{"op":"ping","id":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
}


@pytest.mark.parametrize("data", NOT_A_FRAME.values(), ids=list(NOT_A_FRAME))
def test_bytes_that_are_not_a_frame_get_one_bad_frame_error_then_close(
    fleetd: Fleetd, data: bytes
) -> None:
    with raw(fleetd) as sock:
        sock.sendall(data)
        frames = frames_until_closed(sock)
    assert [error_of(f) for f in frames] == [(None, "bad_frame")]
    assert_still_serving(fleetd)


def test_ten_mib_line_gets_frame_too_large_then_close(fleetd: Fleetd) -> None:
    """The daemon refuses once the line passes the limit, and may close while we still send."""
    line = b"x" * (10 << 20)
    sent = 0
    send_error: list[BaseException] = []

    def send() -> None:
        nonlocal sent
        try:
            for start in range(0, len(line), 65536):
                sock.sendall(line[start : start + 65536])
                sent = start + 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        except BaseException as exc:  # reported by the main thread
            send_error.append(exc)

    with raw(fleetd) as sock:
        sender = threading.Thread(target=send)
        sender.start()
        try:
            frames = frames_until_closed(sock)
        finally:
            sender.join(TIMEOUT)
    assert not sender.is_alive() and not send_error
    assert [error_of(f) for f in frames] == [(None, "frame_too_large")]
    assert str(MAX_FRAME) in frames[0]["error"]["message"]  # type: ignore[index]
    assert sent < len(line), "the daemon read the whole 10 MiB before refusing it"
    assert_still_serving(fleetd)


def test_frame_of_exactly_max_bytes_is_read_and_answered(fleetd: Fleetd) -> None:
    """The limit counts the frame without its newline: MAX_FRAME bytes still get an answer."""
    prefix = b'{"op":"ping","id":3,"pad":"'
    frame = prefix + b"x" * (MAX_FRAME - len(prefix) - 2) + b'"}'
    assert len(frame) == MAX_FRAME
    with raw(fleetd) as sock:
        assert ask(sock, frame + b"\n") == {"id": 3, "ok": True, "result": {}}
    assert_still_serving(fleetd)


# -- requests refused one at a time: the connection goes on ------------------------------------


def test_unknown_op_echoes_the_id_and_the_connection_stays_usable(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        answer = ask(sock, b'{"op":"frobnicate","id":5,"with":"feeling"}\n')
        assert error_of(answer) == (5, "unknown_op")
        assert answer["error"]["details"] == {"op": "frobnicate"}  # type: ignore[index]
        assert "frobnicate" in answer["error"]["message"]  # type: ignore[index]
        assert_ping_answered(sock, 6)
    assert_still_serving(fleetd)


@pytest.mark.parametrize(
    ("frame", "request_id", "field"),
    [
        (b'{"op":"ping"}', None, "`id`"),
        (b'{"op":"hello","id":7}', 7, "`version`"),
        (b'{"id":8}', 8, "`op`"),
    ],
    ids=["ping-without-id", "hello-without-version", "no-op"],
)
def test_missing_field_is_invalid_request_and_the_connection_stays_usable(
    fleetd: Fleetd, frame: bytes, request_id: int | None, field: str
) -> None:
    with raw(fleetd) as sock:
        answer = ask(sock, frame + b"\n")
        assert error_of(answer) == (request_id, "invalid_request")
        assert field in answer["error"]["message"]  # type: ignore[index]
        assert_ping_answered(sock, 9)
    assert_still_serving(fleetd)


@pytest.mark.parametrize(
    ("frame", "request_id", "field"),
    [
        (b'{"op":"hello","id":10,"version":"1"}', 10, "`$.version`"),
        (b'{"op":"hello","id":11,"version":1,"client":["x"]}', 11, "`$.client`"),
        (b'{"op":"ping","id":"12"}', None, "`$.id`"),
        (b'{"op":"ping","id":1.5}', None, "`$.id`"),
    ],
    ids=["version-as-string", "client-as-list", "id-as-string", "id-as-float"],
)
def test_wrong_type_is_invalid_request_and_the_connection_stays_usable(
    fleetd: Fleetd, frame: bytes, request_id: int | None, field: str
) -> None:
    with raw(fleetd) as sock:
        answer = ask(sock, frame + b"\n")
        assert error_of(answer) == (request_id, "invalid_request")
        assert field in answer["error"]["message"]  # type: ignore[index]
        assert_ping_answered(sock, 13)
    assert_still_serving(fleetd)


@pytest.mark.parametrize(
    ("member", "field"),
    [
        ('"cwd":"/tmp/a\\u0000b"', "cwd must not contain a NUL byte"),
        ('"env":{"A":"a\\u0000"}', "environment variable A must be a string without NUL"),
        ('"ready":"unix:/run/\\u0000.sock"', "ready unix:PATH must not contain a NUL byte"),
    ],
    ids=["cwd", "env", "ready-unix"],
)
def test_a_nul_byte_bound_for_the_kernel_is_refused_naming_its_field(
    fleetd: Fleetd, member: str, field: str
) -> None:
    spec = f'{{"name":"c","members":[{{"name":"m","command":["true"],{member}}}]}}'
    with raw(fleetd) as sock:
        answer = ask(sock, f'{{"op":"cluster_up","id":5,"spec":{spec}}}\n'.encode())
        assert error_of(answer) == (5, "invalid_request")
        assert field in answer["error"]["message"]  # type: ignore[index]
    assert not os.path.exists(os.path.join(fleetd.root, "c", "c")), "nothing was started"
    assert_still_serving(fleetd)


def test_unknown_fields_are_ignored(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        answer = ask(sock, b'{"op":"version","id":1,"since":"v2","trace":{"a":[1,2]}}\n')
    assert answer == {"id": 1, "ok": True, "result": {"version": RELEASE, "protocol": 1}}
    assert_still_serving(fleetd)


def test_hello_with_another_protocol_version_is_incompatible(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        answer = ask(sock, b'{"op":"hello","id":1,"version":999,"client":"future"}\n')
    assert error_of(answer) == (1, "incompatible")
    assert answer["error"]["details"] == {"server_version": PROTOCOL_VERSION}  # type: ignore[index]
    assert_still_serving(fleetd)


def test_client_refuses_a_server_of_another_protocol_version() -> None:
    with pytest.raises(Incompatible, match="fleetd speaks protocol") as raised:
        check_version(PROTOCOL_VERSION + 1)
    assert raised.value.details == {"server_version": PROTOCOL_VERSION + 1}
    assert raised.value.outcome.exit_code == 15
    check_version(PROTOCOL_VERSION)


# -- clumsy peers -------------------------------------------------------------------------------


def test_silent_client_does_not_hold_up_others(fleetd: Fleetd) -> None:
    with raw(fleetd) as silent, raw(fleetd) as half_frame:
        half_frame.sendall(b'{"op":"pi')
        for _ in range(3):
            assert_still_serving(fleetd)
        with raw(fleetd) as other:
            assert_ping_answered(other, 1)
        assert_ping_answered(silent, 2)
    assert_still_serving(fleetd)


def test_client_disconnecting_mid_frame_is_forgotten(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        sock.sendall(encode(Ping(id=1)) + b'{"op":"ping","i')
        assert read_frames(sock, 1) == [{"id": 1, "ok": True, "result": {}}]
    assert_still_serving(fleetd)


def test_client_disconnecting_with_answers_unread_is_forgotten(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        sock.sendall(b"".join(encode(Ping(id=i)) for i in range(1, 2001)))
    assert_still_serving(fleetd)


def test_five_hundred_connections_at_once_are_all_answered(fleetd: Fleetd) -> None:
    count = 500
    with ExitStack() as stack:
        socks = [stack.enter_context(raw(fleetd)) for _ in range(count)]
        for i, sock in enumerate(socks):
            sock.sendall(encode(Ping(id=i)))
        for i, sock in enumerate(socks):
            assert read_frames(sock, 1) == [{"id": i, "ok": True, "result": {}}]
        assert_still_serving(fleetd)
    assert_still_serving(fleetd)


def test_a_thousand_pipelined_requests_in_one_write_are_all_answered(fleetd: Fleetd) -> None:
    requests = [Ping(id=i) if i % 2 else Version(id=i) for i in range(1, 1001)]
    with raw(fleetd) as sock:
        sock.sendall(b"".join(encode(r) for r in requests))
        answers = read_frames(sock, len(requests))
    assert sorted(a["id"] for a in answers) == list(range(1, 1001))  # type: ignore[type-var]
    version = {"version": RELEASE, "protocol": PROTOCOL_VERSION}
    for answer in answers:
        assert answer["ok"] is True
        assert answer["result"] == ({} if answer["id"] % 2 else version)  # type: ignore[operator]
    assert [a["id"] for a in answers] == list(range(1, 1001)), "inline answers keep their order"
    assert_still_serving(fleetd)


def test_error_frames_and_good_frames_interleave_on_one_connection(fleetd: Fleetd) -> None:
    with raw(fleetd) as sock:
        sock.sendall(
            encode(Ping(id=1)) + b'{"op":"nope","id":2}\n' + b'{"op":"ping"}\n' + encode(Ping(id=4))
        )
        answers = read_frames(sock, 4)
    assert [a["id"] for a in answers] == [1, 2, None, 4]
    assert [a["ok"] for a in answers] == [True, False, False, True]
    assert_still_serving(fleetd)


# -- other users --------------------------------------------------------------------------------

_OTHER_UID_CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
try:
    sock.sendall(b'{"op":"ping","id":1}\\n')
except (BrokenPipeError, ConnectionResetError):
    pass
received = b""
while True:
    try:
        chunk = sock.recv(65536)
    except ConnectionResetError:
        break
    if not chunk:
        break
    received += chunk
sys.stdout.buffer.write(received)
"""


def test_connection_from_another_uid_is_refused(fleetd: Fleetd) -> None:
    """Another user's process gets one `permission_denied` frame and a closed connection.

    The file modes (a 0700 directory, a 0600 socket) are the first fence and normally stop
    another user before connect() succeeds. To reach the second fence, the SO_PEERCRED check
    in fleetd, this test alone opens the modes up so that `nobody` can connect.
    """
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    if setpriv is None:
        pytest.skip("needs setpriv (util-linux) to run a client as another uid")
    os.chmod(fleetd.root, 0o711)
    os.chmod(fleetd.socket_path, 0o666)
    assert stat.S_IMODE(os.stat(fleetd.socket_path).st_mode) == 0o666
    result = subprocess.run(
        [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
         sys.executable, "-I", "-c", _OTHER_UID_CLIENT, fleetd.socket_path],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    frames = [msgspec.json.decode(line) for line in result.stdout.splitlines()]
    assert [error_of(f) for f in frames] == [(None, "permission_denied")]
    assert "uid 65534" in frames[0]["error"]["message"]  # type: ignore[index]
    assert_still_serving(fleetd)


def test_all_of_the_above_leave_no_traceback_in_one_daemon(fleetd: Fleetd) -> None:
    """The abuse above, against a single daemon, in a row."""
    abuse = [
        b"garbage\n",
        b"\xff\xfe\n",
        b'{"op":"nope","id":1}\n',
        b'{"op":"ping"}\n',
        b'{"op":"hello","id":2,"version":"x"}\n',
        b'{"op":"hello","id":3,"version":999}\n',
        b'{"op":"pi',
        b"x" * (2 * MAX_FRAME),
    ]
    for frame in abuse:
        with raw(fleetd) as sock:
            try:
                sock.sendall(frame)
            except OSError as exc:
                assert exc.errno in (errno.EPIPE, errno.ECONNRESET)
                continue
            sock.shutdown(socket.SHUT_WR)
            drain(sock)
    fleetd.stop()
    log = fleetd.log()
    assert "Traceback" not in log and '"exception"' not in log
    assert "fleetd_stopped" in log
