"""A peer that speaks frames by hand: raw unix sockets to a real fleetd, and what to expect."""

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec

import fleetctl
from protocol.framing import encode
from protocol.messages import Ping
from tests.processes import Fleetd

TIMEOUT = 10.0


@contextmanager
def raw(fleetd: Fleetd) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(fleetd.socket_path)
        yield sock


def drain(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received


def frames_until_closed(sock: socket.socket) -> list[dict[str, object]]:
    """Every frame the daemon sends before it closes the connection."""
    received = drain(sock)
    assert received.endswith(b"\n"), received
    return [msgspec.json.decode(line) for line in received.splitlines()]


def read_frames(sock: socket.socket, count: int) -> list[dict[str, object]]:
    """Exactly `count` frames; fails if the daemon closes first."""
    received = b""
    while received.count(b"\n") < count:
        chunk = sock.recv(65536)
        assert chunk, f"fleetd closed the connection after {len(received.splitlines())} frames"
        received += chunk
    lines = received.splitlines()
    assert len(lines) == count, "more frames than requests"
    return [msgspec.json.decode(line) for line in lines]


def ask(sock: socket.socket, frame: bytes) -> dict[str, object]:
    sock.sendall(frame)
    [answer] = read_frames(sock, 1)
    return answer


def assert_ping_answered(sock: socket.socket, request_id: int) -> None:
    assert ask(sock, encode(Ping(id=request_id))) == {"id": request_id, "ok": True, "result": {}}


def assert_still_serving(fleetd: Fleetd) -> None:
    """A fresh connection is served, and nothing so far crashed inside the daemon."""
    with fleetctl.SyncClient(fleetd.socket_path, timeout=TIMEOUT) as client:
        client.ping()
    assert fleetd.process is not None and fleetd.process.poll() is None
    log = fleetd.log()
    assert "Traceback" not in log
    events = [msgspec.json.decode(line) for line in log.splitlines() if line.startswith("{")]
    assert not [e for e in events if e.get("level") in ("error", "critical")], events
    assert not [e for e in events if e.get("event") == "connection_failed"], events


def error_of(frame: dict[str, object]) -> tuple[object, object]:
    """(id, code) of an error frame."""
    assert frame["ok"] is False, frame
    error = frame["error"]
    assert isinstance(error, dict) and isinstance(error["message"], str) and error["message"]
    return frame["id"], error["code"]
