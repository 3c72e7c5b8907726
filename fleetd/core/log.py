"""structlog set-up: JSON lines off a terminal (journald), readable key=value on one.

Every request fleetd answers is logged, so a line must be cheap: the fields bound to a
connection (`bind`), the level and the timestamp are added by one processor reading one
context variable (structlog's merge_contextvars copies and walks every context variable of
the task, anyio's and asyncio's included), and the line is written with one call.
"""

import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict

_json = msgspec.json.Encoder(enc_hook=str)


def _serialize(event: Any, **_: Any) -> str:
    """structlog's JSONRenderer passes json.dumps keywords that msgspec does not take."""
    return _json.encode(event).decode()


_bound: ContextVar[dict[str, Any]] = ContextVar("fleet_log_bound")
_NOTHING_BOUND: dict[str, Any] = {}


def bind(**fields: Any) -> None:
    """Add `fields` to every line logged from now on by this task and the tasks it starts
    (a connection's handler binds its peer)."""
    _bound.set({**_bound.get(_NOTHING_BOUND), **fields})


_LEVELS = {"warn": "warning", "exception": "error"}
"""structlog's add_log_level's names for the methods that are not level names."""


class _Fields:
    """The bound fields, the level, and structlog's TimeStamper(fmt="iso", utc=True) text
    without building a datetime for every line: the date and time are formatted once a
    second, the microseconds added."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        for key, value in _bound.get(_NOTHING_BOUND).items():
            event.setdefault(key, value)
        event["level"] = _LEVELS.get(method, method)
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


class _LossyWriter:
    """Writes each line at once. A line that cannot be written (its disk is full) is dropped:
    losing a log line must not take the daemon, or a holder and every member with it, down."""

    __slots__ = ("_file",)

    def __init__(self, file: Any) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        try:
            self._file.write(message + "\n")
            self._file.flush()
        except OSError:
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_serialize)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    processors: list[structlog.typing.Processor] = [_Fields()]
    if json:
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_: _LossyWriter(sys.stderr),
        cache_logger_on_first_use=True,
    )
