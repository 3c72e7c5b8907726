"""The start-up fast path (fleetctl._fast) against the click commands it stands in for.

Both paths run as real processes against the same kind of daemon, and must print the same
bytes on stdout and stderr and exit with the same code: for every command the fast path
serves, on success and on every failure a script can meet (an answer with a non-zero
outcome, an error from fleetd, no daemon, a daemon of another protocol, no answer in time).
Commands that change something run on twin fleetds given the same history, one per path;
their outputs are compared once each daemon's directory and the wall-clock times are masked.
What the fast path reads from argv must be what click reads, or nothing at all.
"""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, get_args

import click
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl import _fast
from fleetctl._fast import tasks as fast_tasks
from fleetctl._fast.argv import _GLOBAL as GLOBAL_OPTIONS
from fleetctl._fast.argv import LEAST_TIMEOUT, MOST_TIMEOUT, SPECS, Command, _text
from fleetctl._fast.wire import ERROR_OUTCOMES, Failure, quote
from fleetctl.cli import MAX_TIMEOUT, cli
from fleetctl.runs import _table
from fleetctl.sync import SyncClient
from fleetd.tasks.views import EncodedTaskList
from protocol import MAX_CLAIM_CONTENT, PROTOCOL_VERSION
from protocol.errors import ERRORS_BY_CODE, MemberFailed
from protocol.paths import client_socket_path
from protocol.runs import TASK_STATES, Drain, TaskList, TaskView
from protocol.tables import TASK_COLUMNS, tasks_table
from protocol.tasks import InboxEntry, TaskResult
from tests.processes import FLEETCTL, Fleetd, kill_holders, running_fleetd
from tests.test_tasks import cells_of_views, submit, task, views, wait_run, worker

CLICK = [
    sys.executable,
    "-c",
    "import sys; from fleetctl.cli import run; sys.exit(run(sys.argv[1:]))",
]
"""fleetctl without its fast path: the click commands, as a process."""

Result = tuple[int, str, str]


def fleetctl_both(
    argv: list[str], fast_env: dict[str, str], click_env: dict[str, str], stdin: bytes = b""
) -> tuple[Result, Result]:
    """(exit code, stdout, stderr) of `argv` through the fast path, then through click."""
    assert _fast.parse(argv) is not None, f"the fast path does not take {argv}"
    done = [
        subprocess.run(
            [*program, *argv], env=env, input=stdin, capture_output=True, timeout=60, check=False
        )
        for program, env in ((FLEETCTL, fast_env), (CLICK, click_env))
    ]
    fast, slow = ((d.returncode, d.stdout.decode(), d.stderr.decode()) for d in done)
    return fast, slow


_TIMES = re.compile(r'"(acquired_at|released_at|expires_at|remaining|started_at)":[-+.e0-9]+')
_PIDS = re.compile(r'"(pid|holder_pid)":\d+')
_UPTIMES = re.compile(r"\b\d+[dhms](\d+[hm])?\b")


def masked(result: Result, *roots: str, pids: bool = False) -> Result:
    """`result` with each daemon's directory as ROOT (the same length: tables keep their
    widths) and wall-clock times masked; with `pids`, processes' ids too (twin holders)."""
    code, out, err = result
    for root in roots:
        out, err = out.replace(root, "ROOT"), err.replace(root, "ROOT")
    out = re.sub(r"for [.0-9]+s more", "for Ts more", _TIMES.sub(r'"\1":T', out))
    if "UPTIME" in out:  # a table: the uptimes, and so the columns' widths, move on
        out = re.sub(" +", " ", _UPTIMES.sub("U", out))
    if pids and out.startswith("{"):
        out = _PIDS.sub(r'"\1":N', out)
    elif pids:  # a table: its numbers, and so its columns' widths
        out = re.sub(" +", " ", re.sub(r"\d+", "N", out))
    return code, out, err


# -- what the fast path reads from argv ---------------------------------------------------------


def click_reads(argv: list[str]) -> Command | None:
    """The command and parameters click would run `argv` with, when it is a command the fast
    path serves; None when click would not run it (a usage error, --help, --version)."""
    seen: list[Command] = []

    def record(**params: Any) -> None:
        context = click.get_current_context()
        g = context.obj
        name = context.command_path.removeprefix("fleetctl ")
        globals_ = {"socket_path": g.socket_path, "json": g.json, "timeout": g.timeout}
        seen.append(Command(name, params, **globals_))

    commands = {name: _click_command(name) for name in SPECS}
    callbacks = {name: command.callback for name, command in commands.items()}
    try:
        for command in commands.values():
            command.callback = record
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.suppress(click.ClickException, click.exceptions.Exit, SystemExit),
        ):
            cli.main(args=list(argv), prog_name="fleetctl", standalone_mode=False)
    finally:
        for name, command in commands.items():
            command.callback = callbacks[name]
    return seen[0] if seen else None


def _click_command(name: str) -> click.Command:
    command: click.Command = cli
    for word in name.split():
        assert isinstance(command, click.Group)
        command = command.commands[word]
    return command


