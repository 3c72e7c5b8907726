"""`tasks list`'s pages, read without decoding every task of them.

A run of 10,000 tasks comes in pages of thousands, over a megabyte of JSON: decoding it
whole, then picking each row's cells out of dicts, took longer than the interpreter takes to
start. But fleetd writes each task as msgspec encodes protocol.runs.TaskView, fields in their
order and those at their defaults left out, so where no string holds an escape (a backslash)
one regular expression, run in C over a whole page, finds every task's run, id and state,
and what else its entry and its view hold: mostly nothing, for a task never run has no
attempts, worker, result or error. Only those others are decoded. A page laid out any other
way (escapes, a brace inside a string) is decoded whole, as the other fast commands decode
an answer; the rows are the same.
"""

from __future__ import annotations

import re

from fleetctl._fast.wire import _scan, fields, is_int, malformed

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

TASK_STATES = frozenset(("queued", "leased", "running", "scoring", "done", "failed", "cancelled"))
"""protocol.runs.TaskState's values (tests/test_fast.py holds the two together)."""
TASK_RESULTS = frozenset(("pass", "fail", "skip", "timeout"))
"""protocol.tasks.TaskResult's values."""

_TASK = re.compile(
    r'\{"entry":\{"run_id":"([^"]*)","task_id":"([^"]*)",([^}]*)\},"state":"([a-z]+)"([^}]*)\}'
)
"""A task as fleetd encodes it, without escapes: its run, its id, the rest of its entry
(priority, enqueued_at, …), its state, the rest of its view (name, …)."""
_GROUPS = 5
_ATTEMPTS = '"attempts":'
_PRINTED = ('"worker_id":', '"not_before":', '"result":', '"error":')
"""The keys of a view's rest that its row prints."""
_HEAD, _NEXT, _END = '{"tasks":[', '],"next":"', "]}"


class Page:
    """One answer: its tasks' JSON text (the array's, without brackets) and `next`; with
    `tasks` the tasks decoded, where the text was not read as fleetd lays it out."""

    __slots__ = ("next", "tasks", "text")

    def __init__(self, text: str, next: str, tasks: list[Any] | None = None) -> None:
        self.text = text
        self.next = next
        self.tasks = tasks


def page(result: str) -> Page:
    """The page of task_list result `result` (its JSON text)."""
    if "\\" not in result and result.startswith(_HEAD):
        if result.endswith(_END):
            return Page(result[len(_HEAD) : -len(_END)], "")
        at = result.rfind(_NEXT)
        cursor = result[at + len(_NEXT) : -2]
        if at > 0 and result.endswith('"}') and '"' not in cursor:
            return Page(result[len(_HEAD) : at], cursor)
    try:
        found = fields(result)
    except ValueError:
        raise malformed() from None
    tasks, text = found.get("tasks", ([], "[]"))
    cursor = found.get("next", ("", ""))[0]
    if not isinstance(tasks, list) or not isinstance(cursor, str):
        raise malformed()
    return Page(text[1:-1].strip(), cursor, tasks)


class Cells:
    """One answer asked for with `cells`: a list a column, and `next`; or, asked for with
    `table` too, the whole `table` (protocol.runs.TaskListRequest)."""

    __slots__ = ("cells", "next", "table")

    def __init__(self, cells: list[list[str]], next: str, table: str = "") -> None:
        self.cells = cells
        self.next = next
        self.table = table


_CELLS, _NEXT_CELLS, _TABLE = '{"cells":[', '","cells":[', '{"table":'
_COLUMNS = 7


def cells_page(result: str) -> Cells:
    """The page of task_list result `result` asked for with `cells`. Where no cell holds an
    escape, no quote is inside one: a column's cells are split at `","`, and the columns at
    `"],["`, each sequence found nowhere else (a count of the quotes checks it)."""
    if result.startswith(_TABLE):
        return _table(result)
    if "\\" not in result:
        found = _plain_cells(result)
        if found is not None:
            return found
    try:
        decoded = fields(result)
    except ValueError:
        raise malformed() from None
    cells = decoded.get("cells", ([], ""))[0]
    cursor = decoded.get("next", ("", ""))[0]
    if not isinstance(cursor, str) or not _columns(cells):
        raise malformed()
    return Cells(cells or [[] for _ in range(_COLUMNS)], cursor)


def _table(result: str) -> Cells:
    try:
        table = fields(result).get("table", (None, ""))[0]
    except ValueError:
        raise malformed() from None
    if not isinstance(table, str) or not table:
        raise malformed()
    return Cells([], "", table)


