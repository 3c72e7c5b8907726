"""What the dispatcher keeps in the store, and under which keys.

    runs/next                      the last run number given (run ids are run-N)
    runs/index/RUN                 RunRecord: the run without its task specs, and its counts
    runs/spec/RUN/TASK             the TaskSpec, written once at submit
    runs/task/RUN/TASK             TaskRecord: where the task is (the seed's inbox entry)
    runs/seq/RUN                   the run's last event seq
    runs/event/RUN/BUCKET/SEQ      WorkerEvents from SEQ on, written together: JSON lines
                                   (BUCKET = SEQ // EVENT_BUCKET)
    runs/receipt/RUN/TASK          the task's Receipt

Events are bucketed so that reading a run's events after a seq ranges over the buckets from
that seq's on, never over the whole run. The events that one write appends share a key in
each bucket they fall in (fleetd.tasks.events): a key per event made five of the twelve puts
that a trivial task cost. A run too big for one transaction is written in steps and
dispatched once every key is written (its index record says `pending` until then): start-up
removes a run submitted half-way. A smaller run's one transaction is on its way while its
first workers start (fleetd.tasks.service).
"""

import msgspec

from protocol.runs import TaskState
from protocol.tasks import ResultMessage, Run, TaskResult

EVENT_BUCKET = 4096
"""Events per bucket key prefix."""

NEXT_KEY = "runs/next"
INDEX = "runs/index/"
SPECS = "runs/spec/"
TASKS = "runs/task/"
SEQS = "runs/seq/"
EVENTS = "runs/event/"
RECEIPTS = "runs/receipt/"


def index_key(run: str) -> str:
    return INDEX + run


def spec_key(run: str, task: str) -> str:
    return f"{SPECS}{run}/{task}"


def task_key(run: str, task: str) -> str:
    return f"{TASKS}{run}/{task}"


def seq_key(run: str) -> str:
    return SEQS + run


def event_bucket(run: str, bucket: int) -> str:
    return f"{EVENTS}{run}/{bucket:08d}/"


def event_key(run: str, seq: int) -> str:
    return f"{event_bucket(run, seq // EVENT_BUCKET)}{seq:012d}"


def receipt_key(run: str, task: str) -> str:
    return f"{RECEIPTS}{run}/{task}"


class RunRecord(msgspec.Struct, omit_defaults=True):
    """A run as stored: its definition without task specs (those have their own keys), and,
    once it ended, its tasks counted by state."""

    run: Run
    home: str = ""
    """The fleetd that dispatches it, on a shared store (fleetd.presence.home_of)."""
    counts: dict[str, int] = {}


class TaskRecord(msgspec.Struct, omit_defaults=True):
    """A task's place in the inbox and its current attempt, as the dispatcher keeps it.

    `attempts` counts attempts started; `attempt_id` is the current (or last) one's, which a
    worker reports under: a report under any other is not the task's own any more.
    `log_offset` is where the worker slot's stdout log stood when the attempt started: its
    result line is after it."""

    task_id: str
    priority: int
    enqueued_at: float
    state: TaskState = "queued"
    attempts: int = 0
    not_before: float = 0.0
    worker_id: str = ""
    member: str = ""
    attempt_id: str = ""
    started_at: float = 0.0
    log_offset: int = 0
    result: TaskResult | None = None
    reported: ResultMessage | None = None
    """What the worker itself reported for this attempt (a completed or failed event)."""
    error: str = ""


def attempt_id(run: str, task: str, attempt: int) -> str:
    return f"{run}/{task}/{attempt}"


def parse_attempt_id(value: str) -> tuple[str, str, int] | None:
    run, _, rest = value.partition("/")
    task, _, number = rest.rpartition("/")
    if not run or not task or not number.isdigit():
        return None
    return run, task, int(number)
