"""Members' status as a table: shared by the click commands and the start-up fast path
(fleetctl._fast), so that the two print the same bytes. Runs' tasks are protocol.tables'."""

from __future__ import annotations

import time

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
