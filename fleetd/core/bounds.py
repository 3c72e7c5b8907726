"""Bounds on what one client can make a server hold: fleetd's control socket, and a holder's
member sockets (both serve through fleetd.core.server.Connection). The README's "Bounds" states
them for users.

    frame size          MAX_FRAME per frame (protocol), else frame_too_large, then closed
    unfinished frames   PARTIAL_FRAME_BUDGET bytes held for all connections of one server
                        together; the connection that would go past it: limit_exceeded, closed
    stalled mid-frame   FRAME_IDLE_TIMEOUT seconds with part of a frame and nothing more:
                        limit_exceeded, closed (idle between frames is fine, for ever)
    waits               MAX_WAITS long polls outstanding per connection (lease watches and
                        member waits; watches on a member socket); one more: that request
                        alone gets limit_exceeded
    in flight           MAX_IN_FLIGHT requests answered by coroutines per connection; past it
                        the connection is not read until one is answered (backpressure)

What a connection held goes when it ends: a peer that hung up, or was refused, has its long
polls cancelled at once (nobody is left to read their answers), and after large connections
ended the memory they freed is handed back to the kernel (`Trim`).
"""

import gc
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import anyio
import structlog

from fleetd.core.startup import return_free_memory
from protocol import MAX_FRAME
from protocol.durations import parse_duration
from protocol.errors import InvalidRequest

log = structlog.get_logger("fleetd.bounds")

PARTIAL_FRAME_BUDGET = 32 << 20
"""Bytes of unfinished frames one server holds for all its connections together: 32 frames of
the largest size at once, while a well-behaved client's frames arrive whole in a read or two."""
FRAME_IDLE_TIMEOUT = 10.0
"""Seconds a connection may stay with part of a frame sent and nothing more."""
FRAME_IDLE_TIMEOUT_ENV = "FLEET_FRAME_IDLE_TIMEOUT"
MAX_WAITS = 256
"""Long polls (lease watches, member waits) outstanding on one connection."""
MAX_IN_FLIGHT = 1024
"""Requests answered by coroutines outstanding on one connection. Above MAX_WAITS with room
to spare: a client with every wait it may have outstanding still gets its other requests read
(one of them may be what the waits wait for)."""

TRIM_DELAY = 0.5
"""Seconds between the last of a burst of large connections ending and giving free heap
back: the connections that leave together (a client process exiting) are trimmed for once."""
TRIM_MAX_DELAY = 5.0
"""Seconds after a burst's first departure by which the trim runs however long it lasts."""
LARGE_CONNECTION_IN_FLIGHT = 64
LARGE_CONNECTION_PARTIAL = 256 << 10
"""A connection that had this many requests in flight, or held this much of an unfinished
frame, is large: its end is worth a trim (which walks every object: not after every ping)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds one server's connections share (see the module docstring); the cap on waits
    is the dispatcher's, which knows which requests are long polls."""

    max_frame: int = MAX_FRAME
    partial_frame_budget: int = PARTIAL_FRAME_BUDGET
    frame_idle_timeout: float = FRAME_IDLE_TIMEOUT
    max_in_flight: int = MAX_IN_FLIGHT

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "Limits":
        """The defaults, but the idle timeout from $FLEET_FRAME_IDLE_TIMEOUT when it is a
        positive duration (`10`, `500ms`: protocol.durations; tests shorten it; a bad value is
        logged and ignored)."""
        text = environ.get(FRAME_IDLE_TIMEOUT_ENV, "")
        if not text:
            return cls()
        try:
            timeout = parse_duration(text)
        except InvalidRequest:
            timeout = 0.0
        if timeout == 0:
            log.warning("frame_idle_timeout_ignored", value=text)
            return cls()
        return cls(frame_idle_timeout=timeout)


class FrameBudget:
    """Bytes every connection of one server holds in unfinished frames, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def charge(self, before: int, after: int) -> bool:
        """A connection's unfinished frame went from `before` to `after` bytes: whether the
        total stays within the limit (a shrinking frame always does). Charged either way:
        `refund` what the connection holds when it gives its frame up."""
        self.held += after - before
        return after <= before or self.held <= self.limit

    def refund(self, held: int) -> None:
        self.held -= held


class Trim:
    """Hands the memory departed clients freed back to the kernel, once large connections end.

    Freed memory stays with the process otherwise: CPython's free lists keep freed blocks,
    which keep their 1 MiB arenas mapped, and glibc keeps freed heap pages (a freed 1 MiB
    buffer raises its mmap threshold, so later ones come from the heap). A full collection
    empties the free lists, so that arenas left empty are unmapped, and malloc_trim(0) returns
    free heap pages. Arenas that a few longer-lived objects still pin stay (README, "Bounds").
    Both walk the heap (tens of milliseconds with 10,000 leases), so once per burst of
    departures: TRIM_DELAY after the last one (memory a departure frees is only free once the
    departure is over), and at the latest TRIM_MAX_DELAY after the first."""

    def __init__(self) -> None:
        self._first = 0.0
        self._last = 0.0
        self._due = False

    def soon(self, tasks: anyio.abc.TaskGroup) -> None:
        self._last = anyio.current_time()
        if not self._due:
            self._due, self._first = True, self._last
            tasks.start_soon(self._trim_later)

    async def _trim_later(self) -> None:
        try:
            while (wait := self._trim_at() - anyio.current_time()) > 0:  # noqa: ASYNC110
                await anyio.sleep(wait)  # a deadline that moves: no event to wait for
        finally:
            self._due = False
        trim()

    def _trim_at(self) -> float:
        return min(self._last + TRIM_DELAY, self._first + TRIM_MAX_DELAY)


_PAGE = os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    """Give the memory freed but still held by CPython and glibc back to the kernel, now."""
    started, before = time.perf_counter(), _rss()
    gc.collect()
    return_free_memory()
    log.info(
        "memory_trimmed",
        rss_mib_before=before,
        rss_mib_after=_rss(),
        duration_ms=round((time.perf_counter() - started) * 1e3, 1),
    )


def _rss() -> float:
    with open("/proc/self/statm", "rb") as f:
        return round(int(f.read().split()[1]) * _PAGE / (1 << 20), 1)
