"""Durations as people write them: one grammar for every fleetctl option that takes one
(``--ttl``, ``--grace``, ``--timeout`` of ``up``, ``add`` and ``wait``) and every fleet.toml key
(``stop_timeout``, ``start_timeout``), so a value that works in one place works in all.

    15    1.5                 seconds
    500ms  5s  2m  1h         a number and a unit: ms, s, m or h
    1m30s  1h5m  2s500ms      several, units in descending order, each at most once

A number in fleet.toml (``stop_timeout = 5``) is seconds too. A duration is never negative:
nothing in fleet waits a negative time, so ``-1`` is refused rather than given a meaning such
as "forever" that a typo could reach. Only the spelling is checked here; whether a lease may
last that long is the daemon's to judge (``protocol.leases.check_ttl``).
"""

from __future__ import annotations

import math
import re

TYPE_CHECKING = False  # fleetctl's fast path parses durations: typing would cost it 3 ms
if TYPE_CHECKING:
    from protocol.errors import InvalidRequest

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION = re.compile(
    rf"(?P<bare>{_NUMBER})"
    rf"|(?:(?P<h>{_NUMBER})h)?(?:(?P<m>{_NUMBER})m(?!s))?(?:(?P<s>{_NUMBER})s)?"
    rf"(?:(?P<ms>{_NUMBER})ms)?"
)
_SECONDS_PER_UNIT = {"bare": 1.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

_ECHO_LIMIT = 100
"""Characters of a bad value echoed in an error message."""

_GRAMMAR = "seconds (15, 1.5) or numbers with units h, m, s, ms in that order (1m30s, 500ms)"
"""The grammar in a few words, for error messages."""


def parse_duration(value: object) -> float:
    """Seconds in `value`: a string in the grammar above, or an int or float of seconds.
    Raises InvalidRequest naming the value and what is wrong with it."""
    if isinstance(value, str):
        seconds = _seconds_in(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = _as_float(value)
    else:
        raise _invalid(value, f"write {_GRAMMAR}")
    if seconds < 0:
        raise _invalid(value, "a duration is never negative")
    if not math.isfinite(seconds):
        raise _invalid(value, "not a finite number of seconds")
    return seconds


def _seconds_in(text: str) -> float:
    match = _DURATION.fullmatch(text)
    if match is None or match.lastgroup is None:  # no part at all: "" matches every optional
        if text.startswith("-"):
            raise _invalid(text, "a duration is never negative")
        raise _invalid(text, f"write {_GRAMMAR}")
    parts = match.groupdict()
    return sum(
        float(number) * _SECONDS_PER_UNIT[unit]
        for unit, number in parts.items()
        if number is not None
    )


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an int past float's range: 10**400
        return math.inf


def _invalid(value: object, why: str) -> InvalidRequest:
    """Imported only to fail: protocol.errors imports typing, which fleetctl's fast path,
    parsing a good duration, need not pay for."""
    from protocol.errors import InvalidRequest

    shown = value[:_ECHO_LIMIT] if isinstance(value, str) else value
    return InvalidRequest(f"invalid duration {shown!r}: {why}")
