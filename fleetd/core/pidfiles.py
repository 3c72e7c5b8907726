"""Pidfiles that name a process by pid and start time, so a recycled pid is never mistaken for
the process that wrote it. Holders write them; fleetd and the tests read them."""

import os

from fleetd.core import identity


def process_start_time(pid: int) -> int | None:
    """With the pid, the start time names a process uniquely, where a pid alone may have been
    recycled; None once the process is gone."""
    try:
        return identity.start_time(pid)
    except identity.ProcessGone:
        return None


def pidfile_text(pid: int) -> bytes:
    """What a pidfile holds: "PID START_TIME" (see is_running)."""
    return f"{pid} {process_start_time(pid) or 0}\n".encode()


def read_pidfile(path: str) -> tuple[int, int]:
    """(pid, start time); raises OSError or ValueError for a missing or mangled file."""
    with open(path, "rb") as f:
        pid, start_time = f.read().split()
    return int(pid), int(start_time)


def is_running(pidfile: str) -> bool:
    """Whether the process a pidfile names is alive: signal 0 says the pid exists, and its
    start time says it is still the same process, not a stranger that got the pid since."""
    try:
        pid, start_time = read_pidfile(pidfile)
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's: the start time still tells
    return process_start_time(pid) == start_time