def same_parse(fast: Command, slow: Command | None) -> bool:
    default = client_socket_path(os.environ, os.path.exists)
    fast_socket = default if fast.socket_path is None else fast.socket_path
    return slow is not None and (
        fast.name,
        fast.params,
        fast_socket,
        fast.json,
        fast.timeout,
    ) == (slow.name, slow.params, slow.socket_path, slow.json, slow.timeout)


NOT_UTF8 = b"\xff".decode(errors="surrogateescape")
WORDS = [
    *("ping", "version", "status", "wait", "up", "lease", "claims", "gc", "stop"),
    *("acquire", "heartbeat", "release", "inspect", "list"),
    *("--json", "--socket", "--socket=/s", "--socket=", "--timeout", "--timeout=2s"),
    *("-h", "--help", "--version", "--", "-", "--json=1", "--no-such", "-x"),
    *("--owner", "--owner=", "--owner=a", "--token", "--token=7", "--ttl", "--pid"),
    *("--kind", "--key", "--key=k", "-f", "--file", "--file=f.toml", "-ff.toml", "-f=x"),
    *("--name", "--wait", "--wait=1", "--idempotent", "--timeout=0"),
    *("15s", "1m30s", "500ms", "0", "0.0005", "-1", "+5", " 7 ", "1_0", "٣", "1e3", "nan"),
    *("99999999999999999999999", "31536001", "2y", "a", "web/a", "file", "", NOT_UTF8),
    *("runs", "tasks", "show", "--run", "--run=", "--run=run-1", "run-1"),
]
PREFIXES = [[], ["lease"], ["claims"], ["runs"], ["tasks"], *(name.split() for name in SPECS)]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(["--json", "--socket", "/s", "--timeout", "3", "--timeout=1m"])),
    st.sampled_from(PREFIXES),
    st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=8),
)
def test_the_fast_path_reads_argv_as_click_does_or_not_at_all(
    head: list[str], command: list[str], tail: list[str]
) -> None:
    argv = [*head, *command, *tail]
    fast = _fast.parse(argv)
    if fast is not None:
        assert same_parse(fast, click_reads(argv)), (argv, fast, click_reads(argv))


HOSTILE = st.sampled_from([*WORDS, "-h", "--owner"]) | st.text(max_size=6)
NUMBERS = ["7", "0", "-1", "+5", " 7 ", "1_0", "٣", "99999999999999999999999", "0x10"]
DURATIONS = ["15s", "1m30s", "500ms", "0", "0.5", "1h5m", "-1", "nan", "2y", "1e3", "1m1h"]


@st.composite
def value_for(draw: st.DrawFn, convert: Callable[[str], object] | None) -> str:
    """Mostly a value of the option's kind (valid or nearly), now and then anything."""
    if not draw(st.integers(0, 4)):
        return draw(HOSTILE)
    kind = getattr(convert, "__name__", "")
    if kind == "_int":
        return draw(st.sampled_from(NUMBERS))
    if kind in ("_duration", "_timeout"):
        return draw(st.sampled_from(DURATIONS))
    return draw(st.sampled_from(["a", "build/main", "web/a", "k", "", "/s", "x.toml"]))


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """A command the fast path serves, each of its options given or not (spelt either way,
    with a value of the right kind or not), arguments, all in any order, and now and then a
    stray word."""
    head: list[str] = []
    for option in draw(st.lists(st.sampled_from(["--json", "--socket", "--timeout"]))):
        _, convert = GLOBAL_OPTIONS[option]
        head += [option] if convert is None else [option, draw(value_for(convert))]
    name = draw(st.sampled_from(sorted(SPECS)))
    spec = SPECS[name]
    parts: list[list[str]] = []
    for spelling, (parameter, convert) in spec.options.items():
        if not draw(st.integers(0, 5 if parameter in spec.required else 1)):
            continue
        value = draw(value_for(convert))
        if convert is None:
            parts.append([spelling] if draw(st.integers(0, 5)) else [f"{spelling}={value}"])
        elif spelling.startswith("--") and draw(st.booleans()):
            parts.append([f"{spelling}={value}"])
        else:
            parts.append([spelling, value])
    if not draw(st.integers(0, 3)):
        parts.append(["--json"])  # after the command, as people type it
    count = 1 if spec.arguments and spec.arguments[1] == "1" else draw(st.integers(0, 3))
    count = draw(st.sampled_from([count, count, count, 0, 2]))
    parts += [[draw(value_for(_text))] for _ in range(count)]
    argv = [*head, *name.split(), *(word for part in draw(st.permutations(parts)) for word in part)]
    if not draw(st.integers(0, 4)):
        argv.insert(draw(st.integers(0, len(argv))), draw(HOSTILE))
    return argv


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_lines())
def test_command_lines_of_fast_commands_are_read_as_click_reads_them_or_not_at_all(
    argv: list[str],
) -> None:
    fast = _fast.parse(argv)
    if fast is not None:
        assert same_parse(fast, click_reads(argv)), (argv, fast, click_reads(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "status"],
        ["status", "web/a", "b"],
        ["--timeout", "2s", "--socket", "/s", "wait", "a", "--timeout", "1m30s"],
        ["up", "-f", "f.toml", "--name", "x", "--wait", "--timeout=45s", "--idempotent"],
        ["--json", "up", "--file=f.toml"],
        ["lease", "acquire", "build/main", "--owner", "agent-7", "--ttl", "15s", "--pid", "42"],
        ["lease", "heartbeat", "build", "--owner=a", "--token", "12"],
        ["lease", "release", "build", "--owner", "a"],
        ["lease", "inspect", "build"],
        ["claims", "acquire", "--kind", "prompt_inbox", "--key", "task-1", "--owner", "a"],
        ["claims", "release", "--key", "k", "--owner", "a", "--kind", "file"],
        ["claims", "inspect", "--kind", "lease", "--key", "build"],
        ["--socket=/s", "--json", "--timeout=500ms", "ping"],
        ["status", "--json"],
        ["lease", "acquire", "build", "--owner", "a", "--json"],
        ["claims", "inspect", "--json", "--kind", "lease", "--key", "build"],
        ["runs", "show", "run-1"],
        ["runs", "show", "run-1", "--json"],
        ["tasks", "list", "--run", "run-1"],
        ["--json", "tasks", "list", "--run=run-1"],
        ["tasks", "list"],
    ],
)
def test_the_command_lines_scripts_write_take_the_fast_path(argv: list[str]) -> None:
    fast = _fast.parse(argv)
    assert fast is not None
    assert same_parse(fast, click_reads(argv))


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--help"],
        ["-h", "status"],
        ["--version"],
        ["lease", "acquire", "x"],  # click: Missing option '--owner'
        ["lease", "acquire", "x", "--owner", "a", "--ttl", "soon"],
        ["lease", "heartbeat", "x", "--owner", "a", "--token", "many"],
        ["wait"],
        ["wait", "a", "--timeout", "-1"],
        ["up", "-ff.toml"],
        ["up", "stray"],
        ["--", "status"],
        ["status", "-"],
        ["--json=1", "status"],
        ["--timeout", "0", "ping"],
        ["status", "--json=1"],
        ["lease", "list"],
        ["claims", "acquire", "--kind", "file", "--key", "k"],
        ["status", NOT_UTF8],
        ["runs", "show"],
        ["runs", "show", "a", "b"],
        ["runs", "list"],
        ["tasks"],
        ["tasks", "list", "--run"],
        ["tasks", "list", "--state", "queued"],
        ["tasks", "list", "stray"],
    ],
)
def test_what_the_fast_path_does_not_take_is_left_to_click(argv: list[str]) -> None:
    assert _fast.parse(argv) is None


