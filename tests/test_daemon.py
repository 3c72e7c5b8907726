"""fleetd as a process: start, answer, refuse a twin, stop cleanly."""

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time

import anyio

import fleetctl
from protocol.framing import decode_response, encode
from protocol.messages import Ping
from tests.processes import Fleetd, run_fleetd
from tests.processes import fleetctl as run_fleetctl


def test_control_socket_is_private(fleetd: Fleetd) -> None:
    assert stat.S_IMODE(os.stat(fleetd.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(fleetd.state_dir).st_mode) == 0o700


def test_second_fleetd_on_same_state_dir_refuses_and_keeps_the_first_serving(
    fleetd: Fleetd, tempdir: str
) -> None:
    twin = Fleetd(os.path.join(tempdir, "twin"))
    os.mkdir(twin.root)
    twin.extra_env = {
        "FLEET_STATE_DIR": fleetd.state_dir,
        "FLEET_SOCKET": os.path.join(twin.root, "other.sock"),
    }
    result = run_fleetctl("ping", env=fleetd.env)
    refused = subprocess.run(
        [sys.executable, "-m", "fleetd"],
        env=twin.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 75
    assert "another fleetd" in refused.stderr and f"pid {fleetd.process.pid}" in refused.stderr
    assert result.returncode == 0
    assert run_fleetctl("ping", env=fleetd.env).returncode == 0


def test_second_fleetd_on_same_socket_refuses_without_stealing_it(fleetd: Fleetd) -> None:
    env = {**fleetd.env, "FLEET_STATE_DIR": fleetd.state_dir + "-other"}
    refused = subprocess.run(
        [sys.executable, "-m", "fleetd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 75
    assert "another fleetd" in refused.stderr
    assert run_fleetctl("ping", env=fleetd.env).returncode == 0


def test_sigterm_exits_zero_and_removes_the_socket(fleetd: Fleetd) -> None:
    fleetd.signal(signal.SIGTERM)
    assert fleetd.wait() == 0
    assert not os.path.exists(fleetd.socket_path)
    assert "fleetd_stopped" in fleetd.log()


def test_sigint_exits_zero(fleetd: Fleetd) -> None:
    fleetd.signal(signal.SIGINT)
    assert fleetd.wait() == 0


async def test_shutdown_request_is_answered_before_fleetd_exits(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        await client.shutdown()
    assert await anyio.to_thread.run_sync(fleetd.wait) == 0


def test_requests_read_before_sigterm_are_all_answered(fleetd: Fleetd) -> None:
    frames = b"".join(encode(Ping(id=i)) for i in range(1, 501))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(fleetd.socket_path)
        sock.sendall(frames)
        received = sock.recv(65536)
        fleetd.signal(signal.SIGTERM)
        while chunk := sock.recv(65536):
            received += chunk
    answers = [decode_response(line) for line in received.splitlines()]
    assert sorted(a.id for a in answers if a.ok) == list(range(1, 501))
    assert fleetd.wait() == 0


def test_each_request_is_logged_once_at_debug_with_op_outcome_and_duration(
    tempdir: str,
) -> None:
    fleetd = Fleetd(tempdir, extra_env={"FLEET_LOG_LEVEL": "debug"}).start()
    run_fleetctl("version", env=fleetd.env)
    fleetd.close()
    lines = [json.loads(line) for line in fleetd.log().splitlines()]
    handled = [line for line in lines if line.get("event") == "request_handled"]
    assert [line["op"] for line in handled] == ["hello", "version"]
    for line in handled:
        assert line["outcome"] == "ok" and isinstance(line["duration_us"], int)


def test_requests_are_not_logged_at_info(fleetd: Fleetd) -> None:
    run_fleetctl("version", env=fleetd.env)
    fleetd.stop()
    assert "request_handled" not in fleetd.log()


def test_a_request_line_carries_its_peer_level_and_utc_timestamp(tempdir: str) -> None:
    fleetd = Fleetd(tempdir, extra_env={"FLEET_LOG_LEVEL": "debug"}).start()
    run_fleetctl("version", env=fleetd.env)
    fleetd.close()
    lines = [json.loads(line) for line in fleetd.log().splitlines()]
    (version,) = [line for line in lines if line.get("op") == "version"]
    assert version["level"] == "debug"
    assert version["peer_uid"] == os.getuid() and version["peer_pid"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", version["timestamp"])


def test_socket_activation_serves_the_inherited_socket_and_leaves_it_in_place(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start_activated()
    try:
        assert run_fleetctl("ping", env=daemon.env).returncode == 0
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
        assert os.path.exists(daemon.socket_path)
    finally:
        daemon.close()


def notifications(daemon: Fleetd, until: bytes, timeout: float = 10.0) -> list[bytes]:
    assert daemon.notify is not None
    daemon.notify.settimeout(timeout)
    seen: list[bytes] = []
    while until not in seen:
        seen.extend(daemon.notify.recv(4096).split(b"\n"))
    return seen


def test_watchdog_is_pinged_at_half_the_interval(tempdir: str) -> None:
    daemon = Fleetd(tempdir, extra_env={"WATCHDOG_USEC": "200000"}).start()
    try:
        started = time.monotonic()
        seen = notifications(daemon, b"WATCHDOG=1")
        seen += notifications(daemon, b"WATCHDOG=1")
        assert seen.count(b"WATCHDOG=1") >= 2
        assert time.monotonic() - started < 2.0
    finally:
        daemon.close()


def test_sigterm_tells_systemd_stopping(fleetd: Fleetd) -> None:
    fleetd.signal(signal.SIGTERM)
    assert b"STOPPING=1" in notifications(fleetd, b"STOPPING=1")
    assert fleetd.wait() == 0


def test_ready_status_names_the_socket(fleetd: Fleetd) -> None:
    assert f"STATUS=serving {fleetd.socket_path}".encode() in fleetd.ready_message.split(b"\n")


def test_store_newer_than_fleetd_is_refused_and_no_socket_is_left(tempdir: str) -> None:
    daemon = Fleetd(tempdir)
    os.mkdir(daemon.state_dir)
    with contextlib.closing(sqlite3.connect(os.path.join(daemon.state_dir, "fleet.db"))) as db:
        db.execute("PRAGMA user_version = 99")
    refused = run_fleetd(daemon.env)
    assert refused.returncode == 78
    assert "newer than this fleetd knows" in refused.stderr
    assert not os.path.exists(daemon.socket_path)


def test_socket_path_over_107_bytes_is_refused_clearly(tempdir: str) -> None:
    refused = run_fleetd(
        {**Fleetd(tempdir).env}, "--socket", os.path.join(tempdir, "s" * 120 + ".sock")
    )
    assert refused.returncode == 78
    assert "107-byte limit" in refused.stderr


def test_unwritable_state_dir_is_refused_clearly(tempdir: str) -> None:
    blocker = os.path.join(tempdir, "file")
    open(blocker, "w").close()
    refused = run_fleetd({**Fleetd(tempdir).env, "FLEET_STATE_DIR": os.path.join(blocker, "x")})
    assert refused.returncode == 73
    assert refused.stderr.startswith("fleetd: cannot start:")


def test_directories_and_store_fleetd_creates_are_private(tempdir: str) -> None:
    daemon = Fleetd(tempdir)
    daemon.extra_env = {
        "FLEET_STATE_DIR": os.path.join(tempdir, "a", "b", "state"),
        "FLEET_SOCKET": os.path.join(tempdir, "r", "s", "fleetd.sock"),
    }
    daemon.start()
    try:
        for created in ("a", "a/b", "a/b/state", "r", "r/s"):
            assert stat.S_IMODE(os.stat(os.path.join(tempdir, created)).st_mode) == 0o700, created
        store = os.path.join(tempdir, "a", "b", "state", "fleet.db")
        assert stat.S_IMODE(os.stat(store).st_mode) == 0o600
    finally:
        daemon.close()


def test_under_journald_each_line_starts_with_its_syslog_priority(tempdir: str) -> None:
    daemon = Fleetd(tempdir)
    open(daemon.log_path, "wb").close()
    found = os.stat(daemon.log_path)
    daemon.extra_env["JOURNAL_STREAM"] = f"{found.st_dev}:{found.st_ino}"
    daemon.start()
    daemon.close()
    lines = daemon.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>\{", line) for line in lines), lines[:3]
    assert any(line.startswith("<6>") and '"fleetd_ready"' in line for line in lines)


def test_a_journal_stream_that_is_not_stderr_adds_no_prefix(tempdir: str) -> None:
    daemon = Fleetd(tempdir, extra_env={"JOURNAL_STREAM": "1:2"}).start()
    daemon.close()
    assert all(line.startswith("{") for line in daemon.log().splitlines())
