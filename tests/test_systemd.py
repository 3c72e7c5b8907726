"""fleetd under systemd: the unit files, and the notify / watchdog / socket-activation helpers.

Everything runs against real kernel objects (datagram receivers, inherited listening sockets,
`systemd-analyze`), since the failure modes that matter (a vanished receiver, a leaked
descriptor, a key systemd ignores with a warning) do not show up with mocks.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetd import systemd

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("fleetd.service", "fleetd.socket")
PACKAGED_EXEC_START = "ExecStart=/usr/bin/fleetd"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A temp dir under /tmp: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path is deep."""
    path = Path(tempfile.mkdtemp(prefix="fl-sd.", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.fixture(autouse=True)
def _close_cached_notify_socket() -> Iterator[None]:
    """notify() keeps one socket for the process's life; close it so no test leaks it."""
    yield
    cached, systemd._notify_socket = systemd._notify_socket, None
    if cached is not None:
        cached.close()


# --- unit files ----------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values; systemd allows a key more than once, configparser does not."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def fleetd_script() -> Path:
    """The installed `fleetd` console script: ExecStart must name an existing executable."""
    candidate = Path(sys.prefix) / "bin" / "fleetd"
    found = str(candidate) if candidate.exists() else shutil.which("fleetd")
    if found is None:
        pytest.fail("no `fleetd` console script: install the project (make install)")
    return Path(found)


def install_units_for_verify(target: Path) -> None:
    """Copy the units, pointing ExecStart at the real script (verify checks it is executable)."""
    service = (UNIT_DIR / "fleetd.service").read_text()
    assert service.count(PACKAGED_EXEC_START + "\n") == 1, "ExecStart line changed: fix the test"
    service = service.replace(PACKAGED_EXEC_START, f"ExecStart={fleetd_script()}")
    (target / "fleetd.service").write_text(service)
    shutil.copy(UNIT_DIR / "fleetd.socket", target / "fleetd.socket")


def systemd_analyze_verify(directory: Path) -> tuple[int, list[str]]:
    """Exit status and the output lines that concern our units (host units may be noisy)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian/Ubuntu package: systemd)")
    result = subprocess.run(
        [tool, "verify", *(str(directory / unit) for unit in UNITS)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    ours = [line for line in output if str(directory) in line or any(u in line for u in UNITS)]
    return result.returncode, ours


def test_systemd_analyze_verify_accepts_both_units(short_dir: Path) -> None:
    install_units_for_verify(short_dir)
    returncode, complaints = systemd_analyze_verify(short_dir)
    assert complaints == []
    assert returncode == 0


def test_systemd_analyze_verify_complaints_are_caught(short_dir: Path) -> None:
    """verify exits 0 on an unknown key or a bad value; only its output tells. Guard the filter."""
    install_units_for_verify(short_dir)
    service = short_dir / "fleetd.service"
    service.write_text(service.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    _, complaints = systemd_analyze_verify(short_dir)
    assert any("WatchdogSecs" in line for line in complaints), complaints


USER_UNIT_DIR = UNIT_DIR / "user"
USER_EXEC_START = "ExecStart=%h/.local/bin/fleetd"


def test_systemd_analyze_verify_accepts_the_user_units(short_dir: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian/Ubuntu package: systemd)")
    service = (USER_UNIT_DIR / "fleetd.service").read_text()
    assert service.count(USER_EXEC_START + "\n") == 1, "ExecStart line changed: fix the test"
    (short_dir / "fleetd.service").write_text(
        service.replace(USER_EXEC_START, f"ExecStart={fleetd_script()}")
    )
    shutil.copy(USER_UNIT_DIR / "fleetd.socket", short_dir / "fleetd.socket")
    runtime = short_dir / "runtime"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        [tool, "--user", "verify", *(str(short_dir / unit) for unit in UNITS)],
        cwd=short_dir,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    assert [line for line in output if str(short_dir) in line or "fleetd." in line] == []
    assert result.returncode == 0


def test_the_user_units_serve_where_fleetctl_looks_first() -> None:
    service = parse_unit(USER_UNIT_DIR / "fleetd.service")["Service"]
    sock = parse_unit(USER_UNIT_DIR / "fleetd.socket")["Socket"]
    environment = dict(item.split("=", 1) for item in service["Environment"])
    assert sock["ListenStream"] == [environment["FLEET_SOCKET"]] == ["%t/fleet/fleetd.sock"]
    assert environment["FLEET_STATE_DIR"] == "%S/fleet"
    system = parse_unit(UNIT_DIR / "fleetd.service")["Service"]
    for key in ("Type", "NotifyAccess", "KillMode", "Delegate", "RestartPreventExitStatus"):
        assert service[key] == system[key], key


def test_units_keep_the_contracts_fleet_relies_on() -> None:
    service = parse_unit(UNIT_DIR / "fleetd.service")["Service"]
    sock = parse_unit(UNIT_DIR / "fleetd.socket")["Socket"]
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "KillMode": "process",
        "Delegate": "yes",
        "RuntimeDirectory": "fleet",
        "RuntimeDirectoryMode": "0700",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "fleet",
        "StateDirectoryMode": "0700",
    }.items():
        assert service.get(key) == [value], key
    environment = dict(item.split("=", 1) for item in service["Environment"])
    assert sock["ListenStream"] == [environment["FLEET_SOCKET"]]
    assert environment["FLEET_STATE_DIR"] == "/var/lib/fleet"
    assert sock["SocketMode"] == ["0600"]
    assert sock["Service"] == ["fleetd.service"]


@pytest.mark.parametrize(
    "option", ["MemoryDenyWriteExecute", "SystemCallFilter", "PrivateTmp", "NoNewPrivileges"]
)
def test_service_sandbox_leaves_members_alone(option: str) -> None:
    """Holders and members inherit the unit's sandbox; these would break ordinary programs."""
    assert option not in parse_unit(UNIT_DIR / "fleetd.service")["Service"]


# --- notify --------------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        yield sock
    finally:
        sock.close()


def test_notify_delivers_one_datagram_to_a_path(short_dir: Path, receiver: socket.socket) -> None:
    path = str(short_dir / "notify")
    receiver.bind(path)
    assert systemd.notify("READY=1", "STATUS=serving", environ={"NOTIFY_SOCKET": path})
    assert receiver.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_delivers_to_an_abstract_address(receiver: socket.socket) -> None:
    name = f"fleet-test-{os.getpid()}-{secrets.token_hex(4)}"
    receiver.bind("\0" + name)
    assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": "@" + name})
    assert receiver.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("address", [None, "", "@", "relative/path", "vsock:2:1234"])
def test_notify_without_a_usable_socket_is_a_no_op(address: str | None) -> None:
    environ = {} if address is None else {"NOTIFY_SOCKET": address}
    assert systemd.notify("READY=1", environ=environ) is False


def test_notify_reports_a_vanished_receiver(short_dir: Path, receiver: socket.socket) -> None:
    path = str(short_dir / "notify")
    receiver.bind(path)
    receiver.close()  # the socket file stays: ECONNREFUSED
    assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": path}) is False
    os.unlink(path)  # now ENOENT
    assert systemd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": path}) is False


def test_notify_never_blocks_on_a_full_receiver(short_dir: Path, receiver: socket.socket) -> None:
    path = str(short_dir / "notify")
    receiver.bind(path)
    environ = {"NOTIFY_SOCKET": path}
    sent = 0
    while systemd.notify("WATCHDOG=1", environ=environ):  # nobody reads: the queue fills up
        sent += 1
        assert sent < 100_000, "the receiver's queue never filled"
    assert sent > 0


def test_notify_reuses_one_socket(short_dir: Path, receiver: socket.socket) -> None:
    path = str(short_dir / "notify")
    receiver.bind(path)
    systemd.notify("STATUS=warming up", environ={"NOTIFY_SOCKET": path})
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        assert systemd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": path})
        receiver.recv(4096)
    assert len(os.listdir("/proc/self/fd")) == before


# --- watchdog ------------------------------------------------------------------------------------

OUR_PID = str(os.getpid())


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": OUR_PID}, 15.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": ""}, 0.25),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_PID": OUR_PID}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-1"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ=environ) == expected