def _plain_cells(result: str) -> Cells | None:
    cursor, rest = "", ""
    if result.startswith('{"next":"'):
        cursor, _, rest = result[len('{"next":"') :].partition(_NEXT_CELLS)
    elif result.startswith(_CELLS):
        rest = result[len(_CELLS) :]
    body = rest[:-2]
    if not rest.endswith("]}") or '"' in cursor:
        return None
    if body == "[]" + ",[]" * (_COLUMNS - 1):
        return Cells([[] for _ in range(_COLUMNS)], cursor)
    if not (body.startswith('["') and body.endswith('"]')):
        return None
    columns = [column.split('","') for column in body[2:-2].split('"],["')]
    count = len(columns[0])
    if len(columns) != _COLUMNS or any(len(column) != count for column in columns):
        return None
    if body.count('"') != 2 * _COLUMNS * count:
        return None
    return Cells(columns, cursor)


def _columns(cells: object) -> bool:
    """Whether `cells` is seven equal columns of strings (or none at all)."""
    if not isinstance(cells, list) or (cells and len(cells) != _COLUMNS):
        return False
    lengths = {len(column) if isinstance(column, list) else -1 for column in cells}
    return (
        len(lengths) <= 1
        and -1 not in lengths
        and all(isinstance(cell, str) for column in cells for cell in column)
    )


def columns(each: Page) -> list[list[str]]:
    """The cells of a page's tasks, in the table's columns (protocol.tables.TASK_COLUMNS), as
    fleetctl.runs makes them of TaskViews."""
    found = _plain_columns(each.text) if each.tasks is None else None
    return _decoded_columns(_decoded(each)) if found is None else found


def _decoded(each: Page) -> list[Any]:
    if each.tasks is not None:
        return each.tasks
    text = f"[{each.text}]"
    try:
        tasks, end = _scan(text, 0)
    except (ValueError, StopIteration):
        raise malformed() from None
    if end != len(text):
        raise malformed()
    return tasks  # type: ignore[no-any-return]


def _plain_columns(text: str) -> list[list[str]] | None:
    """The columns of a page's tasks found by _TASK, or None when the page is not a
    sequence of them alone."""
    if not text:
        return [[] for _ in range(7)]
    parts = _TASK.split(text)
    count = len(parts) // (_GROUPS + 1)
    between = parts[_GROUPS + 1 : -1 : _GROUPS + 1]
    if parts[0] or parts[-1] or between.count(",") != count - 1:
        return None
    runs, ids, entries, states, views = (parts[at :: _GROUPS + 1] for at in range(1, 6))
    if not TASK_STATES.issuperset(states):
        raise malformed()
    attempts, workers, results, notes = ["0"] * count, ["-"] * count, ["-"] * count, [""] * count
    if _ATTEMPTS in "".join(entries) or _printed("".join(views)):
        for at, (entry, view) in enumerate(zip(entries, views, strict=True)):
            if _ATTEMPTS in entry or _printed(view):
                task = {"entry": _rest("," + entry), **_rest(view)}
                attempts[at], workers[at], results[at], notes[at] = _cells(task)
    return [runs, ids, states, attempts, workers, results, notes]


def _printed(view: str) -> bool:
    return any(key in view for key in _PRINTED)


def _rest(members: str) -> dict[str, Any]:
    """The members `,"key":value…` of an object, decoded."""
    if not members:
        return {}
    try:
        found, end = _scan("{" + members[1:] + "}", 0)
    except (ValueError, StopIteration):
        raise malformed() from None
    if end != len(members) + 1 or not isinstance(found, dict):
        raise malformed()
    return found


def _decoded_columns(tasks: list[Any]) -> list[list[str]]:
    table: list[list[str]] = [[] for _ in range(7)]
    for task in tasks:
        if not isinstance(task, dict) or not isinstance(entry := task.get("entry"), dict):
            raise malformed()
        run, tid, state = entry.get("run_id"), entry.get("task_id"), task.get("state")
        if not (
            isinstance(run, str)
            and isinstance(tid, str)
            and is_int(entry.get("priority"))
            and isinstance(entry.get("enqueued_at"), str)
            and state in TASK_STATES
        ):
            raise malformed()
        row = (run, tid, state, *_cells(task))
        for column, cell in zip(table, row, strict=True):
            column.append(cell)
    return table


def _cells(task: dict[str, Any]) -> tuple[str, str, str, str]:
    """ATTEMPTS, WORKER, RESULT and NOTE of a task (its fields at their defaults may be left
    out), as fleetctl.runs._tasks_table makes them."""
    attempts = task["entry"].get("attempts", 0)
    worker, result = task.get("worker_id", ""), task.get("result")
    error, retry = task.get("error", ""), task.get("not_before", "")
    if not (
        is_int(attempts)
        and isinstance(worker, str)
        and (result is None or result in TASK_RESULTS)
        and isinstance(error, str)
        and isinstance(retry, str)
    ):
        raise malformed()
    note = error or (f"retry after {retry}" if retry else "")
    return str(attempts), worker or "-", result or "-", note
