"""Each fast command, doing and printing what its click command does (fleetctl/cli.py):
the same requests in the same order, with the same timeouts, the same envelope or lines, the
same messages and exit codes, success and failure alike (tests/test_fast.py runs both).
"""

from __future__ import annotations

import os
import sys
import time
from binascii import b2a_base64

from fleetctl import _stdout
from fleetctl._fast.wire import Connection, Failure, is_int, malformed, quote
from fleetctl.table import status_table
from protocol import MAX_CLAIM_CONTENT, MAX_TASK_PAGE, PROTOCOL_VERSION, RELEASE
from protocol.paths import client_socket_path
from protocol.texts import left_up

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any, NoReturn

    from fleetctl._fast.argv import Command
    from fleetctl._fast.wire import Fields


def run(command: Command) -> int:
    """Do `command` and print what it prints; its exit code."""
    try:
        return _COMMANDS[command.name](command)
    except Failure as failure:
        return _fail(failure, command.json or command.name.startswith(_ALWAYS_JSON))
    except KeyboardInterrupt:  # Ctrl-C, as click reports it (a line closing the ^C echo)
        sys.stderr.write("\nfleetctl: aborted\n")
        return 1


_ALWAYS_JSON = ("lease ", "claims ")
"""Their errors are envelopes, --json or not: they are the scripts' boundary."""


def _connect(command: Command) -> Connection:
    path = command.socket_path or client_socket_path(os.environ, os.path.exists)
    return Connection(path, command.timeout)


# --- ping, version ---------------------------------------------------------------------------


def _ping(command: Command) -> int:
    with _connect(command) as connection:
        hello = connection.hello()
        started = time.perf_counter()  # a round trip of its own, after the hello's
        connection.request('"op":"ping"')
        rtt_us = round((time.perf_counter() - started) * 1e6)
    server, pid = _value(hello, "server", str), _value(hello, "pid", int)
    if command.json:
        return _envelope(
            f'{{"outcome":"ok","daemon":{{"version":{quote(server)},"pid":{pid:d}}},'
            f'"rtt_us":{rtt_us}}}'
        )
    return _print(f"pong from fleetd {server} (pid {pid}) in {rtt_us} µs")


def _version(command: Command) -> int:
    with _connect(command) as connection:
        connection.hello(then='"op":"version"')
        daemon = connection.receive()
    version, protocol = _value(daemon, "version", str), _value(daemon, "protocol", int)
    if command.json:
        return _envelope(
            f'{{"outcome":"ok","client":{{"version":{quote(RELEASE)},'
            f'"protocol":{PROTOCOL_VERSION}}},'
            f'"daemon":{{"version":{quote(version)},"protocol":{protocol:d}}}}}'
        )
    return _print(
        f"fleetctl {RELEASE} (protocol {PROTOCOL_VERSION})\nfleetd {version} (protocol {protocol})"
    )


# --- members: status, wait, up ---------------------------------------------------------------


def _status(command: Command) -> int:
    names = _strings(command.params["names"])
    with _connect(command) as connection:
        connection.hello(then=f'"op":"member_status","names":{names}')
        result = connection.receive()
    return _members(command, result)


def _wait(command: Command) -> int:
    names: tuple[str, ...] = command.params["names"]
    seconds: float = command.params["wait_timeout"]
    with _connect(command) as connection:
        connection.hello(then=_member_wait(names, seconds), timeout=seconds + command.timeout)
        result = connection.receive()
    return _members(command, result)


def _member_wait(names: tuple[str, ...] | list[str], seconds: float) -> str:
    return f'"op":"member_wait","names":{_strings(names)},"wait":{seconds!r}'


def _members(command: Command, result: Fields, outcome: str | None = None, extra: str = "") -> int:
    """As fleetctl.cli._emit_members: the table, or the envelope with the members (and
    `extra` fields); `absent` when one is, unless `outcome` is given."""
    members, text = _value(result, "members", list, []), _text(result, "members", "[]")
    if not all(isinstance(member, dict) for member in members):
        raise malformed()
    if outcome is None:
        outcome = "absent" if any(m.get("state") == "absent" for m in members) else "ok"
    if command.json:
        return _envelope(f'{{"outcome":{quote(outcome)},"members":{text}{extra}}}', outcome)
    return _print(status_table(members), outcome)