def test_the_fast_paths_global_timeout_has_clicks_range() -> None:
    assert (LEAST_TIMEOUT, MOST_TIMEOUT) == (0.001, MAX_TIMEOUT)


def test_error_codes_map_to_the_outcomes_of_protocol_errors() -> None:
    assert {code: cls.outcome.value for code, cls in ERRORS_BY_CODE.items()} == ERROR_OUTCOMES


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_strings_are_escaped_as_msgspec_escapes_them(text: str) -> None:
    assert quote(text) == msgspec.json.encode(text).decode()


# -- twin daemons: the same history, one per path -------------------------------------------


@pytest.fixture
def twins(tempdir: str) -> Iterator[tuple[Fleetd, Fleetd]]:
    """Two fleetds in directories of the same length (tempdir/a, tempdir/b)."""
    roots = [os.path.join(tempdir, side) for side in "ab"]
    for root in roots:
        os.mkdir(root)
    with running_fleetd(roots[0]) as a, running_fleetd(roots[1]) as b:
        try:
            yield a, b
        finally:
            kill_holders(a)
            kill_holders(b)


def on_twins(
    twins: tuple[Fleetd, Fleetd],
    setup: Callable[[SyncClient], object],
    argv: list[str],
    stdin: bytes = b"",
    *,
    pids: bool = False,
) -> tuple[Result, Result]:
    """`setup` on both daemons, then `argv`: through the fast path on one, click on the
    other; both results masked (see `masked`)."""
    for daemon in twins:
        with SyncClient(daemon.socket_path) as client:
            setup(client)
    fast, slow = fleetctl_both(argv, twins[0].env, twins[1].env, stdin)
    roots = [daemon.root for daemon in twins]
    return masked(fast, *roots, pids=pids), masked(slow, *roots, pids=pids)


def nothing(client: SyncClient) -> None:
    pass


def lease_of(owner: str, *, released: bool = False) -> Callable[[SyncClient], object]:
    def setup(client: SyncClient) -> None:
        client.lease_acquire("build", owner, 30.0)
        if released:
            client.lease_release("build", owner)

    return setup


