"""Task runs on the wire (the control-plane seeds; their records are protocol.tasks').

    run_submit     -> RunResult      acquired: the run file's tasks are queued
    run_list       -> RunList        every run, newest first, with its tasks counted by state
    run_show       -> RunDetail      one run: its definition (but its task specs) and status
    run_cancel     -> RunResult      released (its workers are stopped) | already_released
    task_list      -> TaskList       tasks (of one run, in some states), a page at a time
    event_list     -> EventPage      events after a cursor, waiting up to `wait` for one
    event_emit     -> EmitResult     ok | already_acquired (that result was counted already)
                                     | not_owned (the attempt is no longer the task's own);
                                     one event, or a batch appended in one write
    receipt_list   -> ReceiptList    receipts (of one run)
    receipt_score  -> ReceiptResult  a manual scorer's verdict
    drain          -> DrainResult    no new dispatch; answers once nothing is in flight

Events are one ordered record per run: `seq` counts from 1 without gaps. A cursor maps run
ids to the last seq read; a run it does not name is read from its start, unless `from_now`,
where the answer's `heads` (each run's last seq) is the cursor to follow with.

A worker is started with flags only (protocol.tasks.worker_flags): its attempt id names the
run, the task and the attempt, and is what it reports events under.
"""

from typing import Literal

import msgspec

from protocol.base import Message, Op
from protocol.outcomes import Outcome
from protocol.tasks import InboxEntry, Receipt, Run, TaskResult

TaskState = Literal["queued", "leased", "running", "scoring", "done", "failed", "cancelled"]
"""queued (waiting, perhaps for its backoff), leased (a worker slot is being started for it),
running, scoring (a manual scorer's verdict is awaited), then done (scored), failed (its
attempts ran out) or cancelled."""

TASK_STATES: tuple[TaskState, ...] = (
    "queued",
    "leased",
    "running",
    "scoring",
    "done",
    "failed",
    "cancelled",
)


class TaskView(Message, frozen=True):
    """A task as the dispatcher has it: the seed's inbox entry and where it is now."""

    entry: InboxEntry
    state: TaskState
    name: str = ""
    worker_id: str = ""
    attempt_id: str = ""
    member: str = ""
    """The worker slot (a member of the run's cluster) running it, or that ran it last."""
    last_heartbeat_at: str = ""
    not_before: str = ""
    """A retry's backoff: not dispatched before then."""
    result: TaskResult | None = None
    error: str = ""


class RunSummary(Message, frozen=True):
    id: str
    name: str
    status: str
    created_at: str
    tasks: dict[str, int] = msgspec.field(default_factory=dict)
    """Tasks by state."""
    completed_at: str = ""


class RunResult(Message, frozen=True):
    outcome: Outcome
    run: RunSummary


class RunList(Message, frozen=True):
    runs: list[RunSummary] = msgspec.field(default_factory=list)
    draining: bool = False


class RunDetail(Message, frozen=True):
    """The run as submitted, but its task specs (task_list pages through its tasks)."""

    run: Run
    summary: RunSummary


class TaskList(Message, frozen=True):
    """One page: `next`, when not empty, is the `after` of the next one. `cells` (asked for
    instead of `tasks`) has a list a column, each a cell a task: run, task, state, attempts,
    worker ("-" for none), result ("-" for none), note (its error, else "retry after TIME"
    while a retry's backoff waits, else "")."""

    tasks: list[TaskView] = msgspec.field(default_factory=list)
    next: str = ""
    cells: list[list[str]] = msgspec.field(default_factory=list)
    table: str = ""
    """Asked for with `table`: protocol.tables.tasks_table of every task asked for."""


class EventPage(Message, frozen=True):
    """`events` are protocol.tasks.WorkerEvent JSON objects, as stored."""

    events: list[msgspec.Raw] = msgspec.field(default_factory=list)
    heads: dict[str, int] = msgspec.field(default_factory=dict)


class EmitResult(Message, frozen=True):
    """`seq` is the last appended event's: a batch's events have the seqs up to it, in order,
    without gaps (0 when nothing was appended)."""

    outcome: Outcome
    seq: int = 0
    message: str = ""


class ReceiptList(Message, frozen=True):
    receipts: list[Receipt] = msgspec.field(default_factory=list)


class ReceiptResult(Message, frozen=True):
    outcome: Outcome
    receipt: Receipt


class DrainResult(Message, frozen=True):
    draining: bool
    in_flight: int = 0


class RunSubmit(Op[RunResult], tag="run_submit", frozen=True):
    """A run file's text (`format` toml or json), parsed by fleetd as fleetctl would;
    relative workspaces resolve against `directory` (the file's)."""

    text: str
    format: Literal["toml", "json"] = "toml"
    source: str = "<run>"
    directory: str = ""


class RunListRequest(Op[RunList], tag="run_list", frozen=True):
    pass


class RunShow(Op[RunDetail], tag="run_show", frozen=True):
    run: str


class RunCancel(Op[RunResult], tag="run_cancel", frozen=True):
    run: str


class TaskListRequest(Op[TaskList], tag="task_list", frozen=True):
    """Tasks of `run` (every run's, RUN/TASK order, without), in their states (any without),
    after the task `after` names (TASK, or RUN/TASK without `run`), `limit` at most. With
    `cells`, the answer holds what `fleetctl tasks list` prints of them (`cells`), not their
    views: a tenth of the bytes, for a table of thousands of tasks. With `table`, it holds
    the table itself, of every task asked for (`limit` aside), when it fits one answer, else
    it is the first page of their cells."""

    run: str = ""
    states: list[TaskState] = msgspec.field(default_factory=list)
    after: str = ""
    limit: int = 1000
    cells: bool = False
    table: bool = False


class EventList(Op[EventPage], tag="event_list", frozen=True):
    run: str = ""
    after: dict[str, int] = msgspec.field(default_factory=dict)
    from_now: bool = False
    wait: float = 0.0
    limit: int = 1000


MAX_EMITTED = 1000
"""Events in one event_emit at most."""


class EventEmit(Op[EmitResult], tag="event_emit", frozen=True):
    """An event a worker reports under its attempt: `event` is a WorkerEvent's payload (its
    `state` and that state's fields; the envelope is fleetd's to fill). Or `events`, up to
    MAX_EMITTED of them, appended in order in one write: a worker with many events to report
    costs a request per batch, not per event. One invalid event refuses them all."""

    attempt_id: str
    event: dict[str, object] = msgspec.field(default_factory=dict)
    events: list[dict[str, object]] = msgspec.field(default_factory=list)


class ReceiptListRequest(Op[ReceiptList], tag="receipt_list", frozen=True):
    run: str = ""


class ReceiptScore(Op[ReceiptResult], tag="receipt_score", frozen=True):
    task: str
    """TASK, or RUN/TASK when more than one run has that task id."""
    result: Literal["pass", "fail"]
    notes: str = ""


class Drain(Op[DrainResult], tag="drain", frozen=True):
    wait: float = 0.0
    """Seconds to wait for the tasks in flight; 0 answers at once."""
    resume: bool = False
    """Dispatch again instead."""


RUN_REQUEST_TYPES = (
    RunSubmit,
    RunListRequest,
    RunShow,
    RunCancel,
    TaskListRequest,
    EventList,
    EventEmit,
    ReceiptListRequest,
    ReceiptScore,
    Drain,
)
