"""`fleetctl top`: task runs at a glance, kept up to date. Runs with their tasks by state,
worker slots with their current task and last heartbeat, and the latest events.

Composed here from three ops (protocol.runs): run_list; task_list of each run still going (a
worker slot is a member that a task names, its current task the one leased to it or running
on it); event_list, long-polled so that new events show at once.

On a terminal, a rich Live display redrawn in place (rich is imported by this command alone:
every other command starts without it); `q` or Ctrl-C ends it, the terminal as it was.
Elsewhere (a pipe, a file) or with --once, plain lines: the snapshot, then (without --once)
each new event as a line, until killed.

Registered on fleetctl.cli's group when it loads this module (at its end).
"""

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
import msgspec

from fleetctl import _stdout
from fleetctl.cli import Duration, Exit, Globals, _client_call, cli
from fleetctl.output import emit
from fleetctl.runs import FOLLOW_WAIT, _counts, _table
from protocol.errors import Absent, FleetError
from protocol.outcomes import Outcome

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live

    from protocol.runs import RunSummary, TaskView

ENDED = ("completed", "failed", "cancelled")
"""Run statuses after which no worker runs."""
LIVE_STATES = ("leased", "running")
MAX_SLOTS = 5000
"""Tasks with a worker of one run asked for: its busy slots (fleetd runs 64 by default)."""
"""A task in one of these states occupies its worker slot."""
RUNS_SHOWN = 10
"""At most this many runs, those going first, then the newest."""
FRAME = 0.1
"""Seconds: the display is redrawn at most this often, events meanwhile gathered."""
ENVELOPE = ("seq", "run_id", "task_id", "timestamp", "state", "extra")
"""A worker event's fields that have their own column; the others are its detail."""


@dataclass
class View:
    """What the display shows, as last fetched."""

    runs: list["RunSummary"] = field(default_factory=list)
    more_runs: int = 0
    draining: bool = False
    tasks: list["TaskView"] = field(default_factory=list)
    events: deque[dict[str, Any]] = field(default_factory=deque)


class Watcher:
    """Fetches the view over one connection and follows the events (cursor: run -> last seq)."""

    def __init__(self, client: Any, run: str, last: int) -> None:
        self.client = client
        self.run = run
        self.view = View(events=deque(maxlen=last))
        self.cursor: dict[str, int] = {}

    def refresh(self) -> None:
        """Runs and the tasks of the runs still going."""
        from protocol.runs import RunListRequest, TaskListRequest

        listed = self.client.request(RunListRequest)
        runs = [r for r in listed.runs if not self.run or r.id == self.run]
        if self.run and not runs:
            raise Absent(f"no run {self.run!r}", run=self.run)
        going = sorted(runs, key=lambda r: r.status in ENDED)  # stable: newest first in each
        self.view.runs = going[:RUNS_SHOWN]
        self.view.more_runs = len(going) - len(self.view.runs)
        self.view.draining = listed.draining
        self.view.tasks = [
            task
            for summary in self.view.runs
            if summary.status not in ENDED
            for task in self.client.request(
                TaskListRequest, run=summary.id, states=list(LIVE_STATES), limit=MAX_SLOTS
            ).tasks
        ]

    def backlog(self) -> None:
        """The latest events of the runs shown, and the cursor to follow every run from."""
        from protocol.runs import EventList

        heads = self.client.request(EventList, run=self.run, from_now=True).heads
        last = self.view.events.maxlen or 0
        shown = {summary.id for summary in self.view.runs}
        self.cursor = {
            run: max(0, head - last) if run in shown else head for run, head in heads.items()
        }
        if last and shown:
            found = self._read(0.0, limit=last * len(shown))
            found.sort(key=lambda e: (e.get("timestamp", ""), e["run_id"], e["seq"]))
            self.view.events.extend(found[-last:])
        for run, head in heads.items():  # what the backlog left unread is past, not news
            self.cursor[run] = max(self.cursor[run], head)

    def follow(self, wait: float) -> list[dict[str, Any]]:
        """The events after the cursor, waiting up to `wait` seconds for one."""
        found = self._read(wait)
        self.view.events.extend(found)
        return found

    def _read(self, wait: float, limit: int = 1000) -> list[dict[str, Any]]:
        from protocol.runs import EventList

        page = self.client.request(
            EventList,
            run=self.run,
            after=self.cursor,
            wait=wait,
            limit=limit,
            timeout=wait + FOLLOW_WAIT,
        )
        found = [json.loads(bytes(raw)) for raw in page.events]
        for event in found:
            self.cursor[event["run_id"]] = event["seq"]
        return found