def _up(command: Command) -> int:
    params = command.params
    path: str = params["path"]
    name = params["name"]
    with _connect(command) as connection:
        connection.hello()
        text = _read_toml(path)
        result = connection.request(
            f'"op":"cluster_up_toml","text":{quote(text)},"source":{quote(path)},'
            f'"name":{"null" if name is None else quote(name)},'
            f'"idempotent":{_bool(params["idempotent"])},'
            f'"directory":{quote(os.path.dirname(os.path.abspath(path)))}',
            command.timeout + 30,
        )
        outcome, cluster = _value(result, "outcome", str), _value(result, "cluster", str)
        members = result
        if params["wait"]:
            listed = _value(result, "members", list, [])
            names = [f"{cluster}/{member['name']}" for member in listed]
            seconds: float = params["wait_timeout"]
            try:
                members = connection.request(
                    _member_wait(names, seconds), seconds + command.timeout
                )
            except Failure as failure:
                failure.message = left_up(failure.message, cluster)
                raise
    if command.json:
        extra = (
            f',"cluster":{_text(result, "cluster", "")},'
            f'"holder_pid":{_text(result, "holder_pid", "null")},'
            f'"runtime_dir":{_text(result, "runtime_dir", _EMPTY)}'
        )
        return _members(command, members, outcome, extra)
    rows = _value(members, "members", list, [])
    head = f"cluster {cluster} {outcome} (holder pid {_value(result, 'holder_pid', object)})"
    return _print(head + "\n" + status_table(rows), outcome)


