"""Members' status and runs' tasks as tables: shared by the click commands and the start-up
fast path (fleetctl._fast), so that the two print the same bytes."""

from __future__ import annotations

import time
from itertools import repeat

TYPE_CHECKING = False  # typing itself costs the fast path 3 ms
if TYPE_CHECKING:
    from typing import Any

COLUMNS = ("MEMBER", "STATE", "PID", "UPTIME", "RESTARTS", "ADDRESS", "ERROR")
LINGERING = "LINGERING"
"""A column before ERROR only when some member has processes left alive (its `lingering`)."""


def status_table(members: list[dict[str, Any]], now: float | None = None) -> str:
    """One row per member (JSON form: fields at their defaults may be missing), columns padded
    to their widest cell; "no members" for none. UPTIME is a running member's, as of `now`
    (wall clock, default: now)."""
    if not members:
        return "no members"
    now = time.time() if now is None else now
    rows: list[tuple[str, ...]] = [
        (
            f"{m['cluster']}/{m['name']}" if m.get("cluster") else m["name"],
            m["state"],
            str(m.get("pid") or "-"),
            uptime(m, now),
            str(m.get("restarts", 0)),
            m.get("address") or "-",
            m.get("error", ""),
        )
        for m in members
    ]
    rows.insert(0, COLUMNS)
    if any(m.get("lingering") for m in members):
        lingering = [LINGERING] + [str(m.get("lingering") or "-") for m in members]
        rows = [(*row[:-1], count, row[-1]) for row, count in zip(rows, lingering, strict=True)]
    # One %-format per row, not a ljust per cell: half the time for a thousand rows.
    line = "  ".join(f"%-{max(map(len, column))}s" for column in zip(*rows, strict=True))
    return "\n".join([(line % row).rstrip() for row in rows])


def uptime(member: dict[str, Any], now: float) -> str:
    """`45s`, `12m`, `3h4m`, `2d5h`: how long its process has run; `-` when none runs."""
    started = member.get("started_at")
    if member.get("state") != "running" or not started:
        return "-"
    seconds = max(0, int(now - started))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


TASK_COLUMNS = ("RUN", "TASK", "STATE", "ATTEMPTS", "WORKER", "RESULT", "NOTE")


def tasks_table(columns: list[list[str]]) -> str:
    """`fleetctl tasks list`'s table from its columns (one list of cells each, in
    TASK_COLUMNS' order): each cell padded to its column's widest, two spaces between, no
    space at a line's end. Shared by the click command and the start-up fast path.

    Built a column at a time, in C (a row at a time took some 10 ms for 10,000 tasks): as a
    RESULT is never blank (a result, or "-"), only a NOTE can leave space at a line's end."""
    same = [bool(column) and column.count(column[0]) == len(column) for column in columns]
    widths = [
        max(len(title), len(column[0]) if alike else max(map(len, column), default=0))
        for title, column, alike in zip(TASK_COLUMNS, columns, same, strict=True)
    ]
    header = "  ".join(t.ljust(w) for t, w in zip(TASK_COLUMNS, widths, strict=True)).rstrip()
    *padded, results, notes = columns
    count = len(results)
    stride = len(padded) + 3  # a newline, the padded cells, the result, the note's part
    cells: list[str] = [""] * (count * stride)
    cells[0::stride] = ["\n"] * count
    for at, (column, width, alike) in enumerate(zip(padded, widths, same, strict=False), start=1):
        if alike:  # one value all down: padded once
            cells[at::stride] = [column[0].ljust(width + 2)] * count
        else:
            cells[at::stride] = map(str.ljust, column, repeat(width + 2))
    cells[stride - 2 :: stride] = results
    cells[stride - 1 :: stride] = _note_parts(results, notes, widths[-2])
    return header + "".join(cells)


def _note_parts(results: list[str], notes: list[str], width: int) -> list[str]:
    """What follows each RESULT: nothing for a blank note, else the space up to the NOTE
    column and the note, without its trailing space."""
    joined = "".join(notes)
    if not joined or joined.isspace():
        return [""] * len(notes)
    return [
        " " * (width - len(result) + 2) + note.rstrip() if note.strip() else ""
        for result, note in zip(results, notes, strict=True)
    ]
