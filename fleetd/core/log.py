"""structlog set-up: JSON lines off a terminal (journald), readable key=value on one.

Under journald (stderr is the stream $JOURNAL_STREAM names) each line starts with its syslog
priority, `<6>` for info, which journald strips and records: `journalctl -u fleetd -p
warning` shows the warnings and worse.

At debug level every request fleetd answers is logged, so a line must be cheap: the fields
bound to a connection (`bind`), the level and the timestamp are added by one processor reading
one context variable (structlog's merge_contextvars copies and walks every context variable of
the task, anyio's and asyncio's included), the same processor renders the JSON, and the lines
of one event-loop turn are written with one call after it.
"""

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict

_json = msgspec.json.Encoder(enc_hook=str)


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


_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
"""syslog priorities (sd-daemon(3) prefixes) of structlog's levels."""


class _JsonLine(_Fields):
    """The fields, then the line as JSON: one processor where three ran (the fields,
    format_exc_info and JSONRenderer, which passes json.dumps keywords msgspec does not take).
    With `journal`, the line starts with its syslog priority."""

    __slots__ = ("_journal",)

    def __init__(self, *, journal: bool = False) -> None:
        _Fields.__init__(self)
        self._journal = journal

    def __call__(self, logger: Any, method: str, event: EventDict) -> str:  # type: ignore[override]
        event = _Fields.__call__(self, logger, method, event)  # no super() lookup per line
        if "exc_info" in event:
            event = structlog.processors.format_exc_info(logger, method, event)
        line = _json.encode(event).decode()
        if self._journal:
            return f"<{_PRIORITIES.get(event['level'], 6)}>{line}"
        return line


def on_journal(stream: Any, environ: dict[str, str] | None = None) -> bool:
    """Whether `stream` is journald's: systemd sets JOURNAL_STREAM to its `DEVICE:INODE`."""
    device, _, inode = (
        (os.environ if environ is None else environ).get("JOURNAL_STREAM", "").partition(":")
    )
    try:
        found = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{found.st_dev}:{found.st_ino}" == f"{device}:{inode}"


class _LossyWriter:
    """Writes the lines logged in one event-loop turn with one write, after the turn (a write
    per line was a tenth of a pipelined request's cost on fleetd's loop); a line logged with no
    loop running in its thread, at once. Lines still gathered are written at exit, and are not
    a forked child's to write. A line that cannot be written (its disk is full) is dropped:
    losing a log line must not take the daemon, or a holder and every member with it, down."""

    __slots__ = ("_file", "_lines", "_thread")

    def __init__(self, file: Any) -> None:
        self._file = file
        self._lines: list[str] = []
        """Lines of the current turn of the loop in `_thread`, to be written after it."""
        self._thread = 0
        """The thread whose loop will write `_lines` (0: none is gathered)."""

    def msg(self, message: str) -> None:
        if self._thread == threading.get_ident():
            self._lines.append(message)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(message + "\n")
            return
        if self._thread:  # another thread's loop gathers lines: this one writes its own
            self._write(message + "\n")
            return
        self._thread = threading.get_ident()
        self._lines.append(message)
        loop.call_soon(self.write_gathered)

    def write_gathered(self) -> None:
        lines, self._lines, self._thread = self._lines, [], 0
        if lines:
            lines.append("")
            self._write("\n".join(lines))

    def write_to(self, file: Any) -> None:
        """Write what is gathered, then write to `file` from now on."""
        self.write_gathered()
        self._file = file

    def forget(self) -> None:
        self._lines, self._thread = [], 0

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except OSError:
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_writer = _LossyWriter(sys.stderr)
"""The one writer: every logger's, so that a turn's lines keep their order."""
atexit.register(_writer.write_gathered)
os.register_at_fork(after_in_child=_writer.forget)


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    processors: list[structlog.typing.Processor] = (
        [_JsonLine(journal=on_journal(sys.stderr))]
        if json
        else [_Fields(), structlog.dev.ConsoleRenderer(colors=False)]
    )
    _writer.write_to(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_: _writer,
        cache_logger_on_first_use=True,
    )
