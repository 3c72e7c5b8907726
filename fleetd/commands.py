"""click's definition of the `fleetd` command line: its help, `--version`, `reset-state`, and
whatever fleetd.cli does not read itself (a usage error says what is wrong, as click does).
Loaded only for those: a daemon started plainly never loads click (fleetd.cli)."""

import os

import click

from fleetd.cli import LOG_LEVELS, daemon_config, default_log_level, one_line_on_failure, serve
from fleetd.daemon import DaemonConfig
from fleetd.state import reset_etcd_state, reset_state
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.paths import control_socket_path, state_dir_path


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
    default=default_log_level,
    show_default="$FLEET_LOG_LEVEL, else info",
    type=click.Choice(LOG_LEVELS),
    help="What the daemon logs (JSON lines off a terminal); debug adds a line per request.",
)
@click.option(
    "--metrics-listen",
    default="",
    metavar="HOST:PORT",
    help="Also serve the metrics (Prometheus text) over HTTP here, e.g. 127.0.0.1:9101 "
    "(default: $FLEET_METRICS_LISTEN, else nowhere).",
)
@click.option(
    "--store",
    default="",
    metavar="etcd://HOST:PORT[,…]",
    help="Keep leases and claims in etcd, shared with every fleetd pointed at it (default: "
    "$FLEET_STORE, else SQLite in the state directory).",
)
@click.version_option(
    RELEASE, prog_name="fleetd", message=f"%(prog)s %(version)s (protocol {PROTOCOL_VERSION})"
)
@click.pass_context
def cli(  # noqa: PLR0917 (click passes each option by position)
    ctx: click.Context,
    socket_path: str,
    state_dir: str,
    log_level: str,
    metrics_listen: str,
    store: str,
) -> None:
    """fleetd, the fleet supervisor daemon.

    With no command, run the daemon in the foreground until SIGTERM or SIGINT: this is what
    systemd (fleetd.service) and `make run` start. A failure to start is one `fleetd: ...`
    line and a sysexits code. The command below repairs a state directory instead."""
    config = daemon_config(socket_path, state_dir, metrics_listen, store)
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        serve(config, log_level)


@cli.command("reset-state")
@click.option(
    "--keep-store",
    is_flag=True,
    help="Adopt the store as it is now (say, a backup restored on purpose) instead of "
    "archiving it.",
)
@click.pass_obj
def reset_state_command(config: DaemonConfig, keep_store: bool) -> None:
    """Start the state directory over after fleetd refused it (its store lost, rolled back,
    replaced or unreadable).

    Moves everything in the state directory to archive/<UTC time>/ and starts an empty store,
    or with --keep-store keeps the store as it is. Either way revisions, and so fencing
    tokens, continue above every one given before. Refuses while fleetd runs, or while
    holders of the old state still run."""

    def reset() -> None:
        runtime_root = os.path.dirname(config.socket_path)
        if config.store:
            lines = reset_etcd_state(
                config.state_dir, runtime_root, config.store, keep_store=keep_store
            )
        else:
            lines = reset_state(config.state_dir, runtime_root, keep_store=keep_store)
        for line in lines:
            click.echo(f"fleetd: {line}")

    one_line_on_failure(reset)
