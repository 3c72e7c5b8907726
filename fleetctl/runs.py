"""fleetctl's task-run commands: runs, tasks, events, receipts and drain (protocol.runs).

Registered on fleetctl.cli's group when it loads this module (at its end)."""

import json
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click
import msgspec

from fleetctl.cli import MAX_TIMEOUT, Duration, Globals, _client_call, cli
from fleetctl.output import emit, printable
from protocol import MAX_FRAME, MAX_TASK_PAGE
from protocol.outcomes import Outcome
from protocol.tables import TASK_COLUMNS, tasks_table

MAX_RUN_FILE = MAX_FRAME - 4096
"""Bytes of a run file at most: it travels in one frame, with the request around it."""
FOLLOW_WAIT = 30.0
"""Seconds one long poll of `events --follow` waits for a new event."""


def _to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)


# -- runs -----------------------------------------------------------------------------------


@cli.group("runs")
def runs_group() -> None:
    """Task runs: a run file's tasks dispatched to its workers (see README "Task runs")."""


@runs_group.command("submit")
@click.argument("path", type=click.Path(dir_okay=False))
@click.pass_obj
def runs_submit(g: Globals, path: str) -> None:
    """Queue a run file's tasks (TOML, or JSON by its .json suffix) for its workers.

    Outcomes: acquired (0); invalid_request (1) for a bad file, unsupported (1) for a
    worker on a host fleetd cannot run."""
    from protocol.runs import RunSubmit

    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.UsageError(f"cannot read {printable(path)}: {exc}") from None
    if len(text.encode()) > MAX_RUN_FILE:
        raise click.UsageError(
            f"{printable(path)} is {len(text.encode()):,} bytes; fleetd takes run files of "
            "up to 1 MiB: split the run, or move long instructions into files its workers read"
        )
    fmt = "json" if path.endswith(".json") else "toml"
    directory = os.path.dirname(os.path.abspath(path))

    def call(client: Any) -> int:
        result = client.request(
            RunSubmit, text=text, format=fmt, source=printable(path), directory=directory
        )
        run = result.run
        queued = sum(run.tasks.values())
        return emit(
            g.json,
            f"{run.id} submitted: {queued} task{'s' if queued != 1 else ''} queued",
            result.outcome,
            run=_to_builtins(run),
        )

    _client_call(g, call)


@runs_group.command("list")
@click.pass_obj
def runs_list(g: Globals) -> None:
    """List runs, newest first, with their tasks counted by state."""
    from protocol.runs import RunListRequest

    def call(client: Any) -> int:
        result = client.request(RunListRequest)
        rows = [(r.id, r.status, _counts(r.tasks), r.created_at, r.name) for r in result.runs]
        human = _table(("RUN", "STATUS", "TASKS", "CREATED", "NAME"), rows)
        if result.draining:
            human += "\n(dispatch is drained: `fleetctl drain --resume` starts it again)"
        return emit(g.json, human, runs=_to_builtins(result.runs), draining=result.draining)

    _client_call(g, call)


@runs_group.command("show")
@click.argument("run")
@click.pass_obj
def runs_show(g: Globals, run: str) -> None:
    """Show a run: its status, workers and tasks counted by state (`tasks list --run RUN`
    lists them).

    Outcomes: ok (0), absent (11)."""
    from protocol.runs import RunShow

    def call(client: Any) -> int:
        detail = client.request(RunShow, run=run)
        summary = detail.summary
        workers = ", ".join(
            f"{w.id} x{w.max_concurrent_tasks or 1}" for w in detail.run.worker_specs
        )
        human = (
            f"{summary.id} {summary.name!r}: {summary.status}, created {summary.created_at}"
            + (f", ended {summary.completed_at}" if summary.completed_at else "")
            + f"\nworkers: {workers}\ntasks: {_counts(summary.tasks)}"
        )
        return emit(g.json, human, run=_to_builtins(detail.run), summary=_to_builtins(summary))

    _client_call(g, call)