# -- what is shown --------------------------------------------------------------------------


def run_rows(view: View) -> list[tuple[str, ...]]:
    return [(r.id, r.status, _counts(r.tasks), r.name) for r in view.runs]


def worker_slots(tasks: Sequence["TaskView"]) -> list[tuple[str, str, "TaskView | None"]]:
    """(run, slot, current task or None when idle) for each worker slot a task names."""
    slots: dict[tuple[str, str], TaskView | None] = {}
    for task in tasks:
        if task.member:
            key = (task.entry.run_id, task.member)
            if task.state in LIVE_STATES:
                slots[key] = task
            else:
                slots.setdefault(key, None)
    return [(run, member, live) for (run, member), live in sorted(slots.items())]


def worker_rows(tasks: Sequence["TaskView"], now: float) -> list[tuple[str, ...]]:
    """One row per worker slot: its current task with the age of its last heartbeat, or idle."""
    return [
        (member, "-", run, "-", "idle", "-")
        if live is None
        else (
            member,
            live.worker_id,
            run,
            live.entry.task_id,
            live.state,
            age_of(live.last_heartbeat_at, now),
        )
        for run, member, live in worker_slots(tasks)
    ]


def age_of(stamp: str, now: float) -> str:
    """`0.4s`, `12s`, `3m04s`, `2h05m`: how long ago `stamp` (RFC 3339) was."""
    from protocol.tasks import epoch

    if not stamp:
        return "-"
    seconds = max(0.0, now - epoch(stamp))
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def event_cells(event: dict[str, Any]) -> tuple[str, ...]:
    """time (local, to the millisecond), run, seq, task, state, detail (the other fields)."""
    detail = " ".join(
        f"{'worker' if key == 'worker_id' else key}={_value(value)}"
        for key, value in event.items()
        if key not in ENVELOPE and value not in ("", None)
    )
    return (
        _clock(event.get("timestamp", "")),
        str(event.get("run_id", "")),
        str(event.get("seq", "")),
        str(event.get("task_id", "")),
        str(event.get("state", "")),
        detail,
    )


def event_line(event: dict[str, Any]) -> str:
    return "  ".join(event_cells(event)).rstrip()


def _value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return json.dumps(text) if any(c.isspace() for c in text) or not text else text


def _clock(stamp: str) -> str:
    from protocol.tasks import epoch

    try:
        moment = epoch(stamp)
    except FleetError:
        return stamp or "-"
    return time.strftime("%H:%M:%S", time.localtime(moment)) + f".{int(moment * 1000) % 1000:03d}"


RUN_COLUMNS = ("RUN", "STATUS", "TASKS", "NAME")
WORKER_COLUMNS = ("SLOT", "WORKER", "RUN", "TASK", "STATE", "HEARTBEAT")
EVENT_COLUMNS = ("TIME", "RUN", "SEQ", "TASK", "STATE", "DETAIL")


def plain(view: View, now: float) -> str:
    """The view as plain text: three tables, no escape codes."""
    runs = _table(RUN_COLUMNS, run_rows(view)) if view.runs else "no runs"
    if view.more_runs:
        runs += f"\n(and {view.more_runs} more: `fleetctl runs list`)"
    if view.draining:
        runs += "\n(dispatch is drained: `fleetctl drain --resume` starts it again)"
    workers = worker_rows(view.tasks, now)
    events = [event_cells(e) for e in view.events]
    return "\n\n".join(
        [
            runs,
            _table(WORKER_COLUMNS, workers) if workers else "no workers",
            _table(EVENT_COLUMNS, events) if events else "no events",
        ]
    )


