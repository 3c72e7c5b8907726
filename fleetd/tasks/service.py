"""The dispatcher: runs submitted, their tasks leased to worker slots, followed to a receipt.

Workers are members of one cluster, `fleetd.tasks`, served by a holder like any other: each
worker spec has `max_concurrent_tasks` slots, members named `RUN.WORKER.N`, and a slot given
a task runs the worker's command with the task's flags appended (protocol.tasks.worker_flags;
flags only, as the dispatch seed's BuildWorkerCommand), started again with that definition for
each task (HolderRegistry.run_member). A slot that is done stays, exited, until its next task,
and the slots of ended runs stay a while (KEPT_ENDED): the holder, which ends with its last
member, stays up for the next run, whose first worker then starts at once.

The task's attempt is followed through the holder's pushes (fleetd.clusters.index Observer):
a status whose spawn is the attempt's own (`started_at`) and that ended says how it ended. A
worker reports events under its attempt id (event_emit): a heartbeat moves its lease deadline
(`lease_seconds` of its worker spec) later; past it, the worker is stale, stopped, and its task
requeued. `timeout_seconds` stops it too. An attempt that failed (exit code, a `fail` result
line or event, stale, timed out, or not startable) is retried after the retry policy's backoff
until its attempts run out; one that succeeded is scored into a receipt.

Durability: a task's record and its events are one transaction (fleetd.tasks.events), written
as what they say is done: a worker starts while its lease is written, and a small run's first
workers while its submit is, so that a restart may find workers the store does not know of,
which it stops (_stop_unrecorded, _stop_strays). Otherwise every task is where its record says:
queued ones are queued again, a leased or running one whose worker still runs is followed
again, one whose worker ended is finished as it ended, and one whose worker is gone is
retried.
"""

import collections
import heapq
import itertools
import os
import time
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from typing import Any, TypedDict

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.core.timers import Alarm, DeadlineHeap
from fleetd.presence import home_of
from fleetd.store import Compare, DeleteRange, Operation, Put, Store
from fleetd.tasks import records
from fleetd.tasks.alerts import Alert, Alerter, task_alert
from fleetd.tasks.events import EventLog, Pending, stored_last_seq
from fleetd.tasks.records import RunRecord, TaskRecord, attempt_id, parse_attempt_id
from fleetd.tasks.scoring import Verdict, reads_files, result_line, score
from fleetd.tasks.views import (
    PAGE_BYTES,
    TASK_CELLS,
    EncodedTaskList,
    TaskViews,
    cell_sizes,
    cells_of,
    fill,
)
from protocol import MAX_TASK_PAGE
from protocol.definitions import MemberSpec
from protocol.errors import Absent, FleetError, InvalidRequest, Unsupported
from protocol.members import MemberState, MemberStatus, member_log_path
from protocol.names import check_name
from protocol.outcomes import Outcome
from protocol.runfile import RunSpec, parse_run_file
from protocol.runs import (
    MAX_EMITTED,
    Drain,
    DrainResult,
    EmitResult,
    EventEmit,
    EventList,
    EventPage,
    ReceiptList,
    ReceiptListRequest,
    ReceiptResult,
    ReceiptScore,
    RunCancel,
    RunDetail,
    RunList,
    RunListRequest,
    RunResult,
    RunShow,
    RunSubmit,
    RunSummary,
    TaskListRequest,
    TaskState,
    TaskView,
)
from protocol.tables import tasks_table
from protocol.tasks import (
    DEFAULT_RETRY,
    Artifact,
    ArtifactRef,
    Cancelled,
    Completed,
    Escalated,
    Failed,
    Heartbeat,
    InboxEntry,
    Leased,
    LocalHost,
    Queued,
    Receipt,
    ResultMessage,
    Run,
    Running,
    Score,
    Stale,
    Starting,
    TaskSpec,
    WorkerEvent,
    WorkerSpec,
    timestamp,
    worker_flags,
)

log = structlog.get_logger("fleetd.tasks")

DEFAULT_MAX_WORKERS = 64
"""Workers running at once over every run, unless FLEET_MAX_WORKERS says otherwise."""
WRITE_CHUNK = 100
"""Keys per transaction when a run is submitted (etcd takes 128 operations at most)."""
PARSED_INLINE = 64 * 1024
"""Characters of a run file parsed on the event loop (a bigger one is parsed in a thread)."""
FINAL = frozenset({"done", "failed", "cancelled"})
RUN_ENDED = frozenset({"completed", "failed", "cancelled"})
_ENDED = (MemberState.STOPPED, MemberState.ERROR)
CLUSTER = "fleetd.tasks"
"""The cluster every run's worker slots are members of (a name fleetd keeps for itself)."""
KEPT_ENDED = 64
"""Worker slots of ended runs kept (exited, their logs readable) before the oldest go: the
holder lives as long as it has a member, so that the next run's first worker starts in it."""
CANCEL_WAIT = 30.0
"""Seconds a cancel waits for the run's workers to stop."""
INSTRUCTIONS = "tasks"
"""Beside the control socket: tasks/RUN/TASK.md, the instructions of a run's started tasks."""

_encode = msgspec.json.Encoder().encode
_decode_task = msgspec.json.Decoder(TaskRecord).decode
_decode_spec = msgspec.json.Decoder(TaskSpec).decode
_decode_run = msgspec.json.Decoder(RunRecord).decode
_decode_receipt = msgspec.json.Decoder(Receipt).decode


def max_workers_from(environ: dict[str, str] | os._Environ[str]) -> int:
    value = environ.get("FLEET_MAX_WORKERS", "")
    if not value:
        return DEFAULT_MAX_WORKERS
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequest(f"FLEET_MAX_WORKERS={value!r}: give a whole number of 1 or more")
    return int(value)


def matches(worker: WorkerSpec, task: TaskSpec) -> bool:
    """The worker has every capability the task asks for, and every label it names."""
    return set(task.capabilities) <= set(worker.capabilities) and all(
        worker.labels.get(key) == value for key, value in task.labels.items()
    )


@dataclass(eq=False)
class Slot:
    """A worker slot: one member of the tasks cluster, running one task at a time."""

    worker: WorkerSpec
    member: str
    task: TaskRecord | None = None
    ending: str = ""
    """Why fleetd is stopping its attempt: timeout, stale or cancelled."""
    running: bool = False
    """The attempt's `running` was reported."""
    launched: bool = False
    """Its holder took the attempt's worker (so its holder's exit ends it)."""
    lease_deadline: float = 0.0
    timeout_at: float = 0.0
    last_heartbeat: float = 0.0
    artifacts: list[ArtifactRef] = field(default_factory=list)


@dataclass(eq=False)
class RunState:
    run: Run
    specs: dict[str, TaskSpec]
    tasks: dict[str, TaskRecord]
    events: EventLog
    slots: list[Slot]
    ready: list[tuple[int, float, int, str]] = field(default_factory=list)
    """Queued tasks due now: (-priority, enqueued_at, order, task id), a heap."""
    tally: dict[str, int] = field(default_factory=dict)
    """Its tasks by state (RunState.move keeps it)."""
    cancelling: bool = False
    """A cancel is under way: nothing more of it is dispatched."""
    settled: anyio.Event = field(default_factory=anyio.Event)
    """Set (and replaced) whenever one of its attempts ended, and its status says so."""

    def free_slot(self, spec: TaskSpec) -> Slot | None:
        return next((s for s in self.slots if s.task is None and matches(s.worker, spec)), None)

    def __post_init__(self) -> None:
        for task in self.tasks.values():
            self.tally[task.state] = self.tally.get(task.state, 0) + 1

    def move(self, task: TaskRecord, state: TaskState) -> None:
        """The one way a task changes state: its run keeps them counted."""
        self.tally[task.state] -= 1
        if not self.tally[task.state]:
            del self.tally[task.state]
        task.state = state
        self.tally[state] = self.tally.get(state, 0) + 1

    def counts(self) -> dict[str, int]:
        return dict(self.tally)

    def unfinished(self) -> int:
        return sum(n for state, n in self.tally.items() if state not in FINAL)

    def summary(self) -> RunSummary:
        run = self.run
        return RunSummary(
            id=run.id,
            name=run.name,
            status=run.status,
            created_at=run.created_at,
            tasks=self.counts(),
            completed_at=run.completed_at or "",
        )


