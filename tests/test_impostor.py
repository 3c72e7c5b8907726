"""Clients check who answers: a server run by another user gets not one byte.

The reproduction: a fake fleetd run by another user, on a socket path a client was pointed at,
received a claim's content and handed out a made-up fencing token. Every client-side
connection (fleetctl's fast path and click path, Client, SyncClient, the member sockets'
clients) now reads the peer's credentials (SO_PEERCRED) right after connect and refuses a peer
that runs neither as the client's own uid nor as root, before writing a byte.

The impostor is a real process run as `nobody` (the tests need root to start it), listening in
a directory opened up for the occasion, that records what each connection sent.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import fleetctl
from fleetctl.cli import run
from fleetctl.client import Client
from fleetctl.logs import MemberPresence
from fleetctl.members_client import MemberLink, one_request
from fleetctl.sync import SyncClient
from protocol import PROTOCOL_VERSION
from protocol.errors import PermissionDenied
from protocol.members import Status, member_socket_path
from tests.processes import FLEETCTL, short_tempdir
from tests.processes import fleetctl as run_fleetctl

SETPRIV = shutil.which("setpriv")
pytestmark = [
    pytest.mark.skipif(
        os.getuid() != 0, reason="needs root, to run the impostor server as another user (nobody)"
    ),
    pytest.mark.skipif(
        SETPRIV is None, reason="needs setpriv (util-linux) to run a process as another user"
    ),
]

NOBODY = 65534


def as_user(uid: int, argv: list[str]) -> list[str]:
    """argv run as `uid` (no capabilities). Through setpriv rather than subprocess's user=:
    this interpreter may live under /root (0700), which `nobody` cannot search, and setpriv
    keeps root's capabilities until the execve itself, so the path still resolves."""
    if uid == os.getuid():
        return argv
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]


_SERVER = r"""
import json, os, socket, sys

path, record, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
# One answer fits every op (decoders ignore the fields they do not know): a hello's, a bind's,
# a claim granted with revision 999999, a running member with pid 999999.
result = {
    "version": version, "server": "0.1.0", "pid": os.getpid(), "outcome": "acquired",
    "claim": {"kind": "prompt_inbox", "key": "task-1", "owner": "agent-7", "state": "held",
              "revision": 999999, "path": "/tmp/stolen", "sha256": "", "size": 0,
              "acquired_at": 0.0},
    "name": "web", "state": "running", "members": [{"name": "web", "state": "running",
                                                    "pid": 999999}],
}
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)  # anyone may connect: the client's own check is the fence under test
server.listen()
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    received = buffer = b""
    with conn:
        while True:
            try:
                chunk = conn.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                answer = {"id": json.loads(line).get("id"), "ok": True, "result": result}
                try:
                    conn.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    break
    with open(record, "a") as f:  # one line per connection, once it closed
        f.write(received.hex() + "\n")
"""