STYLES = {
    "done": "green",
    "completed": "green",
    "running": "cyan",
    "leased": "yellow",
    "queued": "dim",
    "scoring": "magenta",
    "failed": "red",
    "stale": "red",
    "cancelled": "dim",
    "idle": "dim",
}


def rich_view(view: View, now: float, header: str) -> "RenderableType":
    """The view as rich tables, states in colour."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table(
        title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], state: int
    ) -> Table | Text:
        if not rows:
            return Text(f"no {title}", style="dim")
        grid = Table(title=title, title_justify="left", box=None, expand=False, pad_edge=False)
        for column in columns:
            grid.add_column(column, no_wrap=column != columns[-1], overflow="ellipsis")
        for row in rows:
            cells = [Text(cell) for cell in row]
            cells[state].stylize(STYLES.get(row[state], ""))
            grid.add_row(*cells)
        return grid

    notes = []
    if view.more_runs:
        notes.append(Text(f"and {view.more_runs} more runs", style="dim"))
    if view.draining:
        notes.append(Text("dispatch is drained", style="yellow"))
    return Group(
        Text(header, style="bold"),
        table("runs", RUN_COLUMNS, run_rows(view), 1),
        *notes,
        Text(""),
        table("workers", WORKER_COLUMNS, worker_rows(view.tasks, now), 4),
        Text(""),
        table("events", EVENT_COLUMNS, [event_cells(e) for e in view.events], 4),
    )


# -- the command ----------------------------------------------------------------------------


@cli.command("top")
@click.option("--run", default="", help="Only this run.")
@click.option(
    "--interval",
    type=Duration(0.05, 3600.0),
    default="1s",
    show_default=True,
    help="How often runs and workers are fetched again (a duration).",
)
@click.option(
    "-n",
    "--events",
    "last",
    type=click.IntRange(0, 1000),
    default=10,
    show_default=True,
    help="How many of the latest events are shown.",
)
@click.option("--once", is_flag=True, help="Print one snapshot as plain text and exit.")
@click.pass_obj
def top(g: Globals, run: str, interval: float, last: int, once: bool) -> None:
    """Watch task runs: runs with their tasks by state, worker slots with their current task
    and last heartbeat, and the latest events.

    On a terminal the view is redrawn in place, at once for each new event and every
    --interval for the rest; `q` or Ctrl-C quits. Piped, it prints the snapshot as plain
    text, then each new event as a line, until killed; --once prints the snapshot alone
    (--json: as one envelope). Outcomes: ok (0), absent (11) for an unknown --run."""
    live = not once and not g.json and sys.stdout.isatty() and os.environ.get("TERM") != "dumb"

    def call(client: Any) -> int:
        watcher = Watcher(client, run, last)
        watcher.refresh()
        watcher.backlog()
        if g.json:
            return _envelope(watcher.view)
        if once:
            return _write(plain(watcher.view, time.time())) or Outcome.OK.exit_code
        if live:
            return _show_live(watcher, interval, g.socket_path)
        return _follow_plain(watcher)

    if once or g.json:
        _client_call(g, call)
    with _terminated_as_interrupted():
        try:
            _client_call(g, call)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM: the way out of a view that goes on
            raise Exit(Outcome.OK.exit_code) from None


def _envelope(view: View) -> int:
    return emit(
        True,
        "",
        runs=msgspec.to_builtins(view.runs),
        workers=[
            {"run_id": run, "slot": member, "state": "idle"}
            if live is None
            else {
                "run_id": run,
                "slot": member,
                "state": live.state,
                "worker_id": live.worker_id,
                "task_id": live.entry.task_id,
                "attempt_id": live.attempt_id,
                "last_heartbeat_at": live.last_heartbeat_at,
            }
            for run, member, live in worker_slots(view.tasks)
        ],
        events=list(view.events),
        draining=view.draining,
    )


def _write(text: str) -> int | None:
    """None when `text` reached stdout; otherwise the code to exit with: 0 when the reader
    left (`fleetctl top | head`), error when the output cannot be written."""
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout.discard()
        return Outcome.OK.exit_code
    except OSError as exc:
        _stdout.discard()
        sys.stderr.write(f"fleetctl: cannot write the output: {exc.strerror or exc}\n")
        return Outcome.ERROR.exit_code
    return None


def _follow_plain(watcher: Watcher) -> int:
    """The snapshot, then each new event as a line, until interrupted or the reader left."""
    stopped = _write(plain(watcher.view, time.time()))
    while stopped is None:
        lines = [event_line(event) for event in watcher.follow(FOLLOW_WAIT)]
        if lines:
            stopped = _write("\n".join(lines))
    return stopped


@contextlib.contextmanager
def _terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM ends the view as Ctrl-C does: cleanly, exit 0."""
    handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, handler)