def _read_toml(path: str) -> str:
    """As fleetctl.definitions.read_toml, which imports the parser: the same text, the same
    message when the file cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        message = f"cannot read {path}: {exc.strerror or exc}"
        raise Failure("error", "invalid_request", message) from None
    return raw.decode(errors="replace")


# --- leases ----------------------------------------------------------------------------------


def _lease_acquire(command: Command) -> int:
    params = command.params
    pid = params["pid"] if params["pid"] is not None else os.getppid()
    return _lease(
        command,
        f'"op":"lease_acquire","name":{quote(params["name"])},"owner":{quote(params["owner"])},'
        f'"ttl":{params["ttl"]!r},"pid":{pid}',
    )


def _lease_change(op: str) -> Callable[[Command], int]:
    def change(command: Command) -> int:
        params = command.params
        return _lease(
            command,
            f'"op":"{op}","name":{quote(params["name"])},"owner":{quote(params["owner"])},'
            f'"token":{params["token"]}',
        )

    return change


def _lease_inspect(command: Command) -> int:
    return _lease(command, f'"op":"lease_inspect","name":{quote(command.params["name"])}')


def _lease(command: Command, request: str) -> int:
    """As fleetctl.cli._lease_envelope: the outcome, the lease (null when there is none), the
    message if any, and after a takeover the previous holder and what fencing did to it."""
    result = _answer(command, request)
    fields = f'"lease":{_text(result, "lease", "null")}'
    if _value(result, "message", str, ""):
        fields += f',"message":{_text(result, "message", _EMPTY)}'
    if _text(result, "previous", "null") != "null":
        fields += f',"previous":{_text(result, "previous", "null")}'
        fields += f',"fence":{_text(result, "fence", _EMPTY)}'
    return _outcome_envelope(result, fields)


# --- claims ----------------------------------------------------------------------------------


def _claims_acquire(command: Command) -> int:
    content = sys.stdin.buffer.read(MAX_CLAIM_CONTENT + 1)  # before connecting, as click's
    if len(content) > MAX_CLAIM_CONTENT:
        raise Failure(
            "error",
            "invalid_request",
            f"stdin is over the maximum of {MAX_CLAIM_CONTENT} bytes; nothing sent",
        )
    encoded = b2a_base64(content, newline=False).decode()  # bytes as msgspec sends them
    return _claim(command, "claim_acquire", f',"content":"{encoded}"')


def _claims_release(command: Command) -> int:
    return _claim(command, "claim_release")


def _claims_inspect(command: Command) -> int:
    return _claim(command, "claim_inspect")


def _claim(command: Command, op: str, content: str = "") -> int:
    """As fleetctl.cli._claims_envelope: the outcome, the claim (or null), the message if any."""
    params = command.params
    owner = f',"owner":{quote(params["owner"])}' if "owner" in params else ""
    request = (
        f'"op":"{op}","kind":{quote(params["kind"])},"key":{quote(params["key"])}{owner}{content}'
    )
    result = _answer(command, request)
    fields = f'"claim":{_text(result, "claim", "null")}'
    if _value(result, "message", str, ""):
        fields += f',"message":{_text(result, "message", _EMPTY)}'
    return _outcome_envelope(result, fields)


def _answer(command: Command, request: str) -> Fields:
    """The result of `request`. One that may change something (all but inspect) is sent only
    once the versions agree, as the click path sends it: a fleetd of another protocol
    refuses the hello, and might still act on what follows it."""
    with _connect(command) as connection:
        if command.name.endswith(" inspect"):
            connection.hello(then=request)
            return connection.receive()
        connection.hello()
        return connection.request(request)


def _outcome_envelope(result: Fields, fields: str) -> int:
    outcome = _value(result, "outcome", str)
    return _envelope(f'{{"outcome":{_text(result, "outcome", "")},{fields}}}', outcome)


# --- runs, tasks ------------------------------------------------------------------------------


def _runs_show(command: Command) -> int:
    """As fleetctl.runs.runs_show."""
    with _connect(command) as connection:
        connection.hello(then=f'"op":"run_show","run":{quote(command.params["run"])}')
        detail = connection.receive()
    text = _run_text(_value(detail, "run", dict), _value(detail, "summary", dict))
    if command.json:  # what it prints is checked all the same, as click decodes it
        return _envelope(
            f'{{"outcome":"ok","run":{_text(detail, "run", "")},'
            f'"summary":{_text(detail, "summary", "")}}}'
        )
    return _print(text)


def _run_text(run: dict[str, Any], summary: dict[str, Any]) -> str:
    """As fleetctl.runs.runs_show says it, of the result's JSON form."""
    workers = run.get("worker_specs", [])
    tasks = summary.get("tasks", {})
    ended = summary.get("completed_at", "")
    if not (
        all(isinstance(run.get(key), str) for key in ("id", "name", "status", "created_at"))
        and all(isinstance(summary.get(k), str) for k in ("id", "name", "status", "created_at"))
        and isinstance(ended, str)
        and isinstance(workers, list)
        and all(_is_worker(worker) for worker in workers)
        and isinstance(tasks, dict)
        and all(is_int(count) for count in tasks.values())
    ):
        raise malformed()
    slots = ", ".join(f"{w['id']} x{w.get('max_concurrent_tasks') or 1}" for w in workers)
    counts = " ".join(f"{state}={n}" for state, n in sorted(tasks.items())) or "-"
    return (
        f"{summary['id']} {summary['name']!r}: {summary['status']}, "
        f"created {summary['created_at']}"
        + (f", ended {ended}" if ended else "")
        + f"\nworkers: {slots}\ntasks: {counts}"
    )


def _is_worker(worker: object) -> bool:
    if not isinstance(worker, dict) or not isinstance(worker.get("id"), str):
        return False
    slots = worker.get("max_concurrent_tasks")
    return slots is None or is_int(slots)


def _tasks_list(command: Command) -> int:
    """As fleetctl.runs.tasks_list: every page, then the envelope of the tasks' views, or the
    table of the cells fleetd makes of them (fleetctl._fast.tasks reads both)."""
    from fleetctl._fast.tasks import cells_page, columns, page  # compiles in 0.5 ms

    if command.json:
        texts = []
        for each in _task_pages(command, page, cells=False):
            columns(each)  # checked as click decodes it, whatever it prints
            if each.text:
                texts.append(each.text)
        return _envelope(f'{{"outcome":"ok","tasks":[{",".join(texts)}]}}')
    table: list[list[str]] = [[] for _ in range(7)]
    for found in _task_pages(command, cells_page, cells=True):
        if found.table:  # the whole table, made by fleetd
            return _print(found.table)
        for column, more in zip(table, found.cells, strict=True):
            column.extend(more)
    from protocol.tables import tasks_table

    return _print(tasks_table(table))


