"""The holder's half of protocol.logtimes: the sidecar of times beside a member's log.

The sidecar is a memory mapping of a file whose space is reserved ahead (posix_fallocate, in
doubling steps): recording a chunk's time is a store into memory, no system call, so the
output relay costs what it did (a read and a write per chunk). Reserving the space first
matters: a store into a mapped page that the filesystem cannot back (a full tmpfs) would be a
SIGBUS, which kills the holder; a reservation that fails is an error here instead, and the
log goes on without times (its lines then carry the last time recorded).
"""

import contextlib
import mmap
import os
import time

import structlog

from fleetd.core.dirs import PrivateDir
from protocol.logtimes import RECORD, SIZE, header, is_header_of, times_name, valid_records

log = structlog.get_logger("fleetd.members")

_FIRST_BYTES = 4096
"""A page: 255 records, then the reservation doubles."""
_NEVER = 1 << 64


def _next_millisecond(ns: int) -> int:
    return (ns // 1_000_000 + 1) * 1_000_000


class TimesFile:
    """The sidecar of the log `log_name` in `directory`, opened with the log (`open`), rotated
    with it (`rotate`)."""

    __slots__ = ("_count", "_map", "_next", "directory", "name")

    def __init__(self, directory: PrivateDir, log_name: str) -> None:
        self.directory = directory
        self.name = times_name(log_name)
        self._map: mmap.mmap | None = None
        self._count = 0
        self._next = _NEVER
        """Header and records written: the next record goes at `_count * SIZE`."""
        self._next = _NEVER
        """When the next record may be (ns): the next millisecond after the last record (one
        a millisecond is enough, and records never go back); never while nothing is mapped."""

    def over(self, max_bytes: int) -> bool:
        """Whether the sidecar passed its log's cap (or a page, for a cap below that): its log
        is rotated then too, so that a member printing a byte a millisecond does not make a
        sidecar 16 times the size of its log."""
        return self._count * SIZE > max(max_bytes, _FIRST_BYTES)

    def open(self, log_status: os.stat_result) -> None:
        """Map the sidecar of the log just opened: its records go on after the last one when the
        log is one it has times of (a holder of the same runtime directory before), else it
        starts anew."""
        self.close()
        try:
            fd = self.directory.open_file(self.name, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            log.warning("log_times_failed", file=self.name, error=str(exc))
            return
        try:
            self._map_from(fd, log_status)
        except OSError as exc:
            log.warning("log_times_failed", file=self.name, error=str(exc))
            self.close()
        finally:
            os.close(fd)

    def _map_from(self, fd: int, log_status: os.stat_result) -> None:
        size = os.fstat(fd).st_size
        if (
            log_status.st_size
            and size >= _FIRST_BYTES
            and size % SIZE == 0
            and is_header_of(os.pread(fd, SIZE, 0), log_status.st_ino)
        ):
            self._map = mmap.mmap(fd, size)
            records = valid_records(self._map[SIZE:])
            self._count = 1 + len(records)
            self._next = _next_millisecond(records[-1][1]) if records else 0
            return
        os.ftruncate(fd, 0)
        os.posix_fallocate(fd, 0, _FIRST_BYTES)
        self._map = mmap.mmap(fd, _FIRST_BYTES)
        self._map[:SIZE] = header(log_status.st_ino)
        self._count, self._next = 1, 0

    def record(self, start: int) -> None:
        """The bytes from `start` on are read now: call before writing them to the log."""
        now = time.time_ns()
        if now < self._next:
            return  # the same millisecond: the record before says it
        assert self._map is not None
        if self._count * SIZE == len(self._map) and not self._grow():
            self._next = _NEVER  # no more times for this file: said once
            return
        RECORD.pack_into(self._map, self._count * SIZE, start, now)
        self._count += 1
        self._next = _next_millisecond(now)

    def _grow(self) -> bool:
        assert self._map is not None
        size = 2 * len(self._map)
        try:
            fd = self.directory.open_file(self.name, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
                grown = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("log_times_failed", file=self.name, error=str(exc))
            return False
        self._map.close()
        self._map = grown
        return True

    def rotate(self) -> None:
        """Move the sidecar to `.1` beside its log (call right after the log's rename); the
        next `open` starts a new one."""
        self.close()
        fd = self.directory.fd
        with contextlib.suppress(FileNotFoundError):  # it could not be created
            os.replace(self.name, f"{self.name}.1", src_dir_fd=fd, dst_dir_fd=fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._count = 0
        self._next = _NEVER