@dataclass
class FakeServer:
    """A plausible fleetd (or holder) run as `uid`, listening at `path`."""

    path: str
    uid: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def record(self) -> str:
        return self.path + ".received"

    @property
    def arguments(self) -> list[str]:
        return [self.path, self.record, str(PROTOCOL_VERSION)]

    def start(self) -> "FakeServer":
        self.process = subprocess.Popen(
            as_user(self.uid, [sys.executable, "-I", "-c", _SERVER, *self.arguments]),
            cwd=os.path.dirname(self.path),
            env=dict(os.environ),  # the run's tag: the leak scan finds it
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline() != b"ready\n":
            self.stop()
            raise AssertionError(f"the fake server did not start: exit {self.process.returncode}")
        return self

    def received(self, connections: int = 1, timeout: float = 10.0) -> list[bytes]:
        """What each of the first `connections` connections sent, once they all closed."""
        deadline = time.monotonic() + timeout
        while True:
            lines: list[str] = []
            if os.path.exists(self.record):
                with open(self.record) as f:
                    lines = f.read().splitlines()
            if len(lines) >= connections:
                return [bytes.fromhex(line) for line in lines]
            assert time.monotonic() < deadline, f"{connections} connections did not close"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            assert self.process.stdout is not None
            self.process.stdout.close()


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A short temp dir that `nobody` may create sockets in."""
    path = short_tempdir()
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def impostor(open_dir: str) -> Iterator[FakeServer]:
    server = FakeServer(os.path.join(open_dir, "fleetd.sock"), NOBODY).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_server(open_dir: str) -> Iterator[FakeServer]:
    """The same fake, run as this process's own user (root): it is let through."""
    server = FakeServer(os.path.join(open_dir, "fleetd.sock"), os.getuid()).start()
    try:
        yield server
    finally:
        server.stop()


def refusal_of(server: FakeServer, peer: str = "fleetd") -> str:
    assert server.process is not None
    return (
        f"refusing {peer} at {server.path}: it runs as uid {NOBODY} "
        f"(pid {server.process.pid}), not as you (uid {os.getuid()}) or root"
    )


def envelope(stdout: str) -> dict[str, object]:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stdout, got {stdout!r}"
    parsed: dict[str, object] = json.loads(lines[0])
    return parsed


# -- the library --------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["uvloop", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": request.param})


async def test_async_client_refuses_an_impostor_before_sending(impostor: FakeServer) -> None:
    client = Client(impostor.path, timeout=5)
    with pytest.raises(PermissionDenied) as raised:
        await client.connect()
    assert raised.value.message == refusal_of(impostor)
    assert impostor.received() == [b""]
    with pytest.raises(fleetctl.FleetError):  # closed, not half-open
        await client.ping()


def test_sync_client_refuses_an_impostor_before_sending(impostor: FakeServer) -> None:
    with pytest.raises(PermissionDenied) as raised:
        SyncClient(impostor.path, timeout=5).connect()
    assert raised.value.message == refusal_of(impostor)
    assert impostor.received() == [b""]


async def test_member_link_refuses_an_impostor_holder(impostor: FakeServer) -> None:
    with pytest.raises(PermissionDenied) as raised:
        await MemberLink.connect(impostor.path)
    assert raised.value.message == refusal_of(impostor, "the holder")
    with pytest.raises(PermissionDenied):
        await one_request(impostor.path, Status, 5, name="web")
    assert impostor.received(2) == [b"", b""]


def test_log_follower_refuses_an_impostor_holder(impostor: FakeServer) -> None:
    presence = MemberPresence(impostor.path, "web")
    with pytest.raises(PermissionDenied, match="refusing the holder at"):
        presence.open()
    assert not presence.connected
    assert impostor.received() == [b""]


def test_blocking_cluster_status_refuses_an_impostor_holder(open_dir: str) -> None:
    """A bound cluster's blocking status link, to a member socket that another user's process
    took over: refused, rather than answered by it (or by the state files)."""
    members = {"web": {"command": [sys.executable, "-c", "import time; time.sleep(60)"]}}
    runtime_dir = os.path.join(open_dir, "rt")
    os.mkdir(runtime_dir, 0o700)  # a holder refuses a directory others may write
    with fleetctl.cluster({"members": members}, runtime_dir=runtime_dir, timeout=15) as c:
        # Its status link opens at the first status call, which then finds the impostor.
        os.chmod(runtime_dir, 0o777)  # open it up for the impostor
        path = member_socket_path(runtime_dir, "web")
        os.unlink(path)  # the holder still listens, on a socket nobody can reach by name
        impostor = FakeServer(path, NOBODY).start()
        try:
            with pytest.raises(PermissionDenied) as raised:
                c.status("web")
            assert raised.value.message == refusal_of(impostor, "the holder")
            assert impostor.received() == [b""]
        finally:
            impostor.stop()


def test_a_server_of_ones_own_uid_is_accepted(own_server: FakeServer) -> None:
    with SyncClient(own_server.path, timeout=5) as client:
        assert client.server is not None and client.server.server == "0.1.0"
        client.ping()
    assert own_server.received() != [b""]


def test_a_root_server_is_accepted_by_another_user(own_server: FakeServer) -> None:
    """A client run as `nobody` talks to a server run as root (the system fleetd)."""
    done = subprocess.run(
        as_user(NOBODY, [*FLEETCTL, "--socket", own_server.path, "ping"]),
        cwd=os.path.dirname(own_server.path),
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("pong from fleetd 0.1.0")


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ping", "version", "status"])
def test_cli_refuses_an_impostor_with_one_line_and_exit_1(
    impostor: FakeServer, command: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """The fast path and the click path, alike to the byte."""
    fast = run_fleetctl("--socket", impostor.path, command, env=dict(os.environ))
    code = run(["--socket", impostor.path, command])
    captured = capfd.readouterr()
    assert code == fast.returncode == 1
    assert (fast.stdout, fast.stderr) == (captured.out, captured.err)
    assert fast.stdout == ""
    assert fast.stderr == f"fleetctl: {refusal_of(impostor)}\n"
    assert impostor.received(2) == [b"", b""]


@pytest.mark.parametrize("command", ["ping", "version", "status"])
def test_cli_json_refuses_an_impostor_with_an_error_envelope(
    impostor: FakeServer, command: str, capfd: pytest.CaptureFixture[str]
) -> None:
    fast = run_fleetctl("--json", "--socket", impostor.path, command, env=dict(os.environ))
    code = run(["--json", "--socket", impostor.path, command])
    captured = capfd.readouterr()
    assert code == fast.returncode == 1
    assert (fast.stdout, fast.stderr) == (captured.out, captured.err)
    assert envelope(fast.stdout) == {
        "outcome": "error",
        "error": {"code": "permission_denied", "message": refusal_of(impostor)},
    }
    assert impostor.received(2) == [b"", b""]


def test_claim_content_never_reaches_an_impostor(impostor: FakeServer) -> None:
    """The issue's reproduction: `claims acquire` with content on stdin."""
    done = run_fleetctl(
        "--socket", impostor.path,
        "claims", "acquire", "--kind", "prompt_inbox", "--key", "task-1", "--owner", "agent-7",
        env=dict(os.environ), input=b"the secret plan\n",
    )  # fmt: skip
    assert done.returncode == 1
    assert envelope(done.stdout) == {
        "outcome": "error",
        "error": {"code": "permission_denied", "message": refusal_of(impostor)},
    }
    assert "999999" not in done.stdout + done.stderr
    assert impostor.received() == [b""]


def test_coord_run_refuses_an_impostor_and_runs_nothing(
    impostor: FakeServer, open_dir: str
) -> None:
    marker = os.path.join(open_dir, "ran")
    done = run_fleetctl(
        "--socket", impostor.path, "coord-run", "--agent", "a", "--lease", "l",
        "--", sys.executable, "-c", f"open({marker!r}, 'w').close()",
        env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"coord-run: cannot acquire: {refusal_of(impostor)}\n"
    assert not os.path.exists(marker)
    assert impostor.received() == [b""]