def _task_pages(command: Command, read: Callable[[str], Any], *, cells: bool) -> Iterator[Any]:
    """The pages of task_list, each `read` from its text. The next page is asked for before
    this one is read: fleetd makes it meanwhile."""
    run = quote(command.params["run"])
    with _connect(command) as connection:
        connection.hello(then=_task_list(run, "", cells))
        while True:
            each = read(connection.receive_text())
            if each.next:
                connection.send(_task_list(run, each.next, cells))
            yield each
            if not each.next:
                return


def _task_list(run: str, after: str, cells: bool) -> str:
    """The request for the page `after`; of cells, the first asks for the whole table."""
    return f'"op":"task_list","run":{run},"after":{quote(after)},"limit":{MAX_TASK_PAGE}' + (
        (',"cells":true,"table":true' if not after else ',"cells":true') if cells else ""
    )


# --- printing --------------------------------------------------------------------------------


def _print(text: str, outcome: str = "ok") -> int:
    """As fleetctl.output.emit without --json: the outcome's code, or 1 when the output could
    not be written (see fleetctl._stdout)."""
    return _exit_code(outcome) if _stdout.write(text) else 1


def _envelope(text: str, outcome: str = "ok") -> int:
    """As fleetctl.output.emit with --json: the envelope, written as bytes."""
    return _exit_code(outcome) if _stdout.write(text.encode()) else 1


def _fail(failure: Failure, json_mode: bool) -> int:
    """As fleetctl.output.fail."""
    message = _stdout.printable(failure.message)
    if json_mode:
        _stdout.write(
            f'{{"outcome":{quote(failure.outcome)},"error":{{"code":{quote(failure.code)},'
            f'"message":{quote(message)}}}}}'.encode()
        )
    else:
        sys.stderr.write(f"fleetctl: {message}\n")
    return _exit_code(failure.outcome)


def _exit_code(outcome: str) -> int:
    if outcome == "ok":
        return 0
    from protocol.outcomes import Outcome

    try:
        return Outcome(outcome).exit_code
    except ValueError:  # an outcome this release does not know: click's decoding refuses it
        return 1


def exit_now(code: int) -> NoReturn:
    """Exit with `code` once stdout and stderr are flushed, skipping the interpreter's
    teardown: a fast command has no atexit handlers and nothing else to flush, and tearing down
    the modules that site imported costs about as much as the command's own work."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# --- encoding --------------------------------------------------------------------------------


def _strings(values: tuple[str, ...] | list[str]) -> str:
    return f"[{','.join(quote(value) for value in values)}]"


def _bool(value: object) -> str:
    return "true" if value else "false"


def _value(result: Fields, key: str, kind: type, default: object = None) -> Any:
    """A field's value, of `kind`; `default` where msgspec omitted it (a default value), and
    a result where it is neither is malformed."""
    value = result.get(key, (default, ""))[0]
    if not isinstance(value, kind):
        raise malformed()
    return value


def _text(result: Fields, key: str, default: str) -> str:
    """A field's JSON text as fleetd wrote it; `default` (the default value's text) where
    msgspec omitted it."""
    return result[key][1] if key in result else default


_EMPTY = '""'
"""The JSON text of an empty string."""


_COMMANDS: dict[str, Callable[[Command], int]] = {
    "ping": _ping,
    "version": _version,
    "status": _status,
    "wait": _wait,
    "up": _up,
    "lease acquire": _lease_acquire,
    "lease heartbeat": _lease_change("lease_heartbeat"),
    "lease release": _lease_change("lease_release"),
    "lease inspect": _lease_inspect,
    "claims acquire": _claims_acquire,
    "claims release": _claims_release,
    "claims inspect": _claims_inspect,
    "runs show": _runs_show,
    "tasks list": _tasks_list,
}
