"""The status table, byte for byte: the click command and the fast path both print it."""

import pytest

from fleetctl.table import status_table, uptime

NOW = 1_800_000_000.0


def test_no_members() -> None:
    assert status_table([]) == "no members"


def test_columns_are_padded_to_their_widest_cell_and_lines_carry_no_trailing_blanks() -> None:
    members = [
        {
            "name": "a",
            "cluster": "web",
            "state": "running",
            "pid": 4242,
            "address": "[::1]:80",
            "started_at": NOW - 3725,
        },
        {"name": "worker-17", "cluster": "jobs", "state": "error", "restarts": 12, "error": "x 1"},
        {"name": "nobody", "state": "absent"},
        {"name": "b", "cluster": "web", "state": "starting", "pid": None, "restarts": 0},
        {"name": "100%", "cluster": "é", "state": "stopped", "error": "exit %d "},
    ]
    assert status_table(members, NOW) == "\n".join(
        [
            "MEMBER          STATE     PID   UPTIME  RESTARTS  ADDRESS   ERROR",
            "web/a           running   4242  1h2m    0         [::1]:80",
            "jobs/worker-17  error     -     -       12        -         x 1",
            "nobody          absent    -     -       0         -",
            "web/b           starting  -     -       0         -",
            "é/100%          stopped   -     -       0         -         exit %d",
        ]
    )


def test_a_lingering_column_shows_only_when_some_member_has_processes_left() -> None:
    members = [
        {"name": "a", "state": "stopped", "lingering": 2, "error": "exited with code 1"},
        {"name": "b", "state": "running", "pid": 7, "lingering": 0, "started_at": NOW - 9},
    ]
    assert status_table(members, NOW) == "\n".join(
        [
            "MEMBER  STATE    PID  UPTIME  RESTARTS  ADDRESS  LINGERING  ERROR",
            "a       stopped  -    -       0         -        2          exited with code 1",
            "b       running  7    9s      0         -        -",
        ]
    )
    assert "LINGERING" not in status_table(members[1:])


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h0m"), (90061, "1d1h")],
)
def test_uptime_is_short(seconds: int, shown: str) -> None:
    assert uptime({"state": "running", "started_at": NOW - seconds}, NOW) == shown