# --- socket activation ---------------------------------------------------------------------------


@pytest.mark.parametrize("pid", [None, "1", "garbage"])
def test_listen_sockets_not_for_us_returns_none_and_scrubs_the_environment(
    pid: str | None,
) -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "control", "PATH": "/usr/bin"}
    if pid is not None:
        environ["LISTEN_PID"] = pid
    assert systemd.listen_sockets(environ=environ) == []
    assert environ == {"PATH": "/usr/bin"}


def test_listen_sockets_with_zero_fds_touches_no_descriptor() -> None:
    environ = {"LISTEN_PID": OUR_PID, "LISTEN_FDS": "0"}
    assert systemd.listen_sockets(environ=environ) == []
    assert environ == {}


# Plays systemd's part: moves the passed descriptors to 3, 4, ..., sets LISTEN_* and execs the
# activated program, which therefore keeps the pid that LISTEN_PID names.
ACTIVATOR = textwrap.dedent(
    """
    import fcntl, os, sys
    fds = [int(fd) for fd in sys.argv[2:]]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(high):
        os.dup2(fd, 3 + index)
        os.close(fd)
    os.environ.update(
        LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES="control:tcp"
    )
    os.execv(sys.executable, [sys.executable, "-c", sys.argv[1]])
    """
)

