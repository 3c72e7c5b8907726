"""The `fleetd` command: run the daemon in the foreground (systemd, `make run`)."""

import gc
import os
import resource
import sys

import anyio
import click

from fleetd.daemon import Daemon, DaemonConfig
from fleetd.log import configure_logging
from protocol.errors import FleetError
from protocol.paths import control_socket_path, state_dir_path


def _collect_garbage_less_often() -> None:
    """Every request allocates a few short-lived objects; with CPython's default threshold
    (700) the young generation is collected every few requests, a fifth of the daemon's time
    under pipelined load. Reference counting frees almost all of them anyway."""
    gc.set_threshold(10_000, 10, 10)


def _raise_fd_limit() -> None:
    """A supervisor holds a socket per member and per client: use the whole hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    default=lambda: control_socket_path(os.environ),
    show_default="$FLEET_SOCKET, else $XDG_RUNTIME_DIR/fleet/fleetd.sock, "
    "else /run/fleet/fleetd.sock",
    help="Control socket to listen on.",
)
@click.option(
    "--state-dir",
    default=lambda: state_dir_path(os.environ),
    show_default="$FLEET_STATE_DIR, else $XDG_STATE_HOME/fleet, else /var/lib/fleet",
    help="Directory for the store and holder state.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.pass_context
def cli(ctx: click.Context, socket_path: str, state_dir: str, log_level: str) -> None:
    """Run fleetd in the foreground."""
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level)
    _raise_fd_limit()
    _collect_garbage_less_often()
    config = DaemonConfig(
        socket_path=os.path.abspath(socket_path), state_dir=os.path.abspath(state_dir)
    )
    try:
        anyio.run(Daemon(config).run, backend="asyncio", backend_options={"use_uvloop": True})
    except* FleetError as failed:
        for error in _leaves(failed):
            click.echo(f"fleetd: {error.message}", err=True)
        sys.exit(1)


def _leaves(group: BaseExceptionGroup[FleetError]) -> list[FleetError]:
    """The errors inside a (possibly nested) exception group, for one line each."""
    found: list[FleetError] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            found.extend(_leaves(error))
        else:
            found.append(error)
    return found


def main() -> None:
    cli()
