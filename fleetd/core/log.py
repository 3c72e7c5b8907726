"""structlog set-up: JSON lines off a terminal (journald), readable key=value on one."""

import contextlib
import logging
import sys
import time
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict

_json = msgspec.json.Encoder(enc_hook=str)


def _serialize(event: Any, **_: Any) -> str:
    """structlog's JSONRenderer passes json.dumps keywords that msgspec does not take."""
    return _json.encode(event).decode()


class _Timestamp:
    """structlog's TimeStamper(fmt="iso", utc=True), same text, without building a datetime
    for every line: the date and time are formatted once a second, the microseconds added."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


class _LossyWriteLogger(structlog.WriteLogger):
    """A line that cannot be written (its disk is full) is dropped: losing a log line must not
    take the daemon, or a holder and every member with it, down."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError):
            super().msg(message)

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
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _Timestamp(),
    ]
    if json:
        processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=lambda *_: _LossyWriteLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
