"""fleetctl as scripts see it: one envelope on stdout with --json, stable exit codes."""

import contextlib
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from fleetctl.cli import run
from protocol import PROTOCOL_VERSION, RELEASE
from tests.processes import FLEETCTL, Fleetd, fleetctl


def envelope(stdout: str) -> dict[str, object]:
    lines = stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stdout, got {stdout!r}"
    parsed: dict[str, object] = json.loads(lines[0])
    return parsed


def without_timing(text: str) -> str:
    return text.rsplit(" in ", 1)[0] if text.startswith("pong") else text


def test_ping_prints_the_daemon_and_exits_zero(fleetd: Fleetd) -> None:
    result = fleetctl("ping", env=fleetd.env)
    assert result.returncode == 0
    assert result.stdout.startswith(f"pong from fleetd {RELEASE} (pid {fleetd.process.pid}) in ")


def test_json_ping_prints_one_ok_envelope(fleetd: Fleetd) -> None:
    result = fleetctl("--json", "ping", env=fleetd.env)
    assert result.returncode == 0
    body = envelope(result.stdout)
    assert body["outcome"] == "ok"
    assert body["daemon"] == {"version": RELEASE, "pid": fleetd.process.pid}
    assert isinstance(body["rtt_us"], int)


def test_version_names_client_and_daemon(fleetd: Fleetd) -> None:
    result = fleetctl("--json", "version", env=fleetd.env)
    assert result.returncode == 0
    assert envelope(result.stdout) == {
        "outcome": "ok",
        "client": {"version": RELEASE, "protocol": PROTOCOL_VERSION},
        "daemon": {"version": RELEASE, "protocol": PROTOCOL_VERSION},
    }


def test_no_daemon_is_one_line_on_stderr_and_exit_14(tempdir: str) -> None:
    result = fleetctl("--socket", os.path.join(tempdir, "none.sock"), "ping", env=dict(os.environ))
    assert result.returncode == 14
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "no fleetd at" in result.stderr


@pytest.mark.parametrize("argv", [["ping"], ["lease", "list"]], ids=["fast", "click"])
def test_no_daemon_says_how_to_start_one_or_where_to_point(tempdir: str, argv: list[str]) -> None:
    result = fleetctl("--socket", os.path.join(tempdir, "none.sock"), *argv, env=dict(os.environ))
    said = result.stderr or result.stdout  # lease commands always answer with an envelope
    assert "start one with `fleetd`, or point FLEET_SOCKET at" in said


@pytest.mark.parametrize(
    "argv",
    [["version"], ["lease", "list"], ["gc", "--dry-run"], ["status"], ["status", "nope"]],
    ids=["fast", "click", "click-with-options", "status", "status-absent"],
)
def test_json_after_the_command_means_what_it_means_before(fleetd: Fleetd, argv: list[str]) -> None:
    before = fleetctl("--json", *argv, env=fleetd.env)
    after = fleetctl(*argv, "--json", env=fleetd.env)
    assert (after.returncode, envelope(after.stdout)) == (
        before.returncode,
        envelope(before.stdout),
    )


def test_no_daemon_with_json_is_an_unavailable_envelope(tempdir: str) -> None:
    result = fleetctl(
        "--json", "--socket", os.path.join(tempdir, "x.sock"), "version", env=dict(os.environ)
    )
    assert result.returncode == 14
    assert envelope(result.stdout)["outcome"] == "unavailable"


def test_socket_path_over_the_limit_is_refused_clearly(tempdir: str) -> None:
    long_path = os.path.join(tempdir, "s" * 120 + ".sock")
    result = fleetctl("--socket", long_path, "ping", env=dict(os.environ))
    assert result.returncode == 14
    assert "107-byte limit" in result.stderr


def test_bad_flag_is_a_usage_error_exit_2(tempdir: str) -> None:
    result = fleetctl("--no-such-flag", "ping", env=dict(os.environ))
    assert result.returncode == 2
    assert "No such option" in result.stderr


def test_the_global_timeout_is_a_duration(fleetd: Fleetd) -> None:
    assert fleetctl("--timeout", "1m30s", "ping", env=fleetd.env).returncode == 0
    assert "[default: 10s]" in fleetctl("--help", env=fleetd.env).stdout  # as the commands'


@pytest.mark.parametrize("bad", ["-1", "0", "nan", "2y"])
def test_a_global_timeout_that_is_no_usable_duration_is_a_usage_error(bad: str) -> None:
    result = fleetctl("--timeout", bad, "ping", env=dict(os.environ))
    assert result.returncode == 2
    assert "--timeout" in result.stderr


def test_bad_flag_with_json_is_a_usage_envelope() -> None:
    result = fleetctl("--json", "ping", "--no-such-flag", env=dict(os.environ))
    assert result.returncode == 2
    assert envelope(result.stdout)["outcome"] == "usage"