# The activated program: reports what it received, then serves one connection per socket.
ACTIVATED = textwrap.dedent(
    """
    import fcntl, json, os, subprocess, sys
    from fleetd import systemd
    sockets = systemd.listen_sockets()
    grandchild = subprocess.run(["env"], capture_output=True, text=True, close_fds=False)
    report = {
        "sockets": [
            {
                "fd": s.fileno(),
                "family": int(s.family),
                "type": int(s.type),
                "cloexec": bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
            }
            for s in sockets
        ],
        "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "grandchild_environ": sorted(
            line.partition("=")[0]
            for line in grandchild.stdout.splitlines()
            if line.startswith("LISTEN_")
        ),
    }
    print(json.dumps(report), flush=True)
    for index, listener in enumerate(sockets):
        connection, _ = listener.accept()
        with connection:
            connection.sendall(b"served by socket %d" % index)
    """
)


@pytest.fixture
def activated(short_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """A child activated with a unix and a TCP listener; the parent keeps no copy of either."""
    unix_path = str(short_dir / "control")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with unix, tcp:
        unix.bind(unix_path)
        tcp.bind(("127.0.0.1", 0))
        for listener in (unix, tcp):
            listener.listen()
        tcp_port = tcp.getsockname()[1]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        proc = subprocess.Popen(
            [sys.executable, "-c", ACTIVATOR, ACTIVATED, str(unix.fileno()), str(tcp.fileno())],
            pass_fds=(unix.fileno(), tcp.fileno()),
            env=environ,
            stdout=subprocess.PIPE,
            text=True,
        )
    try:
        yield proc, unix_path, tcp_port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def test_listen_sockets_adopts_inherited_listeners(
    activated: tuple[subprocess.Popen[str], str, int],
) -> None:
    proc, unix_path, tcp_port = activated
    assert proc.stdout is not None
    report = json.loads(proc.stdout.readline())

    assert report["sockets"] == [
        {"fd": 3, "family": socket.AF_UNIX, "type": socket.SOCK_STREAM, "cloexec": True},
        {"fd": 4, "family": socket.AF_INET, "type": socket.SOCK_STREAM, "cloexec": True},
    ]
    assert report["environ"] == []
    assert report["grandchild_environ"] == []

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(unix_path)
        assert client.recv(100) == b"served by socket 0"
    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as client:
        assert client.recv(100) == b"served by socket 1"
    assert proc.wait(timeout=10) == 0