def _show_live(watcher: Watcher, interval: float, socket_path: str) -> int:
    """Redraw the view in place until `q` (exit 0), KeyboardInterrupt (raised, as Ctrl-C
    is), or until fleetd fails the watcher (that error); the terminal restored first, in
    every case. The watcher runs on a thread of its own: its long polls never delay a key."""
    from rich.console import Console
    from rich.live import Live

    header = f"fleetctl top: fleetd at {socket_path}, every {interval:g}s (q quits)"
    console = Console(highlight=False)
    display = Live(
        rich_view(watcher.view, time.time(), header),
        console=console,
        auto_refresh=False,
        redirect_stdout=False,
        redirect_stderr=False,
        vertical_overflow="ellipsis",
    )
    feed = _Feed(watcher, interval, lambda: rich_view(watcher.view, time.time(), header))
    with _keys() as keys:
        try:
            display.start(refresh=True)
            feed.start(display)
            _wait_for_quit(keys, feed.ended)
        finally:
            feed.stop(display)
    if feed.failure is not None:
        raise feed.failure
    return Outcome.OK.exit_code


class _Feed:
    """The thread that follows the events and refreshes the view, redrawing the display; its
    failure is kept for the main thread, which `ended` (a pipe's read end) wakes."""

    def __init__(self, watcher: Watcher, interval: float, render: Callable[[], "RenderableType"]):
        self.watcher = watcher
        self.interval = interval
        self.render = render
        self.failure: BaseException | None = None
        self.ended, self._wake = os.pipe()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self, display: "Live") -> None:
        threading.Thread(target=self._run, args=(display,), daemon=True).start()

    def stop(self, display: "Live") -> None:
        """Stop the display; the thread draws no more (it may still be in a long poll, and
        ends with the process)."""
        with self._lock:
            self._stopped.set()
            display.stop()
        os.close(self.ended)

    def _run(self, display: "Live") -> None:
        try:
            next_refresh = time.monotonic() + self.interval
            while True:
                self.watcher.follow(max(0.0, next_refresh - time.monotonic()))
                if time.monotonic() >= next_refresh:
                    self.watcher.refresh()
                    next_refresh = time.monotonic() + self.interval
                with self._lock:
                    if self._stopped.is_set():
                        return
                    display.update(self.render(), refresh=True)
                if self._stopped.wait(FRAME):
                    return
        except Exception as exc:  # reported by the main thread, the terminal restored
            self.failure = exc
            os.write(self._wake, b"!")
        finally:
            os.close(self._wake)


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin, its terminal in cbreak mode (a key reads at once, unechoed; Ctrl-C still
    interrupts), restored after; None when stdin is no terminal."""
    import termios
    import tty

    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    if fd < 0 or not os.isatty(fd):
        yield None
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(keys: int | None, ended: int) -> None:
    """Until `q` is typed on `keys`, or `ended` is readable; a signal (Ctrl-C) raises here.
    The kernel may give a signal to the feed thread, whose handler only marks it for this
    one: the wake-up fd then ends the wait, which would otherwise last until a key."""
    import select

    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    previous = signal.set_wakeup_fd(wake)
    try:
        watched = [ended, woken] if keys is None else [ended, woken, keys]
        while True:
            readable = select.select(watched, [], [])[0]
            if ended in readable:
                return
            if woken in readable:
                os.read(woken, 64)  # the handler has run, or runs at the next instruction
            if keys in readable and b"q" in os.read(keys, 64).lower():
                return
    finally:
        signal.set_wakeup_fd(previous)
        os.close(woken)
        os.close(wake)