LEASE_CASES = [
    ("acquired", nothing, ["acquire", "build", "--owner", "a", "--ttl", "30s"], 0),
    ("already_acquired", lease_of("a"), ["acquire", "build", "--owner", "a"], 0),
    ("contested", lease_of("b"), ["acquire", "build", "--owner", "a"], 12),
    ("bad name", nothing, ["acquire", "bad name", "--owner", "a"], 1),
    ("ttl out of range", nothing, ["acquire", "build", "--owner", "a", "--ttl", "0"], 1),
    ("bound to init", nothing, ["acquire", "build", "--owner", "a", "--pid", "1"], 1),
    ("renewed", lease_of("a"), ["heartbeat", "build", "--owner", "a"], 0),
    ("heartbeat not_owned", lease_of("b"), ["heartbeat", "build", "--owner", "a"], 10),
    ("another token", lease_of("a"), ["heartbeat", "build", "--owner", "a", "--token", "99"], 10),
    ("released", lease_of("a"), ["release", "build", "--owner", "a"], 0),
    ("already_released", lease_of("a", released=True), ["release", "build", "--owner", "a"], 0),
    ("release not_owned", lease_of("b"), ["release", "build", "--owner", "a"], 10),
    ("release absent", nothing, ["release", "build", "--owner", "a"], 11),
    ("inspect ok", lease_of("a"), ["inspect", "build"], 0),
    ("inspect absent", nothing, ["inspect", "build"], 11),
]


@pytest.mark.parametrize(
    ("setup", "args", "code"), [pytest.param(*case[1:], id=case[0]) for case in LEASE_CASES]
)
def test_a_lease_command_prints_and_exits_as_click_does(
    twins: tuple[Fleetd, Fleetd],
    setup: Callable[[SyncClient], object],
    args: list[str],
    code: int,
) -> None:
    fast, slow = on_twins(twins, setup, ["lease", *args])
    assert fast == slow
    assert fast[0] == code


def claim_of(
    owner: str, content: bytes = b"do X\n", *, released: bool = False
) -> Callable[[SyncClient], object]:
    def setup(client: SyncClient) -> None:
        client.claim_acquire("prompt_inbox", "task-1", owner, content)
        if released:
            client.claim_release("prompt_inbox", "task-1", owner)

    return setup


def claim(verb: str, *options: str) -> list[str]:
    return ["claims", verb, "--kind", "prompt_inbox", "--key", "task-1", *options]


CLAIM_CASES = [
    ("acquired", nothing, claim("acquire", "--owner", "a"), b"do X\n", 0),
    ("already_acquired", claim_of("a"), claim("acquire", "--owner", "a"), b"do X\n", 0),
    ("contested", claim_of("b"), claim("acquire", "--owner", "a"), b"do X\n", 12),
    ("other content", claim_of("a"), claim("acquire", "--owner", "a"), b"do Y\n", 12),
    ("empty stdin", nothing, claim("acquire", "--owner", "a"), b"", 1),
    ("binary", nothing, claim("acquire", "--owner", "a"), b"\0\xff", 1),
    ("over the cap", nothing, claim("acquire", "--owner", "a"), b"x" * (MAX_CLAIM_CONTENT + 1), 1),
    (
        "unknown kind",
        nothing,
        ["claims", "acquire", "--kind", "mail", "--key", "k", "--owner", "a"],
        b"x",
        1,
    ),
    (
        "fleetd's kind",
        nothing,
        ["claims", "acquire", "--kind", "lease", "--key", "k", "--owner", "a"],
        b"x",
        1,
    ),
    (
        "key with a slash",
        nothing,
        ["claims", "acquire", "--kind", "file", "--key", "a/b", "--owner", "a"],
        b"x",
        1,
    ),
    ("released", claim_of("a"), claim("release", "--owner", "a"), b"", 0),
    ("already_released", claim_of("a", released=True), claim("release", "--owner", "a"), b"", 0),
    ("release not_owned", claim_of("b"), claim("release", "--owner", "a"), b"", 10),
    ("release absent", nothing, claim("release", "--owner", "a"), b"", 11),
    ("inspect ok", claim_of("a"), claim("inspect"), b"", 0),
    ("inspect absent", nothing, claim("inspect"), b"", 11),
    (
        "inspect a lease",
        lease_of("a"),
        ["claims", "inspect", "--kind", "lease", "--key", "build"],
        b"",
        0,
    ),
]


@pytest.mark.parametrize(
    ("setup", "argv", "stdin", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CLAIM_CASES],
)
def test_a_claims_command_prints_and_exits_as_click_does(
    twins: tuple[Fleetd, Fleetd],
    setup: Callable[[SyncClient], object],
    argv: list[str],
    stdin: bytes,
    code: int,
) -> None:
    fast, slow = on_twins(twins, setup, argv, stdin)
    assert fast == slow
    assert fast[0] == code


# -- members: one daemon for what only reads, twins for `up` -------------------------------------

SLEEPER = 'command = ["sleep", "60"]'
DEFINITION = f'name = "pair"\n[members.a]\n{SLEEPER}\n[members.b]\n{SLEEPER}\n'
NEVER_READY = 'name = "sad"\n[members.bad]\ncommand = ["sh", "-c", "exit 3"]\nready = "log:never"\n'
"""Fails before it is ever ready: waiting for it fails, whenever the wait starts."""
SLOW = (
    'name = "slow"\n[members.never]\ncommand = ["sleep", "60"]\nready = "log:never"\n'
    'start_timeout = "5m"\n'
)


