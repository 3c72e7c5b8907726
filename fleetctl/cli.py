"""The fleetctl command line (click). Commands import what they need when they run."""

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import click
import msgspec

from fleetctl import _stdout
from fleetctl.output import emit, fail, printable, usage
from fleetctl.table import status_table
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.errors import Absent, FleetError, InvalidRequest
from protocol.paths import client_socket_path
from protocol.texts import left_up


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


MAX_TIMEOUT = 365 * 86_400.0
"""Seconds: a year, far below what a socket timeout takes (about 9e9 s)."""


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A duration in protocol.durations' grammar (`15`, `1.5`, `1m30s`, `500ms`), in seconds;
    with `least`/`most`, also within that range."""

    name = "duration"

    def __init__(self, least: float = 0.0, most: float = math.inf) -> None:
        self.least = least
        self.most = most

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from protocol.durations import parse_duration

        try:
            seconds = parse_duration(value)
        except InvalidRequest as exc:
            self.fail(exc.message, param, ctx)
        if not self.least <= seconds <= self.most:
            self.fail(
                f"{value!r} is out of range: at least {self.least:g}s, at most {self.most:.0f}s",
                param,
                ctx,
            )
        return seconds


DURATION = Duration()


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
    default="10s",
    show_default=True,
    type=Duration(0.001, MAX_TIMEOUT),
    help="How long to wait for fleetd (a duration: 10, 2.5, 1m30s, 500ms).",
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


def _metrics(g: Globals) -> int:
    from fleetctl.sync import SyncClient

    with SyncClient(g.socket_path, timeout=g.timeout) as client:
        text = client.metrics()
    return emit(g.json, text.rstrip("\n"), text=text)


cli.command("ping", help="Check that fleetd answers, and how fast.")(run_command(_ping))
cli.command(
    "metrics",
    help="Print fleetd's metrics in the Prometheus text format (`fleetd --metrics-listen` "
    "serves the same over HTTP).",
)(run_command(_metrics))
cli.command("version", help="Print the versions of fleetctl and of fleetd.")(run_command(_version))


@cli.group("lease")
def lease_group() -> None:
    """Leases with fencing tokens. Always prints one JSON envelope {"outcome", "lease"}."""


def _client_result(g: Globals, call: Callable[[Any], Any], *, always_json: bool = False) -> Any:
    """What `call` returns, run on a connected SyncClient; a FleetError exits with its
    outcome's code, reported as an envelope with --json or `always_json`."""
    from fleetctl.sync import SyncClient

    try:
        with SyncClient(g.socket_path, timeout=g.timeout) as client:
            return call(client)
    except FleetError as error:
        raise Exit(fail(g.json or always_json, error)) from None


def _client_call(g: Globals, call: Callable[[Any], int], *, always_json: bool = False) -> None:
    """Run `call` on a connected SyncClient and exit with the code it returns (see
    _client_result for errors)."""
    raise Exit(_client_result(g, call, always_json=always_json))


def _lease_call(g: Globals, call: Callable[[Any], Any]) -> None:
    """One JSON envelope whatever happens, --json or not: leases are for scripts."""
    _client_call(g, lambda client: _lease_envelope(call(client)), always_json=True)


def _lease_envelope(result: Any) -> int:
    import msgspec

    from protocol.messages import LeaseList
    from protocol.outcomes import Outcome

    if isinstance(result, LeaseList):
        return emit(True, "", Outcome.OK, leases=msgspec.to_builtins(result.leases))
    fields = {"lease": msgspec.to_builtins(result.lease)}
    if result.message:
        fields["message"] = result.message
    if result.previous is not None:
        fields |= {"previous": msgspec.to_builtins(result.previous), "fence": result.fence}
    return emit(True, "", result.outcome, **fields)


_OWNER = click.option("--owner", required=True, help="Who holds the lease (an agent id).")
_TOKEN = click.option(
    "--token", type=int, default=0, help="Only this grant of the lease (its fencing token)."
)


