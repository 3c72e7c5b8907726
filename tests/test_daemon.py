"""fleetd as a process: start, answer, refuse a twin, stop cleanly."""

import os
import signal
import stat

import socket

import anyio

import fleetctl
from protocol.framing import decode_response, encode
from protocol.messages import Ping
from tests.processes import Fleetd, fleetctl as run_fleetctl


def test_control_socket_is_private(fleetd: Fleetd) -> None:
    assert stat.S_IMODE(os.stat(fleetd.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(fleetd.state_dir).st_mode) == 0o700


def test_second_fleetd_on_same_state_dir_refuses_and_keeps_the_first_serving(
    fleetd: Fleetd, tempdir: str
) -> None:
    twin = Fleetd(os.path.join(tempdir, "twin"))
    os.mkdir(twin.root)
    twin.extra_env = {"FLEET_STATE_DIR": fleetd.state_dir,
                      "FLEET_SOCKET": os.path.join(twin.root, "other.sock")}
    result = run_fleetctl("ping", env=fleetd.env)
    import subprocess
    import sys

    refused = subprocess.run([sys.executable, "-m", "fleetd"], env=twin.env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 1
    assert "another fleetd" in refused.stderr and f"pid {fleetd.process.pid}" in refused.stderr
    assert result.returncode == 0
    assert run_fleetctl("ping", env=fleetd.env).returncode == 0


def test_second_fleetd_on_same_socket_refuses_without_stealing_it(fleetd: Fleetd) -> None:
    import subprocess
    import sys

    env = {**fleetd.env, "FLEET_STATE_DIR": fleetd.state_dir + "-other"}
    refused = subprocess.run([sys.executable, "-m", "fleetd"], env=env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 1
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


def test_each_request_is_logged_once_with_op_outcome_and_duration(fleetd: Fleetd) -> None:
    run_fleetctl("version", env=fleetd.env)
    fleetd.stop()
    import json

    lines = [json.loads(line) for line in fleetd.log().splitlines()]
    handled = [line for line in lines if line.get("event") == "request_handled"]
    assert [line["op"] for line in handled] == ["hello", "version"]
    for line in handled:
        assert line["outcome"] == "ok" and isinstance(line["duration_us"], int)