def write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def clusters(holders: Fleetd) -> Iterator[Fleetd]:
    """fleetd with a running cluster (pair: a, b), one whose member failed (sad: bad) and
    one whose member never gets ready (slow: never)."""
    with SyncClient(holders.socket_path) as client:
        for text in (DEFINITION, NEVER_READY, SLOW):
            client.cluster_up_toml(text)
        client.member_wait(["a", "b"], 20)
        with pytest.raises(MemberFailed):
            client.member_wait(["bad"], 20)
    yield holders


MEMBER_CASES = [
    ("every member", ["status"], 0),
    ("named members", ["status", "a", "pair/b"], 0),
    ("an absent member", ["status", "a", "nobody"], 11),
    ("wait for running members", ["wait", "a", "b"], 0),
    ("wait for an absent member", ["wait", "nobody"], 11),
    ("wait for a failed member", ["wait", "bad", "--timeout", "20s"], 1),
    ("wait in vain", ["wait", "never", "--timeout", "300ms"], 13),
]


@pytest.mark.parametrize("json_mode", [False, True], ids=["table", "json"])
@pytest.mark.parametrize(
    ("argv", "code"), [pytest.param(*case[1:], id=case[0]) for case in MEMBER_CASES]
)
def test_status_and_wait_print_and_exit_as_click_does(
    clusters: Fleetd, argv: list[str], code: int, json_mode: bool
) -> None:
    argv = ["--json", *argv] if json_mode else argv
    fast, slow = fleetctl_both(argv, clusters.env, clusters.env)
    if not json_mode:  # a second may pass between the two: the UPTIME column moves on
        fast, slow = masked(fast), masked(slow)
    assert fast == slow
    assert fast[0] == code


class Up(NamedTuple):
    """`up -f fleet.toml OPTIONS` of `text`, with the same cluster already up or not."""

    already_up: bool
    text: str
    options: list[str]
    code: int


UP_CASES = [
    ("up and wait", False, DEFINITION, ["--wait"], 0),
    ("up with another name", False, DEFINITION, ["--name", "other", "--wait"], 0),
    ("up without waiting", False, SLOW, [], 0),
    ("already up", True, DEFINITION, ["--idempotent"], 0),
    ("contested", True, DEFINITION, [], 12),
    ("a bad definition", False, '[members.a]\ncommand = ["true"]\ncolour = "red"\n', [], 1),
    ("not TOML", False, "[members.a\n", [], 1),
    ("a member that fails", False, NEVER_READY, ["--wait", "--timeout", "20s"], 1),
]


@pytest.mark.parametrize("json_mode", [False, True], ids=["table", "json"])
@pytest.mark.parametrize("up", [pytest.param(Up(*case[1:]), id=case[0]) for case in UP_CASES])
def test_up_prints_and_exits_as_click_does(
    twins: tuple[Fleetd, Fleetd], up: Up, json_mode: bool
) -> None:
    for daemon in twins:
        write(daemon.root, "fleet.toml", up.text)
        if up.already_up:
            with SyncClient(daemon.socket_path) as client:
                client.cluster_up_toml(up.text, directory=daemon.root)
                client.member_wait(["pair/a", "pair/b"], 20)
    argv = ["--json"] if json_mode else []
    fast, slow = in_directories(twins, [*argv, "up", "-f", "fleet.toml", *up.options])
    assert fast == slow
    assert fast[0] == up.code


def in_directories(twins: tuple[Fleetd, Fleetd], argv: list[str]) -> tuple[Result, Result]:
    """`argv` run in each daemon's directory (a relative -f reads that daemon's file), through
    the fast path on the first, click on the second; masked as twin holders' are."""
    assert _fast.parse(argv) is not None
    results = []
    for program, daemon in ((FLEETCTL, twins[0]), (CLICK, twins[1])):
        done = subprocess.run(
            [*program, *argv],
            env=daemon.env,
            cwd=daemon.root,
            capture_output=True,
            timeout=60,
            check=False,
        )
        results.append((done.returncode, done.stdout.decode(), done.stderr.decode()))
    roots = [daemon.root for daemon in twins]
    return masked(results[0], *roots, pids=True), masked(results[1], *roots, pids=True)


def test_up_reports_a_file_it_cannot_read_as_click_does(fleetd: Fleetd) -> None:
    missing = os.path.join(fleetd.root, "missing.toml")
    fast, slow = fleetctl_both(["up", "-f", missing], fleetd.env, fleetd.env)
    assert fast == slow
    assert fast == (1, "", f"fleetctl: cannot read {missing}: No such file or directory\n")


# -- no daemon, another protocol, no answer -----------------------------------------------------

EVERY_COMMAND = [
    ["ping"],
    ["version"],
    ["status"],
    ["status", "a"],
    ["wait", "a", "--timeout", "100ms"],
    ["up", "-f", "/nonexistent/fleet.toml", "--wait"],
    ["lease", "acquire", "build", "--owner", "a"],
    ["lease", "heartbeat", "build", "--owner", "a"],
    ["lease", "release", "build", "--owner", "a"],
    ["lease", "inspect", "build"],
    ["claims", "acquire", "--kind", "file", "--key", "k", "--owner", "a"],
    ["claims", "release", "--kind", "file", "--key", "k", "--owner", "a"],
    ["claims", "inspect", "--kind", "file", "--key", "k"],
    ["runs", "show", "run-1"],
    ["tasks", "list"],
    ["tasks", "list", "--run", "run-1"],
]
EVERY_LINE = [
    pytest.param([*head, *argv], id=" ".join([*head, *argv[:2]]))
    for argv in EVERY_COMMAND
    for head in ([], ["--json"])
]