@lease_group.command("acquire")
@click.argument("name")
@_OWNER
@click.option("--ttl", type=DURATION, default="15s", show_default=True, help="Lease lifetime.")
@click.option(
    "--pid",
    type=int,
    default=None,
    help="The process to bind the lease to: this command's parent (default) or an ancestor.",
)
@click.pass_obj
def lease_acquire(g: Globals, name: str, owner: str, ttl: float, pid: int | None) -> None:
    """Acquire NAME: acquired (0), already_acquired (0) or contested (12)."""
    bound = pid if pid is not None else os.getppid()
    _lease_call(g, lambda client: client.lease_acquire(name, owner, ttl, pid=bound))


@lease_group.command("heartbeat")
@click.argument("name")
@_OWNER
@_TOKEN
@click.pass_obj
def lease_heartbeat(g: Globals, name: str, owner: str, token: int) -> None:
    """Renew NAME to its full TTL: renewed (0) or not_owned (10)."""
    _lease_call(g, lambda client: client.lease_heartbeat(name, owner, token))


@lease_group.command("release")
@click.argument("name")
@_OWNER
@_TOKEN
@click.pass_obj
def lease_release(g: Globals, name: str, owner: str, token: int) -> None:
    """Release NAME: released, already_released (0), not_owned (10) or absent (11)."""
    _lease_call(g, lambda client: client.lease_release(name, owner, token))


@lease_group.command("inspect")
@click.argument("name")
@click.pass_obj
def lease_inspect(g: Globals, name: str) -> None:
    """Show NAME's record: ok (0) or absent (11)."""
    _lease_call(g, lambda client: client.lease_inspect(name))


@lease_group.command("list")
@click.argument("prefix", default="")
@click.pass_obj
def lease_list(g: Globals, prefix: str) -> None:
    """Every lease record whose name starts with PREFIX."""
    _lease_call(g, lambda client: client.lease_list(prefix))


# --- claims (hidden: the machine boundary for scripts) ----------------------------------------


@cli.group("claims", hidden=True)
def claims_group() -> None:
    """The claims journal. Always prints one JSON envelope {"outcome", ...} on stdout."""


def _claims_call(g: Globals, call: Callable[[Any], Any]) -> None:
    """One JSON envelope whatever happens, --json or not: claims are the scripts' boundary."""
    _client_call(g, lambda client: _claims_envelope(call(client)), always_json=True)


def _claims_envelope(result: Any) -> int:
    import msgspec

    from protocol.claims import ClaimList
    from protocol.outcomes import Outcome

    if isinstance(result, ClaimList):
        return emit(True, "", Outcome.OK, claims=msgspec.to_builtins(result.claims))
    fields: dict[str, Any] = {"claim": msgspec.to_builtins(result.claim)}
    if result.message:
        fields["message"] = result.message
    return emit(True, "", result.outcome, **fields)


def _read_content() -> bytes:
    """stdin, refused (before anything is sent) past the protocol's hard cap."""
    from protocol.claims import MAX_CONTENT
    from protocol.errors import InvalidRequest

    content = sys.stdin.buffer.read(MAX_CONTENT + 1)
    if len(content) > MAX_CONTENT:
        raise InvalidRequest(f"stdin is over the maximum of {MAX_CONTENT} bytes; nothing sent")
    return content


_KIND = click.option("--kind", required=True, help="file or prompt_inbox.")
_ANY_KIND = click.option(
    "--kind",
    required=True,
    help="file, prompt_inbox, or one of fleetd's own: holder, member, socket, log, lease.",
)
_KEY = click.option("--key", required=True, help="The claim's name within its kind.")
_CLAIM_OWNER = click.option("--owner", required=True, help="Who owns the claim (an agent id).")