@pytest.fixture
def fake_daemon(tempdir: str) -> Iterator[tuple[str, list[bytes]]]:
    """A listener that answers every hello as a fleetd of a newer protocol would."""
    path = os.path.join(tempdir, "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    server.settimeout(10)
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                seen.append(request)
                request_id = json.loads(request.splitlines()[0])["id"]
                answer = {
                    "id": request_id,
                    "ok": True,
                    "result": {"version": PROTOCOL_VERSION + 1, "server": "9.9", "pid": 1},
                }
                conn.sendall(json.dumps(answer).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, seen
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(5)


@pytest.mark.parametrize("command", ["ping", "version", "status"])
def test_protocol_mismatch_is_refused_with_exit_15(
    fake_daemon: tuple[str, list[bytes]], command: str
) -> None:
    path, _ = fake_daemon
    fast = fleetctl("--socket", path, command, env=dict(os.environ))
    assert fast.returncode == 15
    assert "protocol" in fast.stderr
    assert run(["--socket", path, command]) == 15


@pytest.mark.parametrize("argv", [["ping"], ["--json", "ping"], ["version"], ["--json", "version"]])
def test_fast_path_prints_what_the_click_command_prints(
    fleetd: Fleetd, argv: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    fast = fleetctl(*argv, env=fleetd.env)
    code = run(["--socket", fleetd.socket_path, *argv])
    slow = capfd.readouterr().out
    assert code == fast.returncode == 0
    if "--json" in argv:
        fast_body, slow_body = envelope(fast.stdout), envelope(slow)
        fast_body.pop("rtt_us", None)
        slow_body.pop("rtt_us", None)
        assert fast_body == slow_body
        assert list(json.loads(fast.stdout)) == list(json.loads(slow))
    else:
        assert without_timing(fast.stdout) == without_timing(slow)


@pytest.mark.parametrize("argv", [["--json", "ping"], ["version"]])
def test_fast_path_reports_a_missing_daemon_like_the_click_command(
    tempdir: str, argv: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(tempdir, "gone.sock")
    fast = fleetctl("--socket", path, *argv, env=dict(os.environ))
    code = run(["--socket", path, *argv])
    captured = capfd.readouterr()
    assert code == fast.returncode == 14
    assert (fast.stdout, fast.stderr) == (captured.out, captured.err)


@pytest.mark.parametrize("argv", [["ping"], ["--json", "ping"], ["--json", "status"]])
def test_output_to_a_full_disk_is_a_clear_error_exit_1(fleetd: Fleetd, argv: list[str]) -> None:
    """The fast path (ping) and the click path (--json status) alike."""
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*FLEETCTL, *argv], env=fleetd.env, stdout=full, stderr=subprocess.PIPE, check=False
        )
    assert done.returncode == 1
    assert done.stderr.decode() == "fleetctl: cannot write the output: No space left on device\n"


@pytest.mark.parametrize("argv", [["ping"], ["--json", "status"]])
def test_a_reader_that_leaves_early_ends_the_output_quietly(
    fleetd: Fleetd, argv: list[str]
) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before fleetctl writes
    try:
        done = subprocess.run(
            [*FLEETCTL, *argv], env=fleetd.env, stdout=write, stderr=subprocess.PIPE, check=False
        )
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, b"")


def test_help_lists_the_commands() -> None:
    result = fleetctl("--help", env=dict(os.environ))
    assert result.returncode == 0
    assert "ping" in result.stdout and "version" in result.stdout


def test_status_help_says_a_cluster_name_shows_its_members() -> None:
    result = fleetctl("status", "--help", env=dict(os.environ))
    assert "or a CLUSTER's members" in " ".join(result.stdout.split())


def test_restart_usage_names_a_cluster_too() -> None:
    result = fleetctl("restart", "--help", env=dict(os.environ))
    assert result.stdout.startswith("Usage: fleetctl restart [OPTIONS] NAME|CLUSTER\n")


def test_the_fast_path_refuses_an_answer_to_another_request(tempdir: str) -> None:
    """fleetctl._fast checks each answer's id against the request it waits for."""
    path = os.path.join(tempdir, "wrong.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    server.settimeout(10)

    def serve() -> None:
        with contextlib.suppress(OSError), server.accept()[0] as conn:
            hello = {"version": PROTOCOL_VERSION, "server": "0.1.0", "pid": 1}
            conn.recv(65536)
            conn.sendall(json.dumps({"id": 1, "ok": True, "result": hello}).encode() + b"\n")
            version = {"version": "0.1.0", "protocol": PROTOCOL_VERSION}
            conn.sendall(json.dumps({"id": 99, "ok": True, "result": version}).encode() + b"\n")
            conn.recv(65536)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = fleetctl("--socket", path, "version", env=dict(os.environ))
    finally:
        server.close()
        thread.join(5)
    assert result.returncode == 14
    assert "the answer to request 99, not 2" in result.stderr


def complete(daemon: Fleetd, *words: str) -> list[str]:
    """What bash completion offers for the last of `words` (click's protocol)."""
    result = subprocess.run(
        FLEETCTL,
        env={
            **daemon.env,
            "_FLEETCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["fleetctl", *words]),
            "COMP_CWORD": str(len(words)),
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return [line.split(",", 1)[1] for line in result.stdout.splitlines() if line]


def test_completion_offers_commands_and_the_live_members_and_clusters(holders: Fleetd) -> None:
    path = os.path.join(holders.root, "fleet.toml")
    with open(path, "w") as f:
        f.write('name = "web"\n[members.api]\ncommand = ["sleep", "60"]\n')
    assert fleetctl("up", "-f", path, "--wait", env=holders.env).returncode == 0
    assert complete(holders, "st") == ["start", "status", "stop"]
    assert complete(holders, "logs", "a") == ["api"]
    assert complete(holders, "logs", "w") == ["web"]  # logs CLUSTER
    assert complete(holders, "restart", "") == ["api", "web"]
    assert complete(holders, "status", "web/") == ["web/api"]
    assert complete(holders, "down", "w") == ["web"]


def test_completion_without_a_fleetd_offers_no_names(tempdir: str) -> None:
    daemon = Fleetd(tempdir)  # never started
    assert complete(daemon, "stop", "") == []