class _Observer:
    """The tasks' cluster, as the index hears of it."""

    def __init__(self, service: "TaskService") -> None:
        self.service = service

    def member_changed(self, status: MemberStatus) -> None:
        found = self.service.slots.get(status.name)
        if found is not None:
            self.service.member_changed(*found, status)

    def holder_gone(self) -> None:
        for run, slot in list(self.service.slots.values()):
            if slot.task is not None and slot.launched:
                self.service.attempt_lost(run, slot, "its holder exited")


class Envelope(TypedDict):
    """What fleetd fills in every event: the seq is given as it is appended."""

    seq: int
    run_id: str
    worker_id: str
    task_id: str
    timestamp: str


Timer = tuple[str, str, str, str]
"""(kind, run, task, attempt id): kind lease, timeout, backoff or escalate (no attempt id:
a task's stale time spans its attempts)."""


class TaskService:
    def __init__(
        self,
        store: Store,
        holders: HolderRegistry,
        state: PrivateDir,
        runtime: PrivateDir,
        socket_path: str,
        *,
        max_workers: int = DEFAULT_MAX_WORKERS,
    ) -> None:
        self.store = store
        self.holders = holders
        self.state = state
        self.runtime = runtime
        """The control socket's directory (tmpfs under systemd): the started tasks'
        instructions files (INSTRUCTIONS)."""
        self.socket_path = socket_path
        self.max_workers = max_workers
        self.home = home_of(state) if store.shared else ""
        """Whose runs this fleetd dispatches: on a shared store, those submitted to it."""
        self.runs: dict[str, RunState] = {}
        self._in_order: list[RunState] | None = None
        """The runs oldest first, until one is added (see _ordered_runs)."""
        self.slots: dict[str, tuple[RunState, Slot]] = {}
        """Every live run's slots by member name."""
        self._active: dict[str, RunState] = {}
        """The runs not ended: those dispatch looks at."""
        self._ended_slots: collections.deque[str] = collections.deque()
        self.draining = False
        self._busy = 0
        self._idle = anyio.Event()
        self._kick = anyio.Event()
        self._any_event = anyio.Event()
        self._order = itertools.count()
        self._timers: DeadlineHeap[Timer] = DeadlineHeap(self._deadline_of)
        self._alarm = Alarm(time.time)
        self._tasks: TaskGroup | None = None
        self._stale_since: dict[tuple[str, str], float] = {}
        """Tasks whose worker went stale, since when, until one of its attempts ends well."""
        self.alerter = Alerter(on_delivered=self._escalated)
        self._views = TaskViews()
        """task_list's views, encoded (fleetd.tasks.views)."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load the runs, take up their tasks where their records say, then dispatch until
        cancelled (which leaves every worker running: a restarted fleetd follows them)."""
        self.holders.index.observe(CLUSTER, _Observer(self))
        async with anyio.create_task_group() as self._tasks:
            await self._tasks.start(self.alerter.serve)
            await self._load()
            self._tasks.start_soon(self._dispatch_forever)
            self._tasks.start_soon(self._timers_forever)
            task_status.started()
            self.kick()

    def _soon(self, call: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run `call` beside the dispatcher. A store that fails it (etcd gone, a full disk)
        is logged, and leaves fleetd serving: the store still says what it last wrote."""
        assert self._tasks is not None, "TaskService.serve first"
        self._tasks.start_soon(_logging_failures, call, *args)

    async def _load(self) -> None:
        """This fleetd's runs: on a shared store (etcd), the others' are theirs to dispatch.
        One whose submit never finished (still pending) is removed."""
        found = [_decode_run(kv.value) for kv in await self.store.range(records.INDEX)]
        for record in sorted(found, key=lambda record: _number(record.run.id)):
            if record.home != self.home:
                continue
            if record.run.status == "pending":
                await self._remove_run(record.run.id)
                log.warning("run_half_submitted_removed", run=record.run.id)
                continue
            await self._load_run(record)
        await self._stop_strays()
        ended = [run for run in self._instruction_runs() if run not in self._active]
        await anyio.to_thread.run_sync(self._remove_instructions, ended)

    async def _stop_strays(self) -> None:
        """Workers of runs the store does not have (a small run's first workers start before
        its submit is durable: _submit_at_once), removed from the tasks' cluster."""
        held = self.holders.index.live.get(CLUSTER)
        if held is None:
            return
        known = {*self.slots, *self._ended_slots}
        strays = [member for member in held.specs if member not in known]
        async with anyio.create_task_group() as tg:
            for member in strays:
                log.info("task_stray_worker_removed", member=member)
                tg.start_soon(_logging_failures, self.holders.remove_named, CLUSTER, member)

    async def _remove_run(self, run_id: str) -> None:
        prefixes = (records.SPECS, records.TASKS, records.EVENTS, records.RECEIPTS)
        for prefix in prefixes:
            await self.store.txn((), (DeleteRange(f"{prefix}{run_id}/"),))
        await self.store.delete(records.seq_key(run_id))
        await self.store.delete(records.index_key(run_id))

    async def _load_run(self, record: RunRecord) -> None:
        run = record.run
        specs = {
            kv.key.rsplit("/", 1)[1]: _decode_spec(kv.value)
            for kv in await self.store.range(f"{records.SPECS}{run.id}/")
        }
        tasks = {
            kv.key.rsplit("/", 1)[1]: _decode_task(kv.value)
            for kv in await self.store.range(f"{records.TASKS}{run.id}/")
        }
        last = await stored_last_seq(self.store, run.id)
        state = RunState(run, specs, tasks, EventLog(self.store, run.id, last), _slots(run))
        self._add_run(state)
        if run.status in RUN_ENDED:
            self._ended_slots.extend(slot.member for slot in state.slots)
            return
        self._add_slots(state)
        await self._stop_unrecorded(state)
        for task in tasks.values():
            if task.state == "queued":
                self._queue(state, task)
            elif task.state in ("leased", "running"):
                self._take_up(state, task)
        self._finish_if_done(state)

    async def _stop_unrecorded(self, run: RunState) -> None:
        """Workers started for an attempt whose lease a crash kept from the store (a worker
        starts before its lease is durable): stopped, and their attempt counted, so that the
        task's next attempt has an id of its own."""
        held = self.holders.index.live.get(CLUSTER)
        if held is None:
            return
        async with anyio.create_task_group() as tg:
            for slot in run.slots:
                spec = held.specs.get(slot.member)
                found = parse_attempt_id(_flag(spec.command, "--attempt-id")) if spec else None
                if found is None or found[0] != run.run.id or found[1] not in run.tasks:
                    continue
                task = run.tasks[found[1]]
                if task.state == "queued" and found[2] > task.attempts:
                    task.attempts = found[2]
                    log.info("task_unrecorded_attempt", run=run.run.id, task=task.task_id)
                    tg.start_soon(
                        _logging_failures, self.holders.stop_named, f"{CLUSTER}/{slot.member}"
                    )

    def _take_up(self, run: RunState, task: TaskRecord) -> None:
        """A task that was leased or running when fleetd stopped: finished if its worker
        ended, followed again if it runs (or its holder was not heard from yet: then its
        lease decides), retried if it is gone."""
        slot = self._slot(task.member)
        if slot is None or slot.task is not None:
            run.move(task, "queued")
            self._queue(run, task)
            return
        slot.task = task
        self._busy += 1
        held = self.holders.index.live.get(CLUSTER)
        status = held.statuses.get(slot.member) if held is not None else None
        ours = status is not None and _is_attempts(status, task)
        if ours and status is not None and status.state in _ENDED:
            self._soon(self._attempt_ended, run, slot, task, status, "")
        elif held is not None and (status is None or ours):
            spec = run.specs[task.task_id]
            now = time.time()
            slot.last_heartbeat = now
            slot.lease_deadline = now + slot.worker.lease_seconds
            slot.timeout_at = task.started_at + spec.timeout_seconds if spec.timeout_seconds else 0
            slot.running = task.state == "running"
            slot.launched = True
            self._arm(run, task, slot)
            log.info("task_taken_up", run=run.run.id, task=task.task_id, member=slot.member)
        else:
            self.attempt_lost(run, slot, "its worker was gone when fleetd started")

    # -- dispatch ----------------------------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    async def _dispatch_forever(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            self._dispatch()

    def _dispatch(self) -> None:
        """Lease the best queued tasks (priority, then age) to free slots while workers may
        start: a task no free slot of its run can take waits, others go past it."""
        if self.draining:
            return
        while self._busy < self.max_workers:
            best: tuple[tuple[int, float, int, str], RunState] | None = None
            for run in self._active.values():
                head = self._head(run)
                if head is not None and (best is None or head < best[0]):
                    best = (head, run)
            if best is None:
                return
            head, run = best
            _take(run.ready, head)
            task = run.tasks[head[3]]
            slot = run.free_slot(run.specs[task.task_id])
            assert slot is not None
            self._lease(run, task, slot)

    def _head(self, run: RunState) -> tuple[int, float, int, str] | None:
        """The run's best queued task that one of its free slots can take now."""
        if run.cancelling or run.run.status not in {"running", "queued"}:
            return None
        skipped = []
        head = None
        while run.ready:
            entry = run.ready[0]
            task = run.tasks.get(entry[3])
            if task is None or task.state != "queued":
                heapq.heappop(run.ready)
                continue
            if run.free_slot(run.specs[task.task_id]) is not None:
                head = entry
                break
            skipped.append(heapq.heappop(run.ready))
            if not any(slot.task is None for slot in run.slots):
                break
        for entry in skipped:
            heapq.heappush(run.ready, entry)
        return head

    def _queue(self, run: RunState, task: TaskRecord) -> None:
        if task.not_before > time.time():
            self._push_timer(
                ("backoff", run.run.id, task.task_id, task.attempt_id), task.not_before
            )
            return
        entry = (-task.priority, task.enqueued_at, next(self._order), task.task_id)
        heapq.heappush(run.ready, entry)
        self.kick()

    def _lease(self, run: RunState, task: TaskRecord, slot: Slot) -> None:
        task.attempts += 1
        run.move(task, "leased")
        task.attempt_id = attempt_id(run.run.id, task.task_id, task.attempts)
        task.worker_id = slot.worker.id
        task.member = slot.member
        task.reported = None
        task.error = ""
        slot.task = task
        slot.ending = ""
        slot.running = False
        slot.launched = False
        slot.artifacts = []
        self._busy += 1
        self._soon(self._start_attempt, run, task, slot)
        if run.run.status == "queued":  # written with the lease, once the worker is on its way
            run.run = msgspec.structs.replace(run.run, status="running", updated_at=_now())
            run.events.enqueue([], [self._run_record(run.run)])

    async def _start_attempt(self, run: RunState, task: TaskRecord, slot: Slot) -> None:
        """Start the worker, then write its lease with its `running` (one commit, not two): at
        least once allows a worker that a crash before the write forgets (its slot is started
        afresh after the restart), and one whose lease cannot be written is stopped."""
        spec = run.specs[task.task_id]
        now = time.time()
        task.started_at = now
        slot.last_heartbeat = now
        slot.lease_deadline = now + slot.worker.lease_seconds
        slot.timeout_at = now + spec.timeout_seconds if spec.timeout_seconds else 0.0
        mine = task.attempt_id
        try:
            workspace, instructions = self._prepare_files(run.run.id, spec, task.attempts)
            log_path = member_log_path(self.holders.index.runtime_dir(CLUSTER), slot.member)
            task.log_offset = _size(log_path)
            leased = self._enqueue(
                run,
                task,
                [
                    Leased(
                        **self._envelope(run, task), lease_expires_at=timestamp(slot.lease_deadline)
                    ),
                    Starting(**self._envelope(run, task)),
                ],
            )
            member = MemberSpec(
                name=slot.member,
                command=[
                    *slot.worker.command,
                    *worker_flags(
                        run_id=run.run.id,
                        task_id=task.task_id,
                        attempt_id=task.attempt_id,
                        title=spec.name,
                        workspace=workspace,
                        instructions_file=instructions,
                    ),
                ],
                cwd=workspace,
                env={**slot.worker.env, "FLEET_SOCKET": self.socket_path},
                stop_timeout=5.0,
            )
            self._arm(run, task, slot)
            status = await self.holders.run_member(CLUSTER, member)
            slot.launched = slot.task is task
        except FleetError as exc:
            if slot.task is task and task.attempt_id == mine:
                self.attempt_lost(run, slot, f"cannot start: {exc.message}")
            return
        except OSError as exc:
            if slot.task is task and task.attempt_id == mine:
                self.attempt_lost(run, slot, f"cannot start: {exc.strerror or exc}")
            return
        ours = slot.task is task and task.attempt_id == mine
        if ours and status.state == MemberState.ERROR and not _is_attempts(status, task):
            self.attempt_lost(run, slot, status.error or "cannot start")
            return
        self.member_changed(run, slot, status)
        try:
            await self._committed(run, leased)
        except Exception as exc:  # the store's failure, whatever its kind
            if slot.task is task and task.attempt_id == mine:
                why = "cancelled" if run.cancelling else f"cannot start: {exc}"
                await self._stop_attempt(run, task, slot, why)

    def _prepare_files(self, run_id: str, spec: TaskSpec, attempt: int) -> tuple[str, str]:
        """The task's workspace, made when its run was submitted and again for each later
        attempt (a restart, or a hand, may have removed it), and its instructions file."""
        workspace = spec.workspace or self._own_workspace(run_id, spec.id)
        if attempt > 1 and not spec.workspace:
            self._make_workspaces(run_id, [spec.id])
        return workspace, self._write_instructions(run_id, spec)

    def _make_workspaces(self, run_id: str, task_ids: Sequence[str]) -> None:
        """The workspaces fleetd makes for tasks without one; never through a link."""
        with (
            self.state.subdir("runs") as runs,
            runs.subdir(run_id) as run_dir,
            run_dir.subdir("workspaces") as workspaces,
        ):
            for task_id in task_ids:
                workspaces.make_subdir(task_id)

    def _write_instructions(self, run_id: str, spec: TaskSpec) -> str:
        """The task's instructions, a copy of its spec's for its worker, written as each
        attempt starts into the runtime directory, and removed with its run's end: a file
        per task made on the state disk at the submit cost up to a millisecond each where
        an ext4 file system has no journal (it scans its recently deleted inodes)."""
        with self.runtime.subdir(INSTRUCTIONS) as tasks, tasks.subdir(run_id) as run_dir:
            name = f"{spec.id}.md"
            run_dir.write_new(name, spec.instructions.encode())
            return run_dir.join(name)

    def _instruction_runs(self) -> list[str]:
        try:
            with self.runtime.subdir(INSTRUCTIONS, create=False) as tasks:
                return tasks.names()
        except FileNotFoundError:
            return []

    def _remove_instructions(self, run_ids: Iterable[str]) -> None:
        """The instructions of runs that ended (their workers with them); never through a
        link. A failure is logged: the files are a copy, and fleetd goes on."""
        try:
            with self.runtime.subdir(INSTRUCTIONS, create=False) as tasks:
                for run_id in run_ids:
                    tasks.remove_tree(run_id)
        except FileNotFoundError:
            pass
        except (OSError, FleetError) as exc:
            log.warning("task_instructions_not_removed", error=str(exc))

    def _arm(self, run: RunState, task: TaskRecord, slot: Slot) -> None:
        self._push_timer(("lease", run.run.id, task.task_id, task.attempt_id), slot.lease_deadline)
        if slot.timeout_at:
            self._push_timer(
                ("timeout", run.run.id, task.task_id, task.attempt_id), slot.timeout_at
            )

    # -- following attempts ------------------------------------------------------------------

    def _add_slots(self, run: RunState) -> None:
        for slot in run.slots:
            self.slots[slot.member] = (run, slot)
        self._active[run.run.id] = run

    def _slot(self, member: str) -> Slot | None:
        """A live run's slot by member name (an ended run's slots are nobody's)."""
        found = self.slots.get(member)
        return found[1] if found is not None else None

    def member_changed(self, run: RunState, slot: Slot, status: MemberStatus) -> None:
        if slot.task is None or not _is_attempts(status, slot.task):
            return
        task = slot.task
        if status.state == MemberState.RUNNING and not slot.running:
            slot.running = True
            if task.state == "leased":
                run.move(task, "running")
            running = self._enqueue(run, task, [Running(**self._envelope(run, task))])
            self._soon(self._committed, run, running)  # queued now: after the lease, in order
        elif status.state in _ENDED:
            self._soon(self._attempt_ended, run, slot, task, status, "")

    def attempt_lost(self, run: RunState, slot: Slot, reason: str) -> None:
        """The attempt ended without an exit to read: failed with `reason`."""
        self._soon(self._attempt_ended, run, slot, slot.task, None, reason)

    async def _attempt_ended(
        self,
        run: RunState,
        slot: Slot,
        task: TaskRecord | None,
        status: MemberStatus | None,
        lost: str,
    ) -> None:
        """`task`'s attempt on `slot` ended (with `status`, else `lost` says why): once,
        whoever else heard of its end."""
        if task is None or slot.task is not task:
            return
        slot.task = None  # once: a second push of the same end finds the slot free
        self._busy -= 1
        exit_code = status.exit_code if status is not None else None
        log_path = member_log_path(self.holders.index.runtime_dir(CLUSTER), slot.member)
        result = result_line(log_path, task.log_offset)  # its last RESULT_WINDOW bytes at most
        reported = task.reported or result
        why = slot.ending or lost or _failure(status, reported)
        try:
            if slot.ending == "cancelled":
                ended = self._cancelled(run, task, "cancel")
            elif why:
                ended = self._failed(run, task, slot, why, exit_code)
            else:
                ended = await self._succeeded(run, task, slot, exit_code, reported)
            self.kick()  # the slot is free: dispatch goes on while the end is written
            await self._committed(run, ended)
        finally:  # the run ends once its last events are durable (a full disk waits)
            self._release_idle()
            self._finish_if_done(run)
            settled, run.settled = run.settled, anyio.Event()
            settled.set()
            self.kick()

    async def _succeeded(
        self,
        run: RunState,
        task: TaskRecord,
        slot: Slot,
        exit_code: int | None,
        reported: ResultMessage | None,
    ) -> Pending:
        spec = run.specs[task.task_id]
        workspace = spec.workspace or self._own_workspace(run.run.id, spec.id)
        if reads_files(spec.scorer):
            verdict = await anyio.to_thread.run_sync(score, spec.scorer, workspace, exit_code)
        else:
            verdict = score(spec.scorer, workspace, exit_code)
        self._stale_since.pop((run.run.id, task.task_id), None)
        run.move(task, "done" if verdict.result is not None else "scoring")
        task.result = verdict.result
        receipt = self._receipt(
            run=run, task=task, slot=slot, verdict=verdict, exit_code=exit_code, reported=reported
        )
        summary = reported.summary if reported is not None and reported.summary else None
        log.info("task_done", run=run.run.id, task=task.task_id, result=task.result)
        return self._enqueue(
            run,
            task,
            [Completed(**self._envelope(run, task), exit_code=exit_code, summary=summary)],
            [Put(records.receipt_key(run.run.id, task.task_id), _encode(receipt))],
        )

    def _failed(
        self, run: RunState, task: TaskRecord, slot: Slot, why: str, exit_code: int | None
    ) -> Pending:
        spec = run.specs[task.task_id]
        policy = spec.retry_policy or DEFAULT_RETRY
        task.error = why
        self._alert_on_attempts(run, task, why)
        if not policy.exhausted(task.attempts):
            run.move(task, "queued")
            task.not_before = time.time() + policy.backoff(task.attempts)
            retried = self._enqueue(
                run,
                task,
                [
                    Failed(**self._envelope(run, task), reason=why, recoverable=True),
                    Queued(
                        **self._envelope(run, task),
                        extra={"not_before": timestamp(task.not_before)},
                    ),
                ],
            )
            log.info(
                "task_retried",
                run=run.run.id,
                task=task.task_id,
                reason=why,
                attempts=task.attempts,
            )
            self._queue(run, task)
            return retried
        run.move(task, "failed")
        task.result = "timeout" if slot.ending == "timeout" else "fail"
        receipt = self._receipt(
            run=run,
            task=task,
            slot=slot,
            verdict=Verdict(task.result, why),
            exit_code=exit_code,
            reported=task.reported,
        )
        log.info(
            "task_failed", run=run.run.id, task=task.task_id, reason=why, attempts=task.attempts
        )
        return self._enqueue(
            run,
            task,
            [Failed(**self._envelope(run, task), reason=why)],
            [Put(records.receipt_key(run.run.id, task.task_id), _encode(receipt))],
        )

    def _cancelled(self, run: RunState, task: TaskRecord, by: str) -> Pending:
        run.move(task, "cancelled")
        return self._enqueue(run, task, [Cancelled(**self._envelope(run, task), cancelled_by=by)])

    def _receipt(
        self,
        *,
        run: RunState,
        task: TaskRecord,
        slot: Slot,
        verdict: Verdict,
        exit_code: int | None,
        reported: ResultMessage | None,
    ) -> Receipt:
        value = 1.0 if verdict.result == "pass" else 0.0
        return Receipt(
            run_id=run.run.id,
            task_id=task.task_id,
            worker_id=task.worker_id,
            completed_at=_now(),
            result=verdict.result or "skip",
            artifacts=list(slot.artifacts),
            score=Score(value=value, max=1.0, notes=verdict.notes or None),
            attempt_id=task.attempt_id,
            attempts=task.attempts,
            exit_code=exit_code,
            outcome=reported,
            pending=verdict.result is None,
        )

    def _own_workspace(self, run_id: str, task_id: str) -> str:
        return os.path.join(self.state.path, "runs", run_id, "workspaces", task_id)

    def _release_idle(self) -> None:
        if self._busy == 0:
            self._idle.set()
            self._idle = anyio.Event()

    def _finish_if_done(self, run: RunState) -> None:
        """A run whose every task ended is completed (failed if any task did not pass); its
        slots join those of ended runs."""
        if run.run.status in RUN_ENDED:
            return
        if run.unfinished():
            return
        passed = all(
            t.result in ("pass", "skip") for t in run.tasks.values() if t.state != "cancelled"
        )
        cancelled = any(t.state == "cancelled" for t in run.tasks.values())
        status = "cancelled" if cancelled else "completed" if passed else "failed"
        now = _now()
        run.run = msgspec.structs.replace(run.run, status=status, updated_at=now, completed_at=now)
        for slot in run.slots:
            self.slots.pop(slot.member, None)
            self._ended_slots.append(slot.member)
        del self._active[run.run.id]
        self._soon(self._end_run, run)

    async def _end_run(self, run: RunState) -> None:
        await self._write_run(run)
        await anyio.to_thread.run_sync(self._remove_instructions, [run.run.id])
        log.info("run_ended", run=run.run.id, status=run.run.status, tasks=run.counts())
        while len(self._ended_slots) > KEPT_ENDED:
            member = self._ended_slots.popleft()
            try:
                await self.holders.remove_named(CLUSTER, member)
            except FleetError as exc:
                log.warning("task_slot_not_removed", member=member, error=exc.message)

    async def _write_run(self, run: RunState) -> None:
        """The run's record, in order after what its log was given before (and as patient)."""
        counts = run.counts() if run.run.completed_at else {}
        await run.events.append([], [self._run_record(run.run, counts)])

    def _run_record(self, run: Run, counts: dict[str, int] | None = None) -> Put:
        record = RunRecord(run=run, home=self.home, counts=counts or {})
        return Put(records.index_key(run.id), _encode(record))

    # -- timers ------------------------------------------------------------------------------

    def _push_timer(self, timer: Timer, deadline: float) -> None:
        if self._timers.push(timer, deadline):
            self._alarm.wake()

    def _deadline_of(self, timer: Timer) -> float | None:
        kind, run_id, task_id, attempt = timer
        run = self.runs.get(run_id)
        task = run.tasks.get(task_id) if run is not None else None
        if run is None or task is None or (kind != "escalate" and task.attempt_id != attempt):
            return None
        if kind == "backoff":
            return task.not_before if task.state == "queued" else None
        if kind == "escalate":
            return self._escalation_due(run, task)
        slot = self._slot(task.member)
        if slot is None or slot.task is not task or slot.ending:
            return None
        return slot.lease_deadline if kind == "lease" else slot.timeout_at

    async def _timers_forever(self) -> None:
        while True:
            await self._alarm.sleep_until(self._timers.next_deadline())
            for kind, run_id, task_id, _ in self._timers.pop_due(time.time()):
                run = self.runs[run_id]
                task = run.tasks[task_id]
                if kind == "backoff":
                    task.not_before = 0.0
                    self._queue(run, task)
                    continue
                if kind == "escalate":
                    self._alert_on_stale(run, task)
                    continue
                slot = self._slot(task.member)
                assert slot is not None
                self._soon(
                    self._stop_attempt, run, task, slot, "stale" if kind == "lease" else "timeout"
                )

    async def _stop_attempt(self, run: RunState, task: TaskRecord, slot: Slot, why: str) -> None:
        if slot.task is not task or slot.ending:
            return
        slot.ending = why
        if why == "stale":
            self._went_stale(run, task)
            stale = Stale(
                **self._envelope(run, task), last_heartbeat_at=timestamp(slot.last_heartbeat)
            )
            await self._committed(run, self._enqueue(run, task, [stale]))
        log.info("task_stopping", run=run.run.id, task=task.task_id, why=why)
        try:
            status = await self.holders.stop_named(f"{CLUSTER}/{slot.member}")
        except FleetError as exc:
            log.warning("task_stop_failed", run=run.run.id, task=task.task_id, error=exc.message)
            self.attempt_lost(run, slot, why)
            return
        if slot.task is task and not _is_attempts(status, task):
            self.attempt_lost(run, slot, why)  # its worker never ran: no exit will come

    # -- alerts ----------------------------------------------------------------------------

    def _alert_on_attempts(self, run: RunState, task: TaskRecord, why: str) -> None:
        """The task's alert policy fires once, as its `after_attempts`th attempt fails."""
        policy = run.specs[task.task_id].alert_policy
        if policy is None or policy.after_attempts is None:
            return
        if task.attempts == policy.after_attempts:
            alert = task_alert(
                run.run.id,
                task.task_id,
                reason="attempts",
                attempts=task.attempts,
                detail=why,
                now=time.time(),
            )
            self.alerter.fire(policy, alert)

    def _went_stale(self, run: RunState, task: TaskRecord) -> None:
        """From its first stale worker on, the task is watched for `after_minutes_stale`."""
        key = (run.run.id, task.task_id)
        if key in self._stale_since:
            return
        self._stale_since[key] = time.time()
        due = self._escalation_due(run, task)
        if due is not None:
            self._push_timer(("escalate", run.run.id, task.task_id, ""), due)

    def _escalation_due(self, run: RunState, task: TaskRecord) -> float | None:
        since = self._stale_since.get((run.run.id, task.task_id))
        policy = run.specs[task.task_id].alert_policy
        if since is None or policy is None or policy.after_minutes_stale is None:
            return None
        return since + policy.after_minutes_stale * 60

    def _alert_on_stale(self, run: RunState, task: TaskRecord) -> None:
        policy = run.specs[task.task_id].alert_policy
        if policy is None or policy.after_minutes_stale is None:
            return
        minutes = policy.after_minutes_stale
        alert = task_alert(
            run.run.id,
            task.task_id,
            reason="stale",
            attempts=task.attempts,
            detail=f"no worker of it heartbeat for {minutes:g} minutes",
            now=time.time(),
        )
        self.alerter.fire(policy, alert)

    async def _escalated(self, alert: Alert, channel: str, alert_id: str) -> None:
        """A delivered alert is an `escalated` event of its task."""
        run = self.runs.get(alert.run_id)
        task = run.tasks.get(alert.task_id) if run is not None else None
        if run is None or task is None:
            return
        envelope = self._envelope(run, task)
        escalated = Escalated(**envelope, channel=channel, alert_id=alert_id)
        await self._committed(run, self._enqueue(run, task, [escalated]))

    # -- writing -----------------------------------------------------------------------------

    def _envelope(self, run: RunState, task: TaskRecord) -> Envelope:
        return {
            "seq": 0,
            "run_id": run.run.id,
            "worker_id": task.worker_id,
            "task_id": task.task_id,
            "timestamp": _now(),
        }

    def _enqueue(
        self,
        run: RunState,
        task: TaskRecord,
        events: list[WorkerEvent],
        ops: list[Operation] | None = None,
        *,
        record: bool = True,
    ) -> Pending:
        """`events` with the task's record as it is now (unless `record` is False: the event
        changed nothing it keeps), in the run's order from now, to be written in one
        transaction (`_committed` waits for it)."""
        put = [Put(records.task_key(run.run.id, task.task_id), _encode(task))] if record else []
        return run.events.enqueue(events, [*put, *(ops or ())])

    async def _committed(self, run: RunState, pending: Pending) -> None:
        """`pending` written (with whatever else of its run waits for the next write)."""
        try:
            await run.events.written(pending)
        finally:
            self._events_appended()

    def _events_appended(self) -> None:
        """Wake the event_list long polls."""
        appended, self._any_event = self._any_event, anyio.Event()
        appended.set()

    # -- ops ---------------------------------------------------------------------------------

    async def submit(self, request: RunSubmit, peer: Peer) -> RunResult:
        def parse() -> RunSpec:
            return parse_run_file(
                request.text, source=request.source, fmt=request.format, directory=request.directory
            )

        if len(request.text) <= PARSED_INLINE:
            spec = parse()
        else:
            spec = await anyio.to_thread.run_sync(parse)
        number = await self._next_number()
        run_id = f"run-{number}"
        _check_dispatchable(spec, run_id)
        own = [task.id for task in spec.task_specs if not task.workspace]
        if own:
            await anyio.to_thread.run_sync(self._make_workspaces, run_id, own)
        now = _now()
        run = Run(
            id=run_id,
            name=spec.name,
            status="pending",
            created_at=now,
            worker_specs=spec.worker_specs,
            labels=spec.labels,
        )
        wall = time.time()
        tasks = {
            t.id: TaskRecord(task_id=t.id, priority=t.priority, enqueued_at=wall)
            for t in spec.task_specs
        }
        state = RunState(
            run,
            {t.id: t for t in spec.task_specs},
            tasks,
            EventLog(self.store, run_id, 0, patient=False),  # no_space fails the submit
            _slots(run),
        )
        if 3 * len(tasks) + 1 <= WRITE_CHUNK:
            await self._submit_at_once(state, now)
        else:
            await self._write_in_steps(state, now)
            state.events.patient = True
            self._take_on(state)
            await anyio.lowlevel.checkpoint()  # its first workers' starts go out, before this
        self._events_appended()  # answer and its log line
        log.info(
            "run_submitted",
            run=run_id,
            name=spec.name,
            tasks=len(tasks),
            workers=len(spec.worker_specs),
        )
        return RunResult(outcome=Outcome.ACQUIRED, run=state.summary())

    def _take_on(self, state: RunState) -> None:
        """The submitted run's tasks queued, and dispatched."""
        self._add_run(state)
        self._add_slots(state)
        for task in state.tasks.values():
            self._queue(state, task)
        self._dispatch()

    async def _submit_at_once(self, state: RunState, now: str) -> None:
        """A small run: its record, tasks and queued events in one transaction, which its
        first workers do not wait for (that write was a millisecond and more of a task's
        dispatch latency on etcd). They start before their run is durable, as a worker does
        before its lease is: fleetd killed meanwhile leaves workers of a run the store does
        not have, which start-up stops (_stop_strays). A failed write takes the run back."""
        run_id = state.run.id
        state.run = msgspec.structs.replace(state.run, status="queued")
        written = state.events.enqueue(
            [_queued(run_id, task_id, now) for task_id in state.tasks],
            [self._run_record(state.run), *self._task_writes(state)],
        )
        self._take_on(state)
        with anyio.CancelScope(shield=True):  # the run ends up kept or taken back, not neither
            try:
                await anyio.lowlevel.checkpoint()  # its first workers' starts go out
                await state.events.written(written)
            except Exception:
                await self._withdraw(state)
                raise
        state.events.patient = True

    async def _withdraw(self, run: RunState) -> None:
        """A run whose submit was not written is forgotten once the workers it started meanwhile
        stopped: their leases, written after the submit, fail with it (fleetd.tasks.events),
        and each start stops its worker then (_start_attempt), as a cancel would."""
        run.cancelling = True
        run.run = msgspec.structs.replace(run.run, status="cancelled")
        self.runs.pop(run.run.id, None)
        self._active.pop(run.run.id, None)
        self._in_order = None
        with anyio.move_on_after(CANCEL_WAIT):
            while any(slot.task is not None for slot in run.slots):
                await run.settled.wait()
        for slot in run.slots:
            self.slots.pop(slot.member, None)
            self._ended_slots.append(slot.member)
        await anyio.to_thread.run_sync(self._remove_instructions, [run.run.id])
        log.warning("run_withdrawn", run=run.run.id, reason="its submit was not written")

    async def _write_in_steps(self, state: RunState, now: str) -> None:
        """A run too big for one transaction: its record says `pending` until every part is
        written (a restart removes a pending run)."""
        run_id = state.run.id
        await self.store.txn((), [self._run_record(state.run)])
        writes = self._task_writes(state)
        for start in range(0, len(writes), WRITE_CHUNK):
            await self.store.txn((), writes[start : start + WRITE_CHUNK])
        ids = list(state.tasks)
        for start in range(0, len(ids), WRITE_CHUNK // 2):
            chunk = ids[start : start + WRITE_CHUNK // 2]
            await state.events.append([_queued(run_id, task_id, now) for task_id in chunk])
        state.run = msgspec.structs.replace(state.run, status="queued")
        await self.store.txn((), [self._run_record(state.run)])

    def _task_writes(self, state: RunState) -> list[Operation]:
        """Each task's spec and record."""
        run_id = state.run.id
        return [
            *(Put(records.spec_key(run_id, t.id), _encode(t)) for t in state.specs.values()),
            *(Put(records.task_key(run_id, t.task_id), _encode(t)) for t in state.tasks.values()),
        ]

    async def _next_number(self) -> int:
        while True:
            kv = await self.store.get(records.NEXT_KEY)
            last = int(kv.value) if kv is not None else 0
            guard = (
                Compare(records.NEXT_KEY, "mod", "==", kv.mod_revision)
                if kv is not None
                else Compare(records.NEXT_KEY, "create", "==", 0)
            )
            result = await self.store.txn([guard], [Put(records.NEXT_KEY, str(last + 1).encode())])
            if result.succeeded:
                return last + 1

    def list_runs(self, request: RunListRequest, peer: Peer) -> RunList:
        runs = reversed(self._ordered_runs())
        return RunList(runs=[r.summary() for r in runs], draining=self.draining)

    def show(self, request: RunShow, peer: Peer) -> RunDetail:
        run = self._run(request.run)
        return RunDetail(run=run.run, summary=run.summary())

    def list_tasks(self, request: TaskListRequest, peer: Peer) -> EncodedTaskList:
        """A page of views (kept encoded: fleetd.tasks.views), up to `limit` and PAGE_BYTES;
        `next` when a task is left."""
        limit = request.limit
        if not 1 <= limit <= MAX_TASK_PAGE:
            raise InvalidRequest(f"a page holds 1 to {MAX_TASK_PAGE} tasks, not {limit}")
        runs = [self._run(request.run)] if request.run else self._ordered_runs()
        if request.table:
            return self._table(request, runs)
        if request.cells:
            return self._cells_page(request, runs)
        wanted = set(request.states)
        page: list[msgspec.Raw] = []
        size = 0
        last = ""
        self._views.forget_but(self.runs)
        for run, start in self._tasks_after(runs, request.after, qualified=not request.run):
            records = list(run.tasks.values())
            running = [slot.task for slot in run.slots if slot.task is not None]
            views = self._views.of_run(run.run.id, records, running, partial(self._view, run))
            chosen: Sequence[int] = range(start, len(records))
            if wanted:
                chosen = [at for at in chosen if records[at].state in wanted]
            offered = [views[at] for at in chosen] if wanted else views[start:]
            taken, size = fill(page, offered, limit, size)
            if taken:
                last = self._cursor(request, run, records[chosen[taken - 1]])
            if taken < len(chosen):
                return EncodedTaskList(tasks=page, next=last)
        return EncodedTaskList(tasks=page)

    def _table(self, request: TaskListRequest, runs: list[RunState]) -> EncodedTaskList:
        """The table of every task asked for when it fits one answer, else the first page of
        their cells. Made here, it costs `fleetctl tasks list` one read and one write: the
        cells of 10,000 tasks took a new process longer to split and pad than to start. A
        run's whole table is kept while its tasks stay as they are (fleetd.tasks.views)."""
        make = partial(self._made_table, request, runs)
        if request.run and not request.states and not request.after:
            self._views.forget_but(self.runs)
            table = self._views.table_of(request.run, list(runs[0].tasks.values()), make)
        else:
            table = make()
        return EncodedTaskList(table=table) if table else self._cells_page(request, runs)

    def _made_table(self, request: TaskListRequest, runs: list[RunState]) -> str:
        """The table of every task asked for, or "" when it does not fit one answer."""
        wanted = set(request.states)
        now = time.time()
        columns: list[list[str]] = [[] for _ in range(TASK_CELLS)]
        for run, start in self._tasks_after(runs, request.after, qualified=not request.run):
            records = list(run.tasks.values())[start:]
            if wanted:
                records = [task for task in records if task.state in wanted]
            for column, more in zip(columns, cells_of(records, run.run.id, now), strict=True):
                column.extend(more)
        if sum(len("".join(column)) for column in columns) > PAGE_BYTES:
            return ""
        table = tasks_table(columns)
        return table if len(_encode(table)) <= PAGE_BYTES else ""  # a newline is two bytes

    def _cells_page(self, request: TaskListRequest, runs: list[RunState]) -> EncodedTaskList:
        """list_tasks' page of cells (protocol.runs.TaskList), up to `limit` and PAGE_BYTES."""
        wanted = set(request.states)
        now = time.time()
        cells: list[list[str]] = [[] for _ in range(TASK_CELLS)]
        count = size = 0
        last = ""
        for run, start in self._tasks_after(runs, request.after, qualified=not request.run):
            records = list(run.tasks.values())[start:]
            if wanted:
                records = [task for task in records if task.state in wanted]
            offered = cells_of(records[: request.limit - count], run.run.id, now)
            total = sum(len("".join(column)) + 3 * len(column) for column in offered)
            if size + total <= PAGE_BYTES:  # all fit: no task's size needed
                taken, size = len(offered[0]), size + total
            else:
                ends = list(accumulate(cell_sizes(offered), initial=size))
                taken = max(bisect_right(ends, PAGE_BYTES) - 1, 1 if not count and records else 0)
                size = ends[taken]
            for column, more in zip(cells, offered, strict=True):
                column.extend(more[:taken])
            count += taken
            if taken:
                last = self._cursor(request, run, records[taken - 1])
            if taken < len(records):
                return EncodedTaskList(cells=cells, next=last)
        return EncodedTaskList(cells=cells)

    @staticmethod
    def _cursor(request: TaskListRequest, run: RunState, task: TaskRecord) -> str:
        """The `after` that follows `task`."""
        return task.task_id if request.run else f"{run.run.id}/{task.task_id}"

    def _tasks_after(
        self, runs: list[RunState], after: str, *, qualified: bool
    ) -> Iterator[tuple[RunState, int]]:
        """Each of `runs` whose tasks follow `after`, with the position of the first of them."""
        run_id, _, task_id = after.rpartition("/") if qualified else ("", "", after)
        started = not after
        for run in runs:
            if not started and qualified and run.run.id != run_id:
                continue
            start = 0
            if not started:
                ids = list(run.tasks)
                start = ids.index(task_id) + 1 if task_id in run.tasks else len(ids)
                started = True
            yield run, start

    def _view(self, run: RunState, task: TaskRecord) -> TaskView:
        slot = self._slot(task.member)
        live = slot is not None and slot.task is task
        return TaskView(
            entry=InboxEntry(
                run_id=run.run.id,
                task_id=task.task_id,
                priority=task.priority,
                enqueued_at=self._views.stamp(task.enqueued_at),
                lease_deadline=timestamp(slot.lease_deadline) if live and slot else None,
                attempts=task.attempts,
            ),
            state=task.state,
            name=run.specs[task.task_id].name,
            worker_id=task.worker_id,
            attempt_id=task.attempt_id,
            member=task.member,
            last_heartbeat_at=timestamp(slot.last_heartbeat) if live and slot else "",
            not_before=timestamp(task.not_before) if task.not_before > time.time() else "",
            result=task.result,
            error=task.error,
        )

    def _add_run(self, state: RunState) -> None:
        self.runs[state.run.id] = state
        self._in_order = None

    def _ordered_runs(self) -> list[RunState]:
        """Oldest first (not to be changed): sorted again only once a run was added, as
        runs are listed far more often than submitted (a script polling `runs list`)."""
        if self._in_order is None:
            self._in_order = sorted(self.runs.values(), key=lambda r: _number(r.run.id))
        return self._in_order

    def _run(self, run_id: str) -> RunState:
        run = self.runs.get(run_id)
        if run is None:
            raise Absent(f"no run {run_id!r}", run=run_id)
        return run

    async def cancel(self, request: RunCancel, peer: Peer) -> RunResult:
        run = self._run(request.run)
        if run.run.status in RUN_ENDED:
            return RunResult(outcome=Outcome.ALREADY_RELEASED, run=run.summary())
        run.cancelling = True
        by = f"pid {peer.pid}"
        queued = [self._cancelled(run, t, by) for t in run.tasks.values() if t.state == "queued"]
        for pending in queued:  # a few writes, not one a task
            await self._committed(run, pending)
        stopping = [slot for slot in run.slots if slot.task is not None]
        async with anyio.create_task_group() as tg:
            for slot in stopping:
                assert slot.task is not None
                tg.start_soon(self._stop_attempt, run, slot.task, slot, "cancelled")
        for task in run.tasks.values():
            if task.state == "scoring":
                await self._committed(run, self._cancelled(run, task, by))
        self._finish_if_done(run)
        with anyio.move_on_after(CANCEL_WAIT):
            while run.run.status not in RUN_ENDED:
                await run.settled.wait()
        log.info("run_cancelled", run=run.run.id, by=peer.pid)
        return RunResult(outcome=Outcome.RELEASED, run=run.summary())

    async def events(self, request: EventList, peer: Peer) -> EventPage:
        with anyio.move_on_after(request.wait):
            while True:
                changed = self._any_event
                page = await self._page(request)
                if page.events or request.wait <= 0:
                    return page
                await changed.wait()
        return await self._page(request)

    async def _page(self, request: EventList) -> EventPage:
        runs = [self._run(request.run)] if request.run else self._ordered_runs()
        heads = {run.run.id: run.events.last_seq for run in runs}
        if request.from_now and not request.after:
            return EventPage(heads=heads)
        found: list[msgspec.Raw] = []
        for run in runs:
            after = request.after.get(
                run.run.id, 0 if not request.from_now else run.events.last_seq
            )
            if after >= run.events.last_seq:
                continue
            for data in await run.events.read(after, request.limit - len(found)):
                found.append(msgspec.Raw(data))
            if len(found) >= request.limit:
                break
        return EventPage(events=found, heads=heads)

    async def emit(self, request: EventEmit, peer: Peer) -> EmitResult:
        payloads = _emitted(request)
        run, task, slot = self._attempt(request.attempt_id)
        if slot is None:
            return EmitResult(
                outcome=Outcome.NOT_OWNED,
                message=f"attempt {request.attempt_id} is not task {task.task_id}'s current one "
                f"(it is {task.state}, attempt {task.attempt_id or 'none'})",
            )
        envelope = self._envelope(run, task)
        events = [_event_of(payload, envelope) for payload in payloads]
        kept: list[WorkerEvent] = []
        for event in events:
            if isinstance(event, Completed | Failed):
                if task.reported is not None:
                    continue
                task.reported = _reported(event)
            elif isinstance(event, Artifact):
                slot.artifacts.append(event.ref())
            kept.append(event)
        if any(isinstance(event, Heartbeat) for event in kept):
            now = time.time()
            slot.last_heartbeat = now
            slot.lease_deadline = max(slot.lease_deadline, now + slot.worker.lease_seconds)
        seq = 0
        if kept:
            keeps = any(isinstance(event, Completed | Failed) for event in kept)  # the record
            appended = self._enqueue(run, task, kept, record=keeps)  # keeps the result
            await self._committed(run, appended)
            seq = appended.seqs[-1]
        if len(kept) < len(events):
            return EmitResult(
                outcome=Outcome.ALREADY_ACQUIRED,
                seq=seq,
                message=f"attempt {task.attempt_id}'s result was reported already",
            )
        return EmitResult(outcome=Outcome.OK, seq=seq)

    def _attempt(self, attempt_id: str) -> tuple[RunState, TaskRecord, Slot | None]:
        """The run and task of `attempt_id`, and the slot it runs on while it is the task's
        current attempt (else None)."""
        parsed = parse_attempt_id(attempt_id)
        if parsed is None:
            raise InvalidRequest(f"invalid attempt id {attempt_id[:80]!r}: RUN/TASK/N")
        run_id, task_id, _ = parsed
        run = self._run(run_id)
        task = run.tasks.get(task_id)
        if task is None:
            raise Absent(f"no task {task_id!r} in run {run_id!r}")
        slot = self._slot(task.member)
        if task.attempt_id != attempt_id or slot is None or slot.task is not task:
            return run, task, None
        return run, task, slot

    async def receipts(self, request: ReceiptListRequest, peer: Peer) -> ReceiptList:
        runs = [self._run(request.run)] if request.run else self._ordered_runs()
        found: list[Receipt] = []
        for run in runs:
            kvs = await self.store.range(f"{records.RECEIPTS}{run.run.id}/")
            found.extend(_decode_receipt(kv.value) for kv in kvs)
        return ReceiptList(receipts=found)

    async def score_receipt(self, request: ReceiptScore, peer: Peer) -> ReceiptResult:
        run, task = self._find_task(request.task)
        kv = await self.store.get(records.receipt_key(run.run.id, task.task_id))
        if kv is None or task.state not in ("scoring", "done"):
            raise InvalidRequest(
                f"task {task.task_id} of {run.run.id} has no receipt to score (it is {task.state})"
            )
        receipt = _decode_receipt(kv.value)
        if not receipt.pending:
            if receipt.result == request.result:
                return ReceiptResult(outcome=Outcome.ALREADY_ACQUIRED, receipt=receipt)
            raise InvalidRequest(
                f"task {task.task_id} of {run.run.id} was scored {receipt.result} already"
            )
        value = 1.0 if request.result == "pass" else 0.0
        receipt = msgspec.structs.replace(
            receipt,
            result=request.result,
            pending=False,
            completed_at=_now(),
            score=Score(value=value, max=1.0, notes=request.notes or "scored by hand"),
        )
        run.move(task, "done")
        task.result = request.result
        receipt_put = Put(records.receipt_key(run.run.id, task.task_id), _encode(receipt))
        await self._committed(run, self._enqueue(run, task, [], [receipt_put]))
        self._finish_if_done(run)
        return ReceiptResult(outcome=Outcome.OK, receipt=receipt)

    def _find_task(self, name: str) -> tuple[RunState, TaskRecord]:
        run_id, _, task_id = name.rpartition("/")
        runs = [self._run(run_id)] if run_id else self._ordered_runs()
        found = [(run, run.tasks[task_id]) for run in runs if task_id in run.tasks]
        if not found:
            raise Absent(f"no task {name!r}")
        if len(found) > 1:
            names = ", ".join(f"{run.run.id}/{task_id}" for run, _ in found)
            raise InvalidRequest(f"task {task_id!r} is in more than one run: name one of {names}")
        return found[0]

    async def drain(self, request: Drain, peer: Peer) -> DrainResult:
        if request.resume:
            self.draining = False
            log.info("dispatch_resumed", by=peer.pid)
            self.kick()
            return DrainResult(draining=False, in_flight=self._busy)
        if not self.draining:
            log.info("dispatch_draining", by=peer.pid, in_flight=self._busy)
        self.draining = True
        with anyio.move_on_after(request.wait):
            while self._busy:
                await self._idle.wait()
        return DrainResult(draining=True, in_flight=self._busy)


async def _logging_failures(call: Callable[..., Awaitable[object]], *args: Any) -> None:
    try:
        await call(*args)
    except FleetError as exc:
        log.error("task_work_failed", work=call.__name__, error=exc.message, code=exc.code)


def _take(heap: list[tuple[int, float, int, str]], entry: tuple[int, float, int, str]) -> None:
    """Take `entry` out of `heap`: its head, or one behind tasks no free slot could take."""
    if heap[0] == entry:
        heapq.heappop(heap)
        return
    heap.remove(entry)
    heapq.heapify(heap)


def _slots(run: Run) -> list[Slot]:
    return [
        Slot(worker, f"{run.id}.{worker.id}.{n}")
        for worker in run.worker_specs
        for n in range(1, (worker.max_concurrent_tasks or 1) + 1)
    ]


def _check_dispatchable(spec: RunSpec, run_id: str) -> None:
    """What the run file's parser cannot know: which hosts this fleetd runs workers on, and
    whether every task has a worker that may take it."""
    for worker in spec.worker_specs:
        if not isinstance(worker.host, LocalHost):
            kind = type(worker.host).__name__.removesuffix("Host").lower()
            raise Unsupported(
                f"worker {worker.id!r}: host kind {kind!r} is not supported yet; "
                "fleetd runs local workers only",
                worker=worker.id,
            )
        for n in (1, worker.max_concurrent_tasks or 1):
            check_name(f"{run_id}.{worker.id}.{n}")
    for task in spec.task_specs:
        if not any(matches(worker, task) for worker in spec.worker_specs):
            raise InvalidRequest(
                f"task {task.id!r}: no worker has its capabilities {task.capabilities} "
                f"and labels {task.labels}",
                task=task.id,
            )


def _is_attempts(status: MemberStatus, task: TaskRecord) -> bool:
    """Whether `status` is of the attempt's own spawn, not of the slot's previous task."""
    return status.started_at is not None and status.started_at >= task.started_at


def _failure(status: MemberStatus | None, reported: ResultMessage | None) -> str:
    """Why the attempt failed, or "" if it succeeded."""
    if status is None:
        return "its worker was lost"
    if status.exit_code is None:
        return status.error or "its worker did not run"
    if status.exit_code != 0:
        return (
            f"exited with code {status.exit_code}"
            if status.exit_code > 0
            else (f"killed by signal {-status.exit_code}")
        )
    if reported is not None and reported.kind == "fail":
        return f"reported fail: {reported.summary}" if reported.summary else "reported fail"
    return ""


def _reported(event: Completed | Failed) -> ResultMessage:
    if isinstance(event, Completed):
        return ResultMessage(kind="success", summary=event.summary or "")
    return ResultMessage(kind="fail", summary=event.reason)


_EMITTABLE = msgspec.json.Decoder(WorkerEvent)


def _emitted(request: EventEmit) -> list[dict[str, object]]:
    """The payloads of `request`: its one event or its batch."""
    if bool(request.event) == bool(request.events):
        raise InvalidRequest("give an event or a batch of events (not both)")
    if len(request.events) > MAX_EMITTED:
        raise InvalidRequest(f"{len(request.events)} events: at most {MAX_EMITTED} a request")
    return request.events or [request.event]


def _event_of(payload: dict[str, object], envelope: Envelope) -> WorkerEvent:
    """A worker's event: its payload in the envelope fleetd fills (the payload cannot set
    the envelope's fields)."""
    state = payload.get("state")
    if state in ("queued", "leased", "starting", "stale", "restarted", "escalated", "cancelled"):
        raise InvalidRequest(f"event state {state!r} is fleetd's to report, not a worker's")
    try:
        return msgspec.convert({"event": {**payload, **envelope}}, _Carried).event
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid event: {str(exc).replace('$.event', '$')}") from None


class _Carried(msgspec.Struct, frozen=True):
    """A struct field of a union type: msgspec caches a struct's type information, not a bare
    union's, which convert() otherwise builds anew each call (30 times the cost)."""

    event: WorkerEvent


def _flag(argv: list[str], flag: str) -> str:
    """The value after the last `flag` in `argv` ("" without one)."""
    for index in range(len(argv) - 2, -1, -1):
        if argv[index] == flag:
            return argv[index + 1]
    return ""


def _queued(run_id: str, task_id: str, now: str) -> Queued:
    return Queued(seq=0, run_id=run_id, worker_id="", task_id=task_id, timestamp=now)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _number(run_id: str) -> int:
    _, _, number = run_id.rpartition("-")
    return int(number) if number.isdigit() else 0


def _now() -> str:
    return timestamp(time.time())