@runs_group.command("cancel")
@click.argument("run")
@click.pass_obj
def runs_cancel(g: Globals, run: str) -> None:
    """Cancel a run: its queued tasks are cancelled, its running workers stopped.

    Outcomes: released (0), already_released (0), absent (11)."""
    from protocol.runs import RunCancel

    def call(client: Any) -> int:
        result = client.request(RunCancel, run=run)
        said = "cancelled" if result.outcome is Outcome.RELEASED else "had ended already"
        return emit(g.json, f"{run} {said}", result.outcome, run=_to_builtins(result.run))

    _client_call(g, call)


# -- tasks ----------------------------------------------------------------------------------


@cli.group("tasks")
def tasks_group() -> None:
    """The tasks of runs."""


@tasks_group.command("list")
@click.option("--run", default="", help="Only this run's tasks.")
@click.pass_obj
def tasks_list(g: Globals, run: str) -> None:
    """List tasks with their state, attempts and worker."""

    def call(client: Any) -> int:
        if g.json:
            tasks = [task for page in _pages(client, run, cells=False) for task in page.tasks]
            return emit(True, "", tasks=_to_builtins(tasks))
        columns: list[list[str]] = [[] for _ in TASK_COLUMNS]
        for page in _pages(client, run, cells=True):
            if page.table:  # the whole table, made by fleetd
                return emit(False, page.table)
            for column, cells in zip(columns, page.cells or [[]] * len(columns), strict=True):
                column.extend(cells)
        return emit(False, tasks_table(columns))

    _client_call(g, call)


def _pages(client: Any, run: str, *, cells: bool) -> Iterator[Any]:
    """The pages of tasks (as many as fleetd puts in one): their views, or their `cells`,
    the first asking for the whole table (protocol.runs.TaskListRequest's `table`)."""
    from protocol.runs import TaskListRequest

    after = ""
    while True:
        page = client.request(
            TaskListRequest,
            run=run,
            after=after,
            limit=MAX_TASK_PAGE,
            cells=cells,
            table=cells and not after,
        )
        yield page
        if not page.next:
            return
        after = page.next


# -- events ---------------------------------------------------------------------------------


@cli.group("events", invoke_without_command=True)
@click.option("--run", default="", help="Only this run's events.")
@click.option("--since", type=int, default=None, help="After this seq (needs --run).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they come.")
@click.pass_context
def events_group(ctx: click.Context, run: str, since: int | None, follow: bool) -> None:
    """Print runs' events in order, one JSON object per line (`events emit` reports one).

    Each run numbers its events from 1 without gaps (seq); `--since SEQ` resumes after one."""
    if ctx.invoked_subcommand is not None:
        return
    g: Globals = ctx.obj
    if since is not None and not run:
        raise click.UsageError("--since needs --run: each run numbers its own events")
    if since is not None and since < 0:
        raise click.UsageError("--since takes a seq of 0 or more")
    after = {run: since} if since is not None else {}
    _client_call(g, lambda client: _print_events(client, run, after, follow))


def _print_events(client: Any, run: str, after: dict[str, int], follow: bool) -> int:
    from fleetctl import _stdout

    for raw in _events(client, run, after, follow):
        if not _stdout.write(raw):
            return Outcome.ERROR.exit_code
    return Outcome.OK.exit_code


def _events(client: Any, run: str, after: dict[str, int], follow: bool) -> Iterator[str]:
    from protocol.runs import EventList

    cursor = dict(after)
    while True:
        page = client.request(
            EventList,
            run=run,
            after=cursor,
            wait=FOLLOW_WAIT if follow else 0.0,
            timeout=FOLLOW_WAIT + 10.0,
        )
        for raw in page.events:
            text = bytes(raw).decode()
            event = json.loads(text)
            cursor[event["run_id"]] = event["seq"]
            yield text
        read_all = all(cursor.get(run_id, 0) >= head for run_id, head in page.heads.items())
        if not follow and (read_all or not page.events):
            return


