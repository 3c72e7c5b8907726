"""The `fleetd` command: run the daemon in the foreground (systemd, `make run`),
`fleetd reset-state` to start a state directory over once its store is lost, and
`fleetd --version` (`fleetd RELEASE (protocol N)`, as `fleetctl version` prints it).

A failure to start is one line, `fleetd: …`, and a sysexits code that tells a supervisor
whether trying again can help (the systemd unit lists the ones that cannot as
RestartPreventExitStatus):

    65  EX_DATAERR     the store was lost, rolled back, replaced or cannot be read
    70  EX_SOFTWARE    a bug (the traceback is logged at debug level)
    73  EX_CANTCREAT   a directory or the socket cannot be made
    75  EX_TEMPFAIL    another fleetd holds the lock (or holders of an old state still run),
                       or the store's disk is too full to open it
    77  EX_NOPERM      a path is a symbolic link, another user's, or writable by others
    78  EX_CONFIG      anything else about the configuration (a socket path too long...)
"""

import gc
import os
import sys
from collections.abc import Callable

import anyio
import click
import structlog

from fleetd import daemon
from fleetd.clusters.launch import holder_env
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.log import configure_logging
from fleetd.core.startup import leaf_errors, raise_fd_limit
from fleetd.state import reset_state
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.errors import (
    AlreadyRunning,
    FleetError,
    StartupError,
    StateLost,
    StoreCorrupt,
    StoreFull,
    UnsafePath,
)
from protocol.paths import control_socket_path, state_dir_path

EX_DATAERR, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 65, 70, 73, 75, 77, 78

_EXIT_STATUS: tuple[tuple[type[FleetError], int], ...] = (
    (StateLost, EX_DATAERR),
    (StoreCorrupt, EX_DATAERR),
    (AlreadyRunning, EX_TEMPFAIL),
    (StoreFull, EX_TEMPFAIL),
    (UnsafePath, EX_NOPERM),
    (StartupError, EX_CONFIG),
)


def exit_status(error: BaseException) -> int:
    if isinstance(error, OSError):
        return EX_CANTCREAT
    for kind, status in _EXIT_STATUS:
        if isinstance(error, kind):
            return status
    return EX_CONFIG if isinstance(error, FleetError) else EX_SOFTWARE


def _describe(error: BaseException) -> str:
    if isinstance(error, FleetError):
        return error.message
    if isinstance(error, OSError):
        return f"cannot start: {error}"
    return f"internal error: {type(error).__name__}: {error} (run with --log-level debug)"


def _collect_garbage_less_often() -> None:
    """Every request allocates a few short-lived objects; with CPython's default threshold
    (700) the young generation is collected every few requests, a fifth of the daemon's time
    under pipelined load. Reference counting frees almost all of them anyway."""
    gc.set_threshold(10_000, 10, 10)


def _one_line_on_failure(run: Callable[[], None]) -> None:
    """Run `run`; whatever stops it is one `fleetd: …` line and its exit status."""
    try:
        run()
    except BaseException as raised:
        if isinstance(raised, SystemExit | KeyboardInterrupt):
            raise
        errors = leaf_errors(raised)
        for error in errors:
            if not isinstance(error, FleetError | OSError):
                structlog.get_logger("fleetd").debug("startup_crashed", exc_info=error)
            click.echo(f"fleetd: {_describe(error)}", err=True)
        sys.exit(exit_status(errors[0]))


@click.group(
    invoke_without_command=True,
    subcommand_metavar="[COMMAND [OPTIONS]]",
    context_settings={"help_option_names": ["-h", "--help"]},
)
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
    help="What the daemon logs (JSON lines off a terminal).",
)
@click.version_option(
    RELEASE, prog_name="fleetd", message=f"%(prog)s %(version)s (protocol {PROTOCOL_VERSION})"
)
@click.pass_context
def cli(ctx: click.Context, socket_path: str, state_dir: str, log_level: str) -> None:
    """fleetd, the fleet supervisor daemon.

    With no command, run the daemon in the foreground until SIGTERM or SIGINT: this is what
    systemd (fleetd.service) and `make run` start. A failure to start is one `fleetd: ...`
    line and a sysexits code. The command below repairs a state directory instead."""
    config = daemon.DaemonConfig(
        socket_path=os.path.abspath(socket_path), state_dir=os.path.abspath(state_dir)
    )
    ctx.obj = config
    if ctx.invoked_subcommand is not None:
        return
    configure_logging(log_level)
    raise_fd_limit()
    _collect_garbage_less_often()
    template = WarmTemplate(holder_env(os.environ))
    template.start()  # before the event loop and its threads: see fleetd.clusters.warm
    try:
        _one_line_on_failure(
            lambda: anyio.run(
                daemon.run,
                config,
                template,
                backend="asyncio",
                backend_options={"use_uvloop": True},
            )
        )
    finally:
        template.close()


@cli.command("reset-state")
@click.option(
    "--keep-store",
    is_flag=True,
    help="Adopt the store as it is now (say, a backup restored on purpose) instead of "
    "archiving it.",
)
@click.pass_obj
def reset_state_command(config: daemon.DaemonConfig, keep_store: bool) -> None:
    """Start the state directory over after fleetd refused it (its store lost, rolled back,
    replaced or unreadable).

    Moves everything in the state directory to archive/<UTC time>/ and starts an empty store,
    or with --keep-store keeps the store as it is. Either way revisions, and so fencing
    tokens, continue above every one given before. Refuses while fleetd runs, or while
    holders of the old state still run."""

    def reset() -> None:
        runtime_root = os.path.dirname(config.socket_path)
        for line in reset_state(config.state_dir, runtime_root, keep_store=keep_store):
            click.echo(f"fleetd: {line}")

    _one_line_on_failure(reset)


def main() -> None:
    cli()
