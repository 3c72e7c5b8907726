"""A run's tasks' views for task_list answers, encoded once and served again while they hold.

`fleetctl tasks list` reads every page of a run each time it runs: for 10,000 tasks, making
and encoding each view anew (its timestamps above all), even looking each one up in a loop,
cost fleetd some 10 to 50 ms a listing. A task's view is made of its record, and while a
worker slot runs it, of that slot (its lease deadline, its last heartbeat), and while its
retry waits, of the clock. So a run's views are kept, encoded, in the order of its tasks,
beside a copy of each record and the list of tasks its slots ran: while the records equal
their copies (one list comparison, which msgspec makes in C), the same tasks run and no
backoff has ended, they are served as they are, but those of running and waiting tasks, which
are made anew each time. The dispatcher changes records in place and never tells.
"""

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate

import msgspec

from fleetd.tasks.records import TaskRecord
from protocol import MAX_FRAME
from protocol.base import Message
from protocol.runs import TaskView
from protocol.tasks import timestamp

PAGE_BYTES = MAX_FRAME - 64 * 1024
"""Bytes of views one answer holds at most: the rest of a frame is for what surrounds them
(the response, `next`). A page of thousands of tasks with long names would not fit a frame."""


class EncodedTaskList(Message, frozen=True):
    """protocol.runs.TaskList whose tasks are encoded already: the same bytes on the wire."""

    tasks: list[msgspec.Raw] = msgspec.field(default_factory=list)
    next: str = ""
    cells: list[list[str]] = msgspec.field(default_factory=list)
    table: str = ""


class _Kept:
    """One run's views as last made: `records` the copies they were made of, `running` the
    tasks its slots ran then, `fresh` the positions of views made anew each time (running
    or waiting tasks), until `expires` (the first backoff's end)."""

    __slots__ = ("expires", "fresh", "records", "running", "views")

    def __init__(self) -> None:
        self.records: list[TaskRecord] = []
        self.views: list[msgspec.Raw] = []
        self.running: list[int] = []
        self.fresh: list[int] = []
        self.expires = 0.0


class _Table:
    """One run's table as last made, of `records` (copies), until `expires` (the first
    retry's wait to end: its note, "retry after …", goes then)."""

    __slots__ = ("expires", "records", "text")

    def __init__(self, records: list[TaskRecord], text: str, expires: float) -> None:
        self.records = records
        self.text = text
        self.expires = expires


class TaskViews:
    def __init__(self) -> None:
        self._runs: dict[str, _Kept] = {}
        self._tables: dict[str, _Table] = {}
        self._stamps: dict[float, str] = {}
        self._encode = msgspec.json.Encoder().encode

    def of_run(
        self,
        run_id: str,
        records: list[TaskRecord],
        running: list[TaskRecord],
        make: Callable[[TaskRecord], TaskView],
    ) -> list[msgspec.Raw]:
        """The views of run `run_id`'s tasks (`records`, in order; `running` those its slots
        run now), encoded; `make` makes one."""
        now = time.time()
        kept = self._runs.get(run_id)
        ran = [id(task) for task in running]
        if kept is None or kept.running != ran or now >= kept.expires or kept.records != records:
            kept = self._runs[run_id] = self._remade(kept, records, ran, make)
            return kept.views
        if not kept.fresh:
            return kept.views
        views = list(kept.views)
        for at in kept.fresh:
            views[at] = self._encoded(make(records[at]))
        return views

    def _remade(
        self,
        old: _Kept | None,
        records: list[TaskRecord],
        running: list[int],
        make: Callable[[TaskRecord], TaskView],
    ) -> _Kept:
        """The views made again, each from the old one where its record is unchanged."""
        kept = _Kept()
        kept.running = running
        kept.expires = float("inf")
        same = old.records if old is not None and len(old.records) == len(records) else []
        fresh = set(old.fresh) if old is not None else set()
        for at, record in enumerate(records):
            if same and at not in fresh and same[at] == record and id(record) not in running:
                view = old.views[at]  # type: ignore[union-attr]  # `same` says it is there
            else:
                made = make(record)
                view = self._encoded(made)
                if made.not_before or id(record) in running:
                    kept.fresh.append(at)
                    if made.not_before:
                        kept.expires = min(kept.expires, record.not_before)
            kept.views.append(view)
            kept.records.append(msgspec.structs.replace(record))
        return kept

    def table_of(self, run_id: str, records: list[TaskRecord], make: Callable[[], str]) -> str:
        """The table of run `run_id`'s tasks (`records`, in order), made by `make` again only
        once a record changed or a retry's wait ended: it is made of nothing else."""
        now = time.time()
        kept = self._tables.get(run_id)
        if kept is not None and now < kept.expires and kept.records == records:
            return kept.text
        waits = [task.not_before for task in records if task.not_before > now]
        copies = [msgspec.structs.replace(record) for record in records]
        kept = self._tables[run_id] = _Table(copies, make(), min(waits, default=float("inf")))
        return kept.text

    def forget_but(self, run_ids: object) -> None:
        """Drop the views and tables of the runs not in `run_ids` (a container of run ids)."""
        for run_id in [r for r in self._runs if r not in run_ids]:  # type: ignore[operator]
            del self._runs[run_id]
        for run_id in [r for r in self._tables if r not in run_ids]:  # type: ignore[operator]
            del self._tables[run_id]

    def _encoded(self, view: TaskView) -> msgspec.Raw:
        return msgspec.Raw(self._encode(view))

    def stamp(self, epoch: float) -> str:
        """protocol.tasks.timestamp of an enqueue time, remembered: a run's tasks are mostly
        enqueued at one moment, and formatting it costs more than the rest of a view."""
        text = self._stamps.get(epoch)
        if text is None:
            if len(self._stamps) >= 4096:
                self._stamps.clear()
            text = self._stamps[epoch] = timestamp(epoch)
        return text


TASK_CELLS = 7
"""Cells a task has in protocol.runs.TaskList's `cells`: run, task, state, attempts, worker,
result, note."""


def cells_of(records: Sequence[TaskRecord], run_id: str, now: float) -> list[list[str]]:
    """protocol.runs.TaskList's cells of `records`, a list a column."""
    return [
        [run_id] * len(records),
        [t.task_id for t in records],
        [t.state for t in records],
        [str(t.attempts) for t in records],
        [t.worker_id or "-" for t in records],
        [t.result or "-" for t in records],
        [
            t.error or (f"retry after {timestamp(t.not_before)}" if t.not_before > now else "")
            for t in records
        ],
    ]


def cell_sizes(cells: list[list[str]]) -> list[int]:
    """Each task's bytes in an answer (its cells, their quotes and commas; no escapes)."""
    return [
        sum(row) + 3 * len(cells)
        for row in zip(*(map(len, column) for column in cells), strict=True)
    ]


def fill(
    page: list[msgspec.Raw], views: list[msgspec.Raw], limit: int, size: int
) -> tuple[int, int]:
    """Add to `page` (of `size` bytes) the first of `views` that `limit` (tasks) and
    PAGE_BYTES let it hold, one at least if it is empty: how many, and the page's size."""
    room = views[: limit - len(page)]
    ends = list(accumulate(map(len, room), initial=size))
    fits = bisect_right(ends, PAGE_BYTES) - 1
    if fits == 0 and not page and room:
        fits = 1
    page += room[:fits]
    return fits, ends[fits]