@claims_group.command("acquire")
@_KIND
@_KEY
@_CLAIM_OWNER
@click.pass_obj
def claims_acquire(g: Globals, kind: str, key: str, owner: str) -> None:
    """Deliver stdin as KEY: acquired, already_acquired (0) or contested (12)."""
    try:
        content = _read_content()
    except FleetError as error:
        raise Exit(fail(True, error)) from None
    _claims_call(g, lambda client: client.claim_acquire(kind, key, owner, content))


@claims_group.command("release")
@_KIND
@_KEY
@_CLAIM_OWNER
@click.pass_obj
def claims_release(g: Globals, kind: str, key: str, owner: str) -> None:
    """Release KEY: released, already_released (0), not_owned (10) or absent (11)."""
    _claims_call(g, lambda client: client.claim_release(kind, key, owner))


@claims_group.command("inspect")
@_ANY_KIND
@_KEY
@click.pass_obj
def claims_inspect(g: Globals, kind: str, key: str) -> None:
    """Show a journal entry: ok (0) or absent (11)."""
    _claims_call(g, lambda client: client.claim_inspect(kind, key))


@claims_group.command("list")
@click.option("--kind", default="", help="Only entries of this kind.")
@click.option("--owner", default="", help="Only this owner's entries.")
@click.pass_obj
def claims_list(g: Globals, kind: str, owner: str) -> None:
    """Every journal entry, released ones included: claims, then fleetd's own resources."""
    _claims_call(g, lambda client: client.claim_list(kind, owner))


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_obj
def gc(g: Globals, dry_run: bool) -> None:
    """Remove what no live owner holds, and report each item: claims (and their files) of
    owners that are gone, exited clusters' files and records, dead lease records.

    An owner is live while it holds a live lease or is a running member or cluster; a
    running cluster, a held lease and a live member's files are never touched."""
    _client_call(g, lambda client: _gc_report(g, client.claim_gc(dry_run=dry_run)))


def _gc_report(g: Globals, result: Any) -> int:
    import msgspec

    verb = "would remove" if result.dry_run else "removed"
    lines = [
        f"{verb} {c.kind} {c.key!r} of {c.owner}" + (f" ({c.path})" if c.path else "")
        for c in result.removed
    ]
    lines.append(f"{len(result.removed)} {verb}, {result.kept} kept")
    return emit(
        g.json,
        "\n".join(lines),
        result.outcome,
        dry_run=result.dry_run,
        removed=msgspec.to_builtins(result.removed),
        kept=result.kept,
    )


