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
                       the store's disk is too full to open it, or its etcd does not answer
    77  EX_NOPERM      a path is a symbolic link, another user's, or writable by others
    78  EX_CONFIG      anything else about the configuration (a socket path too long...)

The plain start (`fleetd`, with --socket, --state-dir, --log-level, --metrics-listen and
--store) is read here, without click: the daemon would keep click's modules, most of a
megabyte, for its whole life. Every
other line (--help, --version, reset-state, anything wrong) is read by click
(fleetd.commands), which says what it has to say about it.
"""

import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio
import structlog

from fleetd import daemon
from fleetd.clusters.launch import holder_env
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.log import configure_logging
from fleetd.core.startup import (
    MEMBER_NOFILE_ENV,
    leaf_errors,
    load_what_anyio_loads_as_it_runs,
    raise_fd_limit,
)
from protocol.errors import (
    AlreadyRunning,
    FleetError,
    StartupError,
    StateLost,
    StoreCorrupt,
    StoreFull,
    StoreUnavailable,
    UnsafePath,
)
from protocol.paths import control_socket_path, state_dir_path

EX_DATAERR, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 65, 70, 73, 75, 77, 78

_EXIT_STATUS: tuple[tuple[type[FleetError], int], ...] = (
    (StateLost, EX_DATAERR),
    (StoreCorrupt, EX_DATAERR),
    (AlreadyRunning, EX_TEMPFAIL),
    (StoreFull, EX_TEMPFAIL),
    (StoreUnavailable, EX_TEMPFAIL),
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


def one_line_on_failure(run: Callable[[], None]) -> None:
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
            print(f"fleetd: {_describe(error)}", file=sys.stderr, flush=True)
        sys.exit(exit_status(errors[0]))


LOG_LEVEL_ENV = "FLEET_LOG_LEVEL"
"""The log level when --log-level is not given (`debug` logs every request)."""
STORE_ENV = "FLEET_STORE"
"""The store when --store is not given: etcd://HOST:PORT[,HOST:PORT…], or empty for SQLite in
the state directory."""
METRICS_LISTEN_ENV = "FLEET_METRICS_LISTEN"
"""Where to serve the metrics over HTTP when --metrics-listen is not given (a unit's
Environment=, say)."""
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
_OPTIONS = {
    "--socket": "socket_path",
    "--state-dir": "state_dir",
    "--log-level": "log_level",
    "--metrics-listen": "metrics_listen",
    "--store": "store",
}


def default_log_level() -> str:
    return os.environ.get(LOG_LEVEL_ENV, DEFAULT_LOG_LEVEL)


@dataclass(frozen=True)
class PlainStart:
    """The options of a plain start, as click would have read them."""

    socket_path: str | None = None
    state_dir: str | None = None
    log_level: str = DEFAULT_LOG_LEVEL
    metrics_listen: str = ""
    store: str = ""


def plain_start(argv: Sequence[str]) -> PlainStart | None:
    """`argv` read as a plain start: only --socket, --state-dir, --log-level, --metrics-listen
    and --store, each as `--option VALUE` or `--option=VALUE` (the last one counts, as
    in click). None for a line click must read: a command, help, --version, a log level
    click would refuse (from $FLEET_LOG_LEVEL too), a value that looks like an option (click
    decides what that means), anything else."""
    found: dict[str, str] = {}
    args = iter(argv)
    for arg in args:
        option, equals, value = arg.partition("=")
        if option not in _OPTIONS:
            return None
        if not equals:
            following = next(args, None)
            if following is None or following.startswith("-"):
                return None
            value = following
        found[_OPTIONS[option]] = value
    found.setdefault("log_level", default_log_level())
    if found["log_level"] not in LOG_LEVELS:
        return None
    return PlainStart(**found)


def daemon_config(
    socket_path: str | None, state_dir: str | None, metrics_listen: str = "", store: str = ""
) -> daemon.DaemonConfig:
    """The daemon's places, the defaults (from the environment) for those not given."""
    return daemon.DaemonConfig(
        socket_path=os.path.abspath(
            control_socket_path(os.environ) if socket_path is None else socket_path
        ),
        state_dir=os.path.abspath(state_dir_path(os.environ) if state_dir is None else state_dir),
        metrics_listen=metrics_listen or os.environ.get(METRICS_LISTEN_ENV, ""),
        store=store or os.environ.get(STORE_ENV, ""),
    )


def serve(config: daemon.DaemonConfig, log_level: str) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    configure_logging(log_level)
    os.environ[MEMBER_NOFILE_ENV] = str(raise_fd_limit())  # for holder_env: see the constant
    load_what_anyio_loads_as_it_runs()  # before the template is forked: both share it
    template = WarmTemplate(holder_env(os.environ))
    gc.freeze()  # fleetd's collections then leave alone the objects the template shares
    # Forked before the event loop and its threads (fleetd.clusters.warm), and before anything
    # logs: structlog keeps a logger from its first use, which the holders would inherit.
    template.start()
    _collect_garbage_less_often()  # in fleetd alone: the template's holders collect as usual
    try:
        one_line_on_failure(
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


def main() -> None:
    start = plain_start(sys.argv[1:])
    if start is None:
        from fleetd.commands import cli

        cli()
    else:
        config = daemon_config(
            start.socket_path, start.state_dir, start.metrics_listen, start.store
        )
        serve(config, start.log_level)
