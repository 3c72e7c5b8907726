"""The holder's half of protocol.logtimes: the sidecar of times beside a member's log.

A record is one pwrite, at most one a millisecond per log, only when a chunk arrives: the
relay's read and write per chunk gain a third syscall at most. Not a memory mapping, which
would save it: a store into a mapped page past the file's end (the file cut short by hand,
`: > stdout.times`) or that a full tmpfs cannot back is a SIGBUS, which would kill the holder
and every member with it. A write that fails (a full disk) is logged once, and the log goes
on without times (its lines then carry the last time recorded).
"""

import contextlib
import os
import time

import structlog

from fleetd.core.dirs import PrivateDir
from protocol.logtimes import RECORD, SIZE, header, is_header_of, times_name, valid_records

log = structlog.get_logger("fleetd.members")

_NEVER = 1 << 64


def _next_millisecond(ns: int) -> int:
    return (ns // 1_000_000 + 1) * 1_000_000


class TimesFile:
    """The sidecar of the log `log_name` in `directory`, opened with the log (`open`), rotated
    with it (`rotate`)."""

    __slots__ = ("_count", "_fd", "_next", "directory", "name")

    def __init__(self, directory: PrivateDir, log_name: str) -> None:
        self.directory = directory
        self.name = times_name(log_name)
        self._fd = -1
        self._count = 0
        """Header and records written: the next record goes at `_count * SIZE`."""
        self._next = _NEVER
        """When the next record may be (ns): the next millisecond after the last record (one
        a millisecond is enough, and records never go back); never while nothing is open."""

    def over(self, max_bytes: int) -> bool:
        """Whether the sidecar passed its log's cap (or 4 KiB, for a cap below that): its log
        is rotated then too, so that a member printing a byte a millisecond does not make a
        sidecar 16 times the size of its log."""
        return self._count * SIZE > max(max_bytes, 4096)

    def open(self, log_status: os.stat_result) -> None:
        """Open the sidecar of the log just opened: its records go on after the last one when
        the log is one it has times of (a holder of the same runtime directory before), else
        it starts anew."""
        self.close()
        try:
            self._fd = self.directory.open_file(self.name, os.O_RDWR | os.O_CREAT)
            self._continue_or_start(log_status)
        except OSError as exc:
            log.warning("log_times_failed", file=self.name, error=str(exc))
            self.close()

    def _continue_or_start(self, log_status: os.stat_result) -> None:
        size = os.fstat(self._fd).st_size
        if (
            log_status.st_size
            and size > SIZE
            and size % SIZE == 0
            and is_header_of(os.pread(self._fd, SIZE, 0), log_status.st_ino)
        ):
            records = valid_records(os.pread(self._fd, size - SIZE, SIZE))
            if records:
                self._count = 1 + len(records)
                self._next = _next_millisecond(records[-1][1])
                os.ftruncate(self._fd, self._count * SIZE)  # what follows is garbled
                return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, header(log_status.st_ino), 0)
        self._count, self._next = 1, 0

    def record(self, start: int) -> None:
        """The bytes from `start` on are read now: call before writing them to the log."""
        now = time.time_ns()
        if now < self._next:
            return  # the same millisecond: the record before says it
        try:
            os.pwrite(self._fd, RECORD.pack(start, now), self._count * SIZE)
        except OSError as exc:
            log.warning("log_times_failed", file=self.name, error=str(exc))
            self._next = _NEVER  # no more times for this file until its rotation: said once
            return
        self._count += 1
        self._next = _next_millisecond(now)

    def rotate(self) -> None:
        """Move the sidecar to `.1` beside its log (call right after the log's rename); the
        next `open` starts a new one."""
        self.close()
        fd = self.directory.fd
        with contextlib.suppress(FileNotFoundError):  # it could not be created
            os.replace(self.name, f"{self.name}.1", src_dir_fd=fd, dst_dir_fd=fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._count = 0
        self._next = _NEVER
