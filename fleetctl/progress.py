"""One live line on a terminal while `fleetctl wait` and `up --wait` wait: which members are
still pending, and in what state. Nothing at all when stderr is not a terminal (a pipe, a
file, a script): the output there is exactly what the command prints.
"""

import contextlib
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TextIO

from protocol.errors import FleetError

INTERVAL = 0.5
"""Seconds between looks at the members' states."""
_CLEAR = "\r\x1b[K"


def pending_line(states: Sequence[tuple[str, str]], width: int) -> str:
    """`waiting for 2 of 5: api (starting), db (backoff)`, cut to `width` columns."""
    pending = [(name, state) for name, state in states if state != "running"]
    if not pending:
        return ""
    names = ", ".join(f"{name} ({state})" for name, state in pending)
    line = f"waiting for {len(pending)} of {len(states)}: {names}"
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


@contextlib.contextmanager
def shown_while_waiting(
    socket_path: str, names: Sequence[str], stream: TextIO | None = None
) -> Iterator[None]:
    """While the block runs, keep the pending members on one line of `stream` (stderr),
    asked of fleetd on a connection of its own; the line is cleared at the end."""
    stream = sys.stderr if stream is None else stream
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    thread = threading.Thread(
        target=_show, args=(socket_path, list(names), stream, done), daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        stream.write(_CLEAR)
        stream.flush()


def _show(socket_path: str, names: list[str], stream: TextIO, done: threading.Event) -> None:
    from fleetctl.sync import SyncClient

    try:
        with SyncClient(socket_path, timeout=2) as client:
            while not done.wait(INTERVAL):
                states = [(m.name, m.state) for m in client.member_status(names)]
                width = shutil.get_terminal_size().columns - 1
                stream.write(_CLEAR + pending_line(states, width))
                stream.flush()
    except (FleetError, OSError):
        return  # the wait itself says what went wrong
