"""The `fleetd` command line: what its help promises is what it does."""

import os
import subprocess

import pytest
from click.testing import CliRunner

from fleetd.cli import daemon_config, plain_start
from fleetd.commands import cli
from protocol import PROTOCOL_VERSION, RELEASE
from tests.processes import FLEETD

VERSION_LINE = f"fleetd {RELEASE} (protocol {PROTOCOL_VERSION})\n"


def test_version_prints_the_release_and_protocol_as_fleetctl_version_does(tempdir: str) -> None:
    socket_path = os.path.join(tempdir, "fleetd.sock")
    result = subprocess.run(
        [*FLEETD, "--socket", socket_path, "--state-dir", tempdir, "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, VERSION_LINE, "")
    assert os.listdir(tempdir) == []  # printed the version: started nothing


def test_help_says_no_command_runs_the_daemon_and_lists_reset_state() -> None:
    result = CliRunner().invoke(cli, ["--help"], prog_name="fleetd")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: fleetd [OPTIONS] [COMMAND [OPTIONS]]\n")
    assert "With no command, run the daemon in the foreground" in result.output
    assert "--version" in result.output
    commands = result.output.split("Commands:\n", 1)[1].split()
    assert commands[0] == "reset-state"
    assert sorted(cli.commands) == ["reset-state"]  # type: ignore[attr-defined]


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["start"])
    assert result.exit_code == 2
    assert "No such command 'start'" in result.output


def test_reset_state_has_help_of_its_own() -> None:
    result = CliRunner().invoke(cli, ["reset-state", "--help"])
    assert result.exit_code == 0
    assert "--keep-store" in result.output


PLAIN_STARTS = [
    [],
    ["--socket", "/run/x/fleetd.sock"],
    ["--socket=/run/x/fleetd.sock", "--state-dir", "state"],
    ["--log-level", "debug", "--state-dir=/var/lib/x", "--log-level=warning"],
    ["--socket="],
    ["--metrics-listen", "127.0.0.1:9101", "--socket=/run/x/fleetd.sock"],
    ["--store", "etcd://127.0.0.1:2379", "--store=etcd://10.0.0.1:2379,10.0.0.2:2379"],
]


@pytest.mark.parametrize("argv", PLAIN_STARTS, ids=" ".join)
def test_a_plain_start_is_read_as_click_reads_it(argv: list[str]) -> None:
    start = plain_start(argv)
    assert start is not None
    params = cli.make_context("fleetd", list(argv)).params
    plain = daemon_config(start.socket_path, start.state_dir, start.metrics_listen, start.store)
    clicked = daemon_config(
        params["socket_path"], params["state_dir"], params["metrics_listen"], params["store"]
    )
    assert (plain, start.log_level) == (clicked, params["log_level"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["-h"],
        ["--version"],
        ["reset-state"],
        ["start"],
        ["--log-level", "loud"],
        ["--socket"],
        ["--socket", "--state-dir", "x"],
        ["--sock", "x"],
        ["--state-dir", "x", "reset-state", "--keep-store"],
    ],
    ids=" ".join,
)
def test_every_other_line_is_left_to_click(argv: list[str]) -> None:
    assert plain_start(argv) is None
