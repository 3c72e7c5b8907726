"""When a member's output lines were written: the sidecar a holder keeps beside each log, and
how a reader gives each line of the log its time. No I/O: the holder writes the bytes
(fleetd.holder.logtimes), fleetctl reads them (fleetctl.logs).

A log (`stdout.log`) stays the member's raw bytes; its sidecar (`stdout.times`) is a header
and fixed-size records, rotated with it (`stdout.times.1`):

    header   8 bytes MAGIC, then the log file's inode (u64): which log these times are of,
             whatever the two files are called now (a rotation renames both, not at once)
    record   (start, time): u64 byte offset in the log, u64 Unix time in ns; the bytes from
             `start` up to the next record's start were read from the member's pipe at `time`

The holder writes a chunk's record before the chunk, so every byte a reader finds in the log
has its record by then, and a holder killed between the two leaves a record and no bytes, which
maps nothing. It writes a record only when the millisecond changed since the last one (the
times are printed to the millisecond). Records are little-endian; unused space at the end is
zeros, and a record whose start or time goes back, or whose time is zero, ends the list: a
garbled or cut sidecar loses the records from there on, never the lines.

A line's time is the one of the byte that ended it (its newline, or its last byte): when the
holder read the whole line, as `docker logs -t` stamps a line when it reads it. A line before
every record takes the first record's time; a log with no sidecar (an older holder's, or one
removed) takes the time its caller gives, the log's modification time.
"""

import bisect
import struct

MAGIC = b"fleettm1"
RECORD = struct.Struct("<QQ")
SIZE = RECORD.size
"""Bytes of the header and of each record."""


def times_name(log_name: str) -> str:
    """`stdout.log` -> `stdout.times`: not `stdout.log.*`, which `tail stdout.log*` would read."""
    return log_name.removesuffix(".log") + ".times"


def header(log_inode: int) -> bytes:
    return MAGIC + struct.pack("<Q", log_inode)


def is_header_of(data: bytes, log_inode: int) -> bool:
    """Whether `data` starts the sidecar of the log whose inode is `log_inode`."""
    return data[:SIZE] == header(log_inode)


def valid_records(
    data: bytes | memoryview, after: tuple[int, int] = (0, 1)
) -> list[tuple[int, int]]:
    """The records `data` (record space, no header) holds before the first that is unused,
    garbled, or goes back from the one before it (`after` for the first)."""
    found: list[tuple[int, int]] = []
    last_start, last_time = after
    usable = len(data) - len(data) % SIZE
    for start, time in RECORD.iter_unpack(data[:usable]):
        if time == 0 or start < last_start or time < last_time:
            break
        found.append((start, time))
        last_start, last_time = start, time
    return found


class LineTimes:
    """Splits one log file's bytes into lines, each with its time, as they are read: feed it
    every chunk of the file in order, with the records read since (`add`).

    Times never go back within a file: a garbled sidecar makes them approximate, not
    disordered."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._times: list[int] = []
        self._offset = 0
        self._partial = b""
        self._partial_time = 0
        self._last = 0

    @property
    def recorded(self) -> int:
        """How many records it has."""
        return len(self._starts)

    @property
    def last_record(self) -> tuple[int, int]:
        return (self._starts[-1], self._times[-1]) if self._starts else (0, 1)

    @property
    def pending(self) -> bool:
        """Whether it holds the start of a line that has no end yet."""
        return bool(self._partial)

    def add(self, records: list[tuple[int, int]]) -> None:
        for start, time in records:
            self._starts.append(start)
            self._times.append(time)

    def _time_at(self, position: int, fallback: int) -> int:
        if not self._starts:
            time = fallback
        else:
            time = self._times[max(bisect.bisect_right(self._starts, position) - 1, 0)]
        self._last = max(self._last, time)
        return self._last

    def feed(self, chunk: bytes, fallback: int) -> list[tuple[int, bytes]]:
        """The lines `chunk` ends (with their newline), each with its time; `fallback` is the
        time of bytes no record covers (the log's modification time)."""
        lines: list[tuple[int, bytes]] = []
        begin = 0
        while (end := chunk.find(b"\n", begin)) >= 0:
            line = chunk[begin : end + 1]
            if self._partial:
                line, self._partial = self._partial + line, b""
            lines.append((self._time_at(self._offset + end, fallback), line))
            begin = end + 1
        if begin < len(chunk):
            self._partial += chunk[begin:]
            self._partial_time = self._time_at(self._offset + len(chunk) - 1, fallback)
        self._offset += len(chunk)
        return lines

    def end(self) -> list[tuple[int, bytes]]:
        """The last line, when the file ends without a newline (it was rotated away, or its
        member left): as it is, with the time of its last byte."""
        if not self._partial:
            return []
        line, self._partial = self._partial, b""
        return [(self._partial_time, line)]