class FakeDaemon:
    """A control socket that answers hello as `hello` says (None: never answers anything),
    each op in `answers` with its result (or what a function of the request returns; encoded
    as fleetd encodes it, and written a few bytes at a time), and leaves every other request
    unanswered."""

    def __init__(
        self, path: str, hello: dict[str, Any] | None, answers: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.hello = hello
        self.answers = answers or {}
        self.seen: list[str] = []
        """The op of every request read, in order."""
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._converse, args=(conn,), daemon=True).start()

    def _converse(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buffer = b""
            while data := conn.recv(65536):
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    request = json.loads(line)
                    self.seen.append(request["op"])
                    if request["op"] == "hello" and self.hello is not None:
                        answer = {"id": request["id"], "ok": True, "result": self.hello}
                        conn.sendall(json.dumps(answer).encode() + b"\n")
                    elif request["op"] in self.answers:
                        result = self.answers[request["op"]]
                        if callable(result):
                            result = result(request)
                        answer = {"id": request["id"], "ok": True, "result": result}
                        self._dribble(conn, msgspec.json.encode(answer) + b"\n")

    def _dribble(self, conn: socket.socket, frame: bytes) -> None:
        """`frame` in pieces, so that it takes the reader many reads."""
        for start in range(0, len(frame), 4096):
            conn.sendall(frame[start : start + 4096])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@contextlib.contextmanager
def fake_daemon(
    tempdir: str, hello: dict[str, Any] | None, answers: dict[str, Any] | None = None
) -> Iterator[dict[str, str]]:
    with faked(tempdir, hello, answers) as daemon:
        yield {**os.environ, "FLEET_SOCKET": daemon.path}


@contextlib.contextmanager
def faked(
    tempdir: str, hello: dict[str, Any] | None, answers: dict[str, Any] | None = None
) -> Iterator[FakeDaemon]:
    daemon = FakeDaemon(os.path.join(tempdir, "fake.sock"), hello, answers)
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.mark.parametrize("argv", EVERY_LINE)
def test_no_daemon_is_reported_as_click_does(tempdir: str, argv: list[str]) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "none.sock")}
    fast, slow = fleetctl_both(argv, env, env, b"x")
    assert fast == slow
    assert fast[0] == 14


@pytest.mark.parametrize("argv", EVERY_LINE)
def test_a_daemon_of_another_protocol_is_refused_as_click_does(
    tempdir: str, argv: list[str]
) -> None:
    newer = {"version": PROTOCOL_VERSION + 1, "server": "9.9", "pid": 1}
    with fake_daemon(tempdir, newer) as env:
        fast, slow = fleetctl_both(argv, env, env, b"x")
    assert fast == slow
    assert fast[0] == 15


@pytest.mark.parametrize("argv", EVERY_LINE)
def test_a_daemon_that_does_not_answer_is_a_timeout_as_with_click(
    tempdir: str, argv: list[str]
) -> None:
    with fake_daemon(tempdir, None) as env:
        fast, slow = fleetctl_both(["--timeout", "200ms", *argv], env, env, b"x")
    assert fast == slow
    assert fast[0] == 13


@pytest.mark.parametrize(
    "argv",
    [
        ["wait", "a", "--timeout", "100ms"],
        ["lease", "acquire", "build", "--owner", "a"],
        ["--json", "claims", "acquire", "--kind", "file", "--key", "k", "--owner", "a"],
    ],
)
def test_a_request_left_unanswered_after_the_hello_is_a_timeout_as_with_click(
    tempdir: str, argv: list[str]
) -> None:
    hello = {"version": PROTOCOL_VERSION, "server": "0.1.0", "pid": 1}
    with fake_daemon(tempdir, hello) as env:
        fast, slow = fleetctl_both(["--timeout", "200ms", *argv], env, env, b"x")
    assert fast == slow
    assert fast[0] == 13
    assert "no answer from fleetd within" in fast[1] + fast[2]


@pytest.mark.parametrize("json_mode", [False, True], ids=["table", "json"])
def test_an_answer_of_thousands_of_members_over_many_reads_prints_as_with_click(
    tempdir: str, json_mode: bool
) -> None:
    members = [
        {"name": f"m{i}", "state": "running", "pid": 1000 + i, "running": True, "cluster": "big"}
        for i in range(3000)
    ]
    members[7] = {"name": 'é"\\\u2028', "state": "error", "error": "exited 3\nagain"}
    hello = {"version": PROTOCOL_VERSION, "server": "0.1.0", "pid": 1}
    argv = ["--json", "status"] if json_mode else ["status"]
    with fake_daemon(tempdir, hello, {"member_status": {"members": members}}) as env:
        fast, slow = fleetctl_both(argv, env, env)
    assert fast == slow
    assert fast[0] == 0
    if json_mode:
        assert json.loads(fast[1]) == {"outcome": "ok", "members": members}
    else:
        assert fast[1].split("\n")[-2].startswith("big/m2999 ")


