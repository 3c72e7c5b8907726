"""The fleetctl command line (click). Commands import what they need when they run."""

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from fleetctl.output import emit, fail, usage
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.errors import FleetError
from protocol.paths import client_socket_path


@dataclass(frozen=True)
class Globals:
    socket_path: str
    json: bool
    timeout: float


class Exit(Exception):
    """Carries a command's exit code out of click, which would otherwise print and exit."""

    def __init__(self, code: int) -> None:
        self.code = code


def run_command(body: Callable[[Globals], int]) -> Callable[..., None]:
    """Run `body` with the global options, mapping every FleetError to its outcome."""

    @click.pass_obj
    def command(globals_: Globals, /, **_: Any) -> None:
        try:
            code = body(globals_)
        except FleetError as error:
            code = fail(globals_.json, error)
        raise Exit(code)

    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    default=lambda: client_socket_path(os.environ, os.path.exists),
    show_default="$FLEET_SOCKET, else the first of $XDG_RUNTIME_DIR/fleet/fleetd.sock "
    "and /run/fleet/fleetd.sock that exists",
    help="fleetd's control socket.",
)
@click.option(
    "--json",
    "json_mode",
    is_flag=True,
    help="Print one JSON envelope on stdout; the exit code is the outcome's.",
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.001),
    help="Seconds to wait for fleetd.",
)
@click.version_option(RELEASE, prog_name="fleetctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: str, json_mode: bool, timeout: float) -> None:
    """Control fleetd, the fleet supervisor."""
    ctx.obj = Globals(socket_path=socket_path, json=json_mode, timeout=timeout)


def _ping(g: Globals) -> int:
    from fleetctl.sync import SyncClient

    with SyncClient(g.socket_path, timeout=g.timeout) as client:
        started = time.perf_counter()
        client.ping()
        rtt_us = round((time.perf_counter() - started) * 1e6)
        server = client.server
    assert server is not None
    return emit(
        g.json,
        f"pong from fleetd {server.server} (pid {server.pid}) in {rtt_us} µs",
        daemon={"version": server.server, "pid": server.pid},
        rtt_us=rtt_us,
    )


def _version(g: Globals) -> int:
    from fleetctl.sync import SyncClient

    with SyncClient(g.socket_path, timeout=g.timeout) as client:
        daemon = client.version()
    return emit(
        g.json,
        f"fleetctl {RELEASE} (protocol {PROTOCOL_VERSION})\n"
        f"fleetd {daemon.version} (protocol {daemon.protocol})",
        client={"version": RELEASE, "protocol": PROTOCOL_VERSION},
        daemon={"version": daemon.version, "protocol": daemon.protocol},
    )


cli.command("ping", help="Check that fleetd answers, and how fast.")(run_command(_ping))
cli.command("version", help="Print the versions of fleetctl and of fleetd.")(run_command(_version))


def json_requested(argv: list[str]) -> bool:
    """Whether --json was given before any `--`: needed when click could not parse argv."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def run(argv: list[str]) -> int:
    try:
        cli.main(args=argv, prog_name="fleetctl", standalone_mode=False)
    except Exit as done:
        return done.code
    except click.UsageError as exc:
        if not json_requested(argv):
            exc.show()
        return usage(json_requested(argv), exc.format_message())
    except click.exceptions.Abort:
        sys.stderr.write("fleetctl: aborted\n")
        return 1
    return 0