@events_group.command("emit")
@click.option("--attempt-id", required=True, help="The attempt id the worker was given.")
@click.argument("state")
@click.argument("fields", nargs=-1)
@click.pass_obj
def events_emit(g: Globals, attempt_id: str, state: str, fields: tuple[str, ...]) -> None:
    """Report an event of a worker's attempt: STATE (heartbeat, running, model_wait,
    running_tool, artifact, completed, failed, interrupted) and its FIELD=VALUE pairs
    (numbers and true/false are read as such).

    Outcomes: ok (0); already_acquired (0): that result was reported already; not_owned
    (10): the attempt is no longer the task's own (it was requeued, or ended)."""
    from protocol.runs import EventEmit

    event: dict[str, object] = {"state": state}
    for pair in fields:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.UsageError(f"{printable(pair)!r}: give FIELD=VALUE")
        event[key] = _field_value(value)

    def call(client: Any) -> int:
        result = client.request(EventEmit, attempt_id=attempt_id, event=event)
        human = f"seq {result.seq}" if result.seq else result.message
        return emit(g.json, human, result.outcome, seq=result.seq, message=result.message)

    _client_call(g, call)


def _field_value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- receipts -------------------------------------------------------------------------------


@cli.group("receipts", invoke_without_command=True)
@click.option("--run", default="", help="Only this run's receipts.")
@click.pass_context
def receipts_group(ctx: click.Context, run: str) -> None:
    """List receipts: each finished task's verdict (pass, fail, skip, timeout) and score."""
    if ctx.invoked_subcommand is not None:
        return
    g: Globals = ctx.obj
    from protocol.runs import ReceiptListRequest

    def call(client: Any) -> int:
        result = client.request(ReceiptListRequest, run=run)
        rows = [
            (
                r.run_id,
                r.task_id,
                "pending" if r.pending else r.result,
                r.worker_id,
                str(r.attempts),
                (r.score.notes or "") if r.score else "",
            )
            for r in result.receipts
        ]
        human = _table(("RUN", "TASK", "RESULT", "WORKER", "ATTEMPTS", "NOTES"), rows)
        return emit(g.json, human, receipts=_to_builtins(result.receipts))

    _client_call(g, call)


@receipts_group.command("score")
@click.argument("task")
@click.option("--pass", "verdict", flag_value="pass", help="The task passed.")
@click.option("--fail", "verdict", flag_value="fail", help="The task failed.")
@click.option("--notes", default="", help="Why.")
@click.pass_obj
def receipts_score(g: Globals, task: str, verdict: str | None, notes: str) -> None:
    """Score a task whose scorer is manual (TASK, or RUN/TASK).

    Outcomes: ok (0), already_acquired (0): scored so already, absent (11)."""
    from protocol.runs import ReceiptScore

    if verdict is None:
        raise click.UsageError("give --pass or --fail")

    def call(client: Any) -> int:
        result = client.request(ReceiptScore, task=task, result=verdict, notes=notes)
        receipt = result.receipt
        return emit(
            g.json,
            f"{receipt.run_id}/{receipt.task_id}: {receipt.result}",
            result.outcome,
            receipt=_to_builtins(receipt),
        )

    _client_call(g, call)


# -- drain ----------------------------------------------------------------------------------


@cli.command("drain")
@click.option(
    "--wait",
    "wait_for",
    type=Duration(0.0, MAX_TIMEOUT),
    default="1h",
    show_default=True,
    help="How long to wait for the tasks in flight.",
)
@click.option("--resume", is_flag=True, help="Dispatch again.")
@click.pass_obj
def drain(g: Globals, wait_for: float, resume: bool) -> None:
    """Stop dispatching new tasks and wait until those in flight ended.

    Outcomes: ok (0); timeout (13) when tasks are still in flight after --wait."""
    from protocol.runs import Drain

    def call(client: Any) -> int:
        started = time.monotonic()
        result = client.request(
            Drain, wait=0.0 if resume else wait_for, resume=resume, timeout=wait_for + 10.0
        )
        if resume:
            return emit(g.json, "dispatching", draining=False, in_flight=result.in_flight)
        if result.in_flight:
            return emit(
                g.json,
                f"drained, {result.in_flight} task(s) still in flight after "
                f"{time.monotonic() - started:.0f}s",
                Outcome.TIMEOUT,
                draining=True,
                in_flight=result.in_flight,
            )
        return emit(g.json, "drained: nothing in flight", draining=True, in_flight=0)

    _client_call(g, call)


# -- tables ---------------------------------------------------------------------------------


def _counts(tasks: dict[str, int]) -> str:
    return " ".join(f"{state}={n}" for state, n in sorted(tasks.items())) or "-"


def _table(header: tuple[str, ...], rows: Sequence[tuple[Any, ...]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join(lines)