def test_ctrl_c_while_waiting_is_reported_as_click_reports_it(tempdir: str) -> None:
    argv = ["wait", "a"]
    assert _fast.parse(argv) is not None
    results = []
    with faked(tempdir, {"version": PROTOCOL_VERSION, "server": "0.1.0", "pid": 1}) as daemon:
        env = {**os.environ, "FLEET_SOCKET": daemon.path}
        for program in (FLEETCTL, CLICK):
            process = subprocess.Popen(
                [*program, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            asked = len(daemon.seen) + 2  # the hello, then member_wait, left unanswered
            deadline = time.monotonic() + 30
            while len(daemon.seen) < asked and time.monotonic() < deadline:
                time.sleep(0.01)
            process.send_signal(signal.SIGINT)
            out, err = process.communicate(timeout=30)
            results.append((process.returncode, out, err))
    assert results[0] == results[1] == (1, b"", b"\nfleetctl: aborted\n")


# -- runs and tasks ---------------------------------------------------------------------------


def test_the_fast_paths_task_states_and_results_are_the_protocols() -> None:
    assert set(TASK_STATES) == fast_tasks.TASK_STATES
    assert set(get_args(TaskResult)) == fast_tasks.TASK_RESULTS


CELLS = st.text(max_size=8) | st.sampled_from(["-", "", " ", "a ", "é", "\u3000", "x\x1c"])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            CELLS, CELLS, CELLS, CELLS, CELLS, st.sampled_from(["-", "pass", "timeout"]), CELLS
        ),
        max_size=6,
    )
)
def test_the_tasks_table_is_the_row_by_row_table(rows: list[tuple[str, ...]]) -> None:
    columns = [list(column) for column in zip(*rows, strict=True)] or [[] for _ in range(7)]
    assert tasks_table(columns) == _table(TASK_COLUMNS, rows)


TEXTS = st.text(max_size=12) | st.sampled_from(["", "w1", 'a"b', "x}y{", "é\\n", "t\u2028"])
VIEWS = st.builds(
    TaskView,
    entry=st.builds(
        InboxEntry,
        run_id=st.sampled_from(["run-1", "run-22"]),
        task_id=TEXTS,
        priority=st.integers(-3, 3),
        enqueued_at=st.just("2026-12-03T23:41:05.350165Z"),
        attempts=st.integers(0, 12),
        worker_id=st.none() | TEXTS,
        not_before=st.none() | TEXTS,
    ),
    state=st.sampled_from(TASK_STATES),
    name=TEXTS,
    worker_id=TEXTS,
    attempt_id=TEXTS,
    not_before=TEXTS,
    result=st.none() | st.sampled_from(get_args(TaskResult)),
    error=TEXTS,
)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(VIEWS, max_size=5), min_size=1, max_size=3))
def test_pages_read_without_decoding_them_make_the_views_cells(
    pages: list[list[TaskView]],
) -> None:
    """Whatever the tasks hold (escapes, braces, tasks never run or run): the columns read
    from each page's text (what --json checks) are the cells of the decoded tasks."""
    read = [
        fast_tasks.page(msgspec.json.encode(TaskList(tasks=tasks, next="t")).decode())
        for tasks in pages
    ]
    everything = [view for tasks in pages for view in tasks]
    table: list[list[str]] = [[] for _ in range(7)]
    for each in read:
        for column, cells in zip(table, fast_tasks.columns(each), strict=True):
            column.extend(cells)
    assert table == cells_of_views(everything)
    assert ",".join(each.text for each in read if each.text) == ",".join(
        msgspec.json.encode(view).decode() for view in everything
    )


CELL_TEXTS = st.text(max_size=10) | st.sampled_from(["", '"', "\\", '","', '"],["', "[]", "]"])


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 4), st.data(), st.sampled_from(["", "t9", "run-1/t9"]))
def test_a_page_of_cells_is_read_as_fleetd_wrote_it(
    count: int, data: st.DataObject, cursor: str
) -> None:
    """Quotes, backslashes, brackets and the separators themselves in any cell: the columns
    read, quickly or by decoding, are those fleetd encoded."""
    cells = [data.draw(st.lists(CELL_TEXTS, min_size=count, max_size=count)) for _ in range(7)]
    text = msgspec.json.encode(EncodedTaskList(cells=cells, next=cursor)).decode()
    found = fast_tasks.cells_page(text)
    assert (found.cells, found.next) == (cells, cursor)


@pytest.mark.parametrize(
    "text",
    [
        '{"cells":[["a"],["b"]]}',
        '{"cells":[["a"],["b"],["c"],["d"],["e"],["f"],["g","h"]]}',
        '{"cells":[["a"],["b"],["c"],["d"],["e"],["f"],[1]]}',
        '{"cells":"x"}',
        '{"table":5}',
        '{"table":""}',
        '{"table":"RUN\\n',
    ],
)
def test_a_page_of_cells_that_is_not_seven_equal_columns_nor_a_table_is_malformed(
    text: str,
) -> None:
    with pytest.raises(Failure):
        fast_tasks.cells_page(text)