@cli.command(
    "coord-run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@click.option("--agent", required=True, help="The agent id that owns the lease.")
@click.option("--lease", "lease_name", required=True, help="The lease to hold.")
@click.option("--ttl", type=DURATION, default="15s", show_default=True, help="Lease lifetime.")
@click.option("--cleanup", default=None, help="A shell command run once on every exit path.")
@click.option(
    "--grace",
    type=DURATION,
    default="5s",
    show_default=True,
    help="SIGTERM to SIGKILL, when the lease is lost and the child must stop.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def coord_run(
    g: Globals,
    *,
    agent: str,
    lease_name: str,
    ttl: float,
    cleanup: str | None,
    grace: float,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND while holding a lease; stand down (exit 0) if a healthy leader holds it.

    Exits with the child's code, 128+signal for a forwarded SIGTERM/SIGINT/SIGHUP, 10 when the
    lease is lost (the child is stopped), 14 when fleetd is unreachable, 1 on an internal error.
    """
    from fleetctl.coordrun import Options, coord_run

    options = Options(
        socket_path=g.socket_path,
        agent=agent,
        lease=lease_name,
        ttl=ttl,
        command=command,
        cleanup=cleanup,
        grace=grace,
        timeout=g.timeout,
    )
    raise Exit(coord_run(options))


_GLOBAL_OPTIONS_WITH_VALUES = ("--socket", "--timeout")


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv, skipping the global options."""
    rest = iter(argv)
    for arg in rest:
        if arg in _GLOBAL_OPTIONS_WITH_VALUES:
            next(rest, None)
        elif not arg.startswith("-"):
            return arg
    return None


def json_requested(argv: list[str]) -> bool:
    """Whether --json was given before any `--` (or the command always speaks JSON): needed
    when click could not parse argv."""
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options or _command_of(options) in ("lease", "claims")


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


# --- detached clusters ------------------------------------------------------------------------


def _emit_members(g: Globals, statuses: list[Any], outcome: Any = None, **fields: Any) -> int:
    import msgspec

    from protocol.outcomes import Outcome

    if outcome is None:
        absent = any(s.state == "absent" for s in statuses)
        outcome = Outcome.ABSENT if absent else Outcome.OK
    members = msgspec.to_builtins(statuses)
    return emit(g.json, status_table(members), outcome, members=members, **fields)


def _live_members(ctx: click.Context) -> list[Any]:
    """Every live member, for completing a name: nothing if no fleetd answers quickly."""
    from fleetctl.sync import SyncClient

    socket_path = ctx.find_root().params.get("socket_path") or client_socket_path(
        os.environ, os.path.exists
    )
    try:
        with SyncClient(socket_path, timeout=0.5) as client:
            return client.member_status()
    except (FleetError, OSError):
        return []


def _complete_members(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[str]:
    members = _live_members(ctx)
    spelt = (f"{m.cluster}/{m.name}" if "/" in incomplete else m.name for m in members)
    return sorted({name for name in spelt if name.startswith(incomplete)})


def _complete_clusters(ctx: click.Context, _: click.Parameter, incomplete: str) -> list[str]:
    clusters = {m.cluster for m in _live_members(ctx)}
    return sorted(name for name in clusters if name.startswith(incomplete))


def _complete_members_and_clusters(
    ctx: click.Context, _: click.Parameter, incomplete: str
) -> list[str]:
    live = _live_members(ctx)
    spelt = {f"{m.cluster}/{m.name}" if "/" in incomplete else m.name for m in live}
    return sorted(n for n in spelt | {m.cluster for m in live} if n.startswith(incomplete))


_WAIT_TIMEOUT = click.option(
    "--timeout",
    "wait_timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="How long to wait for the members to run.",
)


def _wait_left_up(client: Any, cluster: str, names: list[str], timeout: float) -> Any:
    """member_wait; a failure says that the cluster was left up, and how to bring it down."""
    try:
        return client.member_wait(names, timeout)
    except FleetError as error:
        error.message = left_up(error.message, cluster)
        raise


@cli.command("up")
@click.option("-f", "--file", "path", default="fleet.toml", show_default=True, help="Definitions.")
@click.option("--name", default=None, help="The cluster's name (default: the file's `name`).")
@click.option("--wait", is_flag=True, help="Wait until every member runs.")
@_WAIT_TIMEOUT
@click.option(
    "--idempotent", is_flag=True, help="Already up with the same definition: succeed (0)."
)
@click.pass_obj
def up(
    g: Globals,
    *,
    path: str,
    name: str | None,
    wait: bool,
    wait_timeout: float,
    idempotent: bool,
) -> None:
    """Start a cluster under fleetd: acquired, already_acquired (0) or contested (12)."""
    from fleetctl.definitions import directory_of, read_toml
    from fleetctl.progress import shown_while_waiting

    def call(client: Any) -> int:
        result = client.cluster_up_toml(
            read_toml(path),
            source=printable(path),
            name=name,
            idempotent=idempotent,
            directory=directory_of(path),
        )
        members = result.members
        if wait:
            names = [f"{result.cluster}/{m.name}" for m in members]
            with shown_while_waiting(g.socket_path, names):
                members = _wait_left_up(client, result.cluster, names, wait_timeout)
        return _emit_cluster(g, result, members)

    _client_call(g, call)


@cli.command("status")
@click.argument("names", nargs=-1, shell_complete=_complete_members)
@click.pass_obj
def status(g: Globals, names: tuple[str, ...]) -> None:
    """Show members' status (NAME, CLUSTER/NAME, or a CLUSTER's members); every live member
    without NAMEs. A member's name wins over a cluster's.

    Outcomes: ok (0), absent (11)."""
    _client_call(g, lambda client: _emit_members(g, client.member_status(names)))


@cli.command("wait")
@click.argument("names", nargs=-1, required=True, shell_complete=_complete_members)
@_WAIT_TIMEOUT
@click.pass_obj
def wait_command(g: Globals, names: tuple[str, ...], wait_timeout: float) -> None:
    """Wait until every NAME runs.

    Outcomes: ok (0), timeout (13), absent (11), or the member's error (1)."""
    from fleetctl.progress import shown_while_waiting

    def call(client: Any) -> int:
        with shown_while_waiting(g.socket_path, names):
            return _emit_members(g, client.member_wait(names, wait_timeout))

    _client_call(g, call)


@cli.command("stop")
@click.argument("name", shell_complete=_complete_members)
@click.pass_obj
def stop(g: Globals, name: str) -> None:
    """Stop one member; its siblings keep running."""
    _client_call(g, lambda client: _emit_members(g, [client.member_stop(name)]))


@cli.command("add")
@click.argument("name")
@click.option("--sibling", required=True, help="A live member: NAME joins its cluster.")
@click.option("-f", "--file", "path", default=None, help="Take the definition from this file...")
@click.option("--member", default=None, help="...its [members.MEMBER] table (default: NAME).")
@click.option("--wait", is_flag=True, help="Wait until the new member runs.")
@_WAIT_TIMEOUT
@click.pass_obj
def add(
    g: Globals,
    *,
    name: str,
    sibling: str,
    path: str | None,
    member: str | None,
    wait: bool,
    wait_timeout: float,
) -> None:
    """Boot NAME into SIBLING's cluster, with the same peers. Without -f, NAME is defined
    like SIBLING (its own {port}, {name} and {dir})."""
    spec = _member_definition(path, member or name) if path else None

    def call(client: Any) -> int:
        added = client.member_add(name, sibling, spec)
        if wait:
            added = client.member_wait([f"{added.cluster}/{added.name}"], wait_timeout)[0]
        return _emit_members(g, [added])

    _client_call(g, call)


def _member_definition(path: str, member: str) -> Any:
    from fleetctl.definitions import load_toml

    try:
        spec = load_toml(path).member(member)
    except InvalidRequest as error:
        raise Exit(fail(False, error)) from None
    if spec is None:
        raise click.UsageError(f"{path} defines no member {member!r}")
    return spec


@cli.command("down")
@click.argument("cluster", shell_complete=_complete_clusters)
@click.pass_obj
def down(g: Globals, cluster: str) -> None:
    """Stop every member of CLUSTER: released, already_released (0) or absent (11)."""

    def call(client: Any) -> int:
        result = client.cluster_down(cluster, timeout=max(g.timeout, 60.0))
        return emit(g.json, f"cluster {cluster} {result.outcome}", result.outcome, cluster=cluster)

    _client_call(g, call)


@cli.command("logs")
@click.argument("name", metavar="NAME|CLUSTER", shell_complete=_complete_members_and_clusters)
@click.option(
    "-f", "--follow", is_flag=True, help="Then print what it writes, until it leaves its cluster."
)
@click.option("--stderr", is_flag=True, help="Its stderr (default: stdout; a cluster's: both).")
@click.option(
    "-n",
    "--tail",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Only the last N lines of what is there (a cluster's: of each member's), then, with "
    "-f, everything new.",
)
@click.option(
    "-t",
    "--timestamps",
    is_flag=True,
    help="Begin each line with when the holder read it: RFC 3339, UTC, milliseconds.",
)
@click.pass_obj
def logs(
    g: Globals, *, name: str, follow: bool, stderr: bool, tail: int | None, timestamps: bool
) -> None:
    """Print a member's log: the rotated part (.1) first, then the current file.

    With -f, keep following it as `tail -F` does: what the member writes shows up as it is
    written, across the member's restarts and the log's rotation, until the member leaves its
    cluster (`fleetctl stop`, `fleetctl down`, or its holder exiting); then exit 0, its last
    output printed. A member that already left prints its log and exits 0. Ctrl-C (SIGINT) or
    SIGTERM stops following, exit 0. Following reads the files and asks the member's holder,
    not fleetd: a fleetd restart does not end it.

    CLUSTER (a name that is no member's) prints every member's stdout and stderr interleaved
    in time order, each line after its member's name (`web  | ...`); with -f, until the
    cluster is down, following members added meanwhile. An unknown name is absent (11).
    """
    from fleetctl.logs import LinePrinter, follow_lines, follow_log, print_lines, print_log

    handler = signal.getsignal(signal.SIGTERM)
    if follow:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: exit 0
    try:
        named = _client_result(g, lambda client: client.logs_named(name))
        if not named.logs:  # fleetd names at least one; an answer without any is absent too
            raise Absent(f"no member or cluster {name!r}")
        sys.stdout.flush()
        out = sys.stdout.buffer
        if named.cluster or timestamps:
            streams = _streams(named.cluster, stderr)
            names = [paths.member for paths in named.logs] if named.cluster else []
            printer = LinePrinter(out, timestamps=timestamps, names=names)
            if follow:
                follow_lines(named.logs, printer, streams=streams, tail=tail, cluster=named.cluster)
            else:
                print_lines(named.logs, printer, streams=streams, tail=tail)
        elif follow:
            follow_log(named.logs[0], out, stderr=stderr, tail=tail)
        else:
            paths = named.logs[0]
            print_log(paths.stderr if stderr else paths.stdout, out, tail=tail)
    except KeyboardInterrupt:
        if not follow:
            raise
    except BrokenPipeError:  # `fleetctl logs -f NAME | head`: the reader is done, so are we
        _stdout.discard()
    except FleetError as error:
        raise Exit(fail(g.json, error)) from None
    except OSError as exc:
        raise Exit(fail(g.json, FleetError(f"cannot read the log of {name!r}: {exc}"))) from None
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    raise Exit(0)


def _streams(cluster: bool, stderr: bool) -> tuple[str, ...]:
    """Which logs `logs` prints: stdout, or with --stderr stderr; a cluster's, both."""
    if stderr:
        return ("stderr",)
    return ("stdout", "stderr") if cluster else ("stdout",)


# --- start, restart, apply ---------------------------------------------------------------------


def _emit_changes(g: Globals, client: Any, result: Any, wait: bool, wait_timeout: float) -> int:
    """What start, restart or apply did to each member, then the members as they stand (as
    they run, with --wait: every member that was not removed)."""
    members = result.members
    if wait:
        names = [f"{result.cluster}/{m.name}" for m in members]
        from fleetctl.progress import shown_while_waiting

        with shown_while_waiting(g.socket_path, names):
            members = client.member_wait(names, wait_timeout)
    changes = {name: str(change) for name, change in result.changes.items()}
    return _emit_cluster(g, result, members, changes)


def _emit_cluster(
    g: Globals, result: Any, members: list[Any], changes: dict[str, str] | None = None
) -> int:
    """A ClusterResult: its outcome and holder, what happened to each member when `changes`
    says, then its members' table (or one JSON envelope)."""
    if not g.json:
        head = f"cluster {result.cluster} {result.outcome} (holder pid {result.holder_pid})"
        lines = [f"{name} {change}" for name, change in (changes or {}).items()]
        table = status_table(msgspec.to_builtins(members))
        return emit(False, "\n".join([head, *lines, table]), result.outcome)
    return _emit_members(
        g,
        members,
        result.outcome,
        cluster=result.cluster,
        holder_pid=result.holder_pid,
        runtime_dir=result.runtime_dir,
        **({} if changes is None else {"changes": changes}),
    )


_WAIT = click.option("--wait", is_flag=True, help="Then wait until the members run.")


@cli.command("start")
@click.argument("name", shell_complete=_complete_members)
@_WAIT
@_WAIT_TIMEOUT
@click.pass_obj
def start(g: Globals, name: str, wait: bool, wait_timeout: float) -> None:
    """Start a stopped member again, with the same port and directory (and the definition
    it had). One in error, or stopped after a clean exit, is started afresh; one preparing,
    starting or running is left alone. When it was the last member of its cluster to stop,
    fleetd starts the cluster's holder again, its other members kept stopped.

    Outcomes: acquired (0, started), already_acquired (0, already running), absent (11)."""

    def call(client: Any) -> int:
        result = client.member_start(name, timeout=max(g.timeout, 60.0))
        return _emit_changes(g, client, result, wait, wait_timeout)

    _client_call(g, call)


@cli.command("restart")
@click.argument("name", metavar="NAME|CLUSTER", shell_complete=_complete_members_and_clusters)
@_WAIT
@_WAIT_TIMEOUT
@click.pass_obj
def restart(g: Globals, name: str, wait: bool, wait_timeout: float) -> None:
    """Stop and start a member (NAME, or CLUSTER/NAME) with the same port and directory; for
    the name of a cluster (that no member bears), every member of it, all at once. Stopped
    members are started.

    Outcomes: acquired (0), absent (11)."""

    def call(client: Any) -> int:
        result = client.member_restart(name, timeout=max(g.timeout, 60.0))
        return _emit_changes(g, client, result, wait, wait_timeout)

    _client_call(g, call)


@cli.command("apply")
@click.option("-f", "--file", "path", default="fleet.toml", show_default=True, help="Definitions.")
@click.option("--name", default=None, help="The cluster's name (default: the file's `name`).")
@_WAIT
@_WAIT_TIMEOUT
@click.pass_obj
def apply(g: Globals, *, path: str, name: str | None, wait: bool, wait_timeout: float) -> None:
    """Bring a cluster to an edited fleet.toml, as `docker compose up` does: restart the
    members whose definition changed (same port and directory), add new ones, remove those
    the file no longer names, start stopped ones, leave the others running. A cluster that
    is not up is started. Prints what happened to each member: unchanged, restarted, added,
    removed or started.

    Outcomes: acquired (0, started), already_acquired (0, nothing changed), ok (0, changed),
    or the file's error (1)."""
    from fleetctl.definitions import directory_of, read_toml

    def call(client: Any) -> int:
        result = client.cluster_apply_toml(
            read_toml(path),
            source=printable(path),
            name=name,
            directory=directory_of(path),
            timeout=max(g.timeout, 90.0),
        )
        return _emit_changes(g, client, result, wait, wait_timeout)

    _client_call(g, call)


# --- --json after the command -------------------------------------------------------------------


def _json_after_the_command(ctx: click.Context, _: click.Parameter, given: bool) -> None:
    if given:
        ctx.obj = replace(ctx.obj, json=True)


def _accept_json_after_the_command(group: click.Group) -> None:
    """`fleetctl status --json` means `fleetctl --json status`: people type it after."""
    for command in group.commands.values():
        if isinstance(command, click.Group):
            _accept_json_after_the_command(command)
            continue
        command.params.append(
            click.Option(
                ["--json"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_json_after_the_command,
                help="As fleetctl --json.",
            )
        )


from fleetctl import runs as _runs  # noqa: E402, F401  (registers its commands on cli)
from fleetctl import top as _top  # noqa: E402, F401  (registers its command on cli)

_accept_json_after_the_command(cli)