@pytest.fixture
def runs(holders: Fleetd) -> Iterator[tuple[Fleetd, dict[str, str]]]:
    """fleetd with runs in each state a listing shows: one ended (a task passed, one failed),
    one whose task waits for its retry, and two queued while dispatch is drained (one whose
    task name holds quotes and braces, which fleetd escapes or the fast path reads apart)."""
    daemon = holders
    ended = submit(
        daemon,
        [task("ok"), task("bad", {"exit": 3}, retry_policy={"max_attempts": 1})],
        [worker()],
    )
    waiting = submit(
        daemon,
        [task("again", {"exit": 3}, retry_policy={"initial_backoff_seconds": 300})],
        [worker("w2")],
    )
    wait_run(daemon, ended)
    deadline = time.monotonic() + 20
    while (view := views(daemon, waiting)[0]).entry.attempts != 1 or view.state != "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    queued = submit(daemon, [task(f"t{n}") for n in range(30)], [worker(slots=3)])
    odd = submit(daemon, [{**task("t1"), "name": 'say "hi" {now} é'}], [worker()])
    yield daemon, {"ended": ended, "waiting": waiting, "queued": queued, "odd": odd}


def test_runs_show_prints_and_exits_as_click_does(runs: tuple[Fleetd, dict[str, str]]) -> None:
    daemon, ids = runs
    for run, code in [*((run, 0) for run in ids.values()), ("run-999", 11)]:
        for argv in (["runs", "show", run], ["--json", "runs", "show", run]):
            fast, slow = fleetctl_both(argv, daemon.env, daemon.env)
            assert fast == slow, argv
            assert fast[0] == code, (argv, fast)
    shown = fleetctl_both(["runs", "show", ids["ended"]], daemon.env, daemon.env)[0][1]
    assert ", ended " in shown and "tasks: done=1 failed=1" in shown


def test_tasks_list_prints_and_exits_as_click_does(runs: tuple[Fleetd, dict[str, str]]) -> None:
    daemon, ids = runs
    for run, code in [("", 0), *((run, 0) for run in ids.values()), ("run-999", 11)]:
        for argv in (["tasks", "list", "--run", run], ["tasks", "list", f"--run={run}", "--json"]):
            fast, slow = fleetctl_both(argv, daemon.env, daemon.env)
            assert fast == slow, argv
            assert fast[0] == code, (argv, fast)
    listed = fleetctl_both(
        ["--json", "tasks", "list", "--run", ids["waiting"]], daemon.env, daemon.env
    )
    assert '"not_before":' in listed[0][1]


@pytest.mark.parametrize(
    ("json_mode", "made_table"),
    [(False, False), (False, True), (True, False)],
    ids=["cells", "table", "json"],
)
def test_pages_of_thousands_of_tasks_print_as_with_click(
    tempdir: str, json_mode: bool, made_table: bool
) -> None:
    """Pages of tasks of every kind (never run, run, failed, waiting; names and errors with
    escapes and braces), each over many reads, then the next page; or, where fleetd makes
    it, the table in one answer."""
    tasks = [
        TaskView(
            entry=InboxEntry(
                run_id="run-7", task_id=f"t{n}", priority=0, enqueued_at="2026-01-01T00:00:00Z"
            ),
            state="queued",
            name=f"task {n}",
        )
        for n in range(8000)
    ]
    for n in range(0, 8000, 7):
        tasks[n] = msgspec.structs.replace(
            tasks[n],
            state="done",
            entry=msgspec.structs.replace(tasks[n].entry, attempts=n % 3 + 1),
            worker_id="w1",
            result="pass",
        )
    tasks[100] = msgspec.structs.replace(tasks[100], state="failed", error="exited 3")
    tasks[5001] = msgspec.structs.replace(tasks[5001], error='exited 3\n"again" {x}')
    tasks[5002] = msgspec.structs.replace(tasks[5002], not_before="2026-01-01T00:05:00Z")
    pages = {"": (tasks[:5000], "t4999"), "t4999": (tasks[5000:], "")}

    def page_after(request: dict[str, Any]) -> Any:
        assert request["limit"] == 5000
        first = not request.get("after")
        assert request.get("table", False) is (request.get("cells", False) and first)
        listed, after = pages[request.get("after", "")]
        if request.get("table") and made_table:
            return msgspec.to_builtins(TaskList(table=tasks_table(cells_of_views(tasks))))
        if request.get("cells"):
            return msgspec.to_builtins(TaskList(cells=cells_of_views(listed), next=after))
        return msgspec.to_builtins(TaskList(tasks=listed, next=after))

    hello = {"version": PROTOCOL_VERSION, "server": "0.1.0", "pid": 1}
    argv = ["--json", "tasks", "list"] if json_mode else ["tasks", "list"]
    with fake_daemon(tempdir, hello, {"task_list": page_after}) as env:
        fast, slow = fleetctl_both(argv, env, env)
    assert fast == slow
    assert fast[0] == 0
    if json_mode:
        assert json.loads(fast[1]) == {"outcome": "ok", "tasks": msgspec.to_builtins(tasks)}
    else:
        assert fast[1].count("\nrun-7 ") == 8000
