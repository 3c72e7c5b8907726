"""A member's logs as `fleetctl logs` prints them: the rotated part first, then the current
file; with -f, then what the member writes next, as `tail -F` follows a file.

    LogReader        what a capped, rotated log holds that was not read yet, across rotations
    Inotify          a wake-up when anything in a directory changes: a write, a rotation, a log
                     created (no polling)
    MemberPresence   whether the member is still in its cluster, as its holder says
    print_log        what is there
    follow_log       what is there, then every change, until the member leaves its cluster

Following ends when the member leaves its cluster (`fleetctl stop`, `fleetctl down`, its holder
exiting): nothing will write its log any more, and everything it wrote is printed by then. A
member that exits or crashes stays in its cluster (its restart policy may bring it back, and a
`stop` makes it leave), so the follower stays too, as `journalctl -f` follows a unit across its
restarts. It reads the files and asks the member's holder, never fleetd: a fleetd restart does
not end it. It imports nothing of fleetd.
"""

import collections
import contextlib
import ctypes
import errno
import heapq
import os
import resource
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

from fleetctl._peer import check_peer
from protocol.base import Op
from protocol.clusters import LogPaths
from protocol.connection import ClientConnection, decode_result, result_of
from protocol.errors import ConnectionLost
from protocol.logtimes import SIZE, LineTimes, is_header_of, times_name, valid_records
from protocol.members import (
    MemberState,
    MemberStatus,
    StatusAll,
    Watch,
    WatchResult,
    member_log_path,
    member_socket_path,
)
from protocol.messages import RawResponse

_READ_SIZE = 1 << 18
_RETRY = 1.0
"""Seconds between looks while the log's directory cannot be watched (it does not exist)."""

FileId = tuple[int, int]
"""(st_dev, st_ino): which file a path names, whatever it is called now."""


def _chunks(fd: int) -> Iterator[bytes]:
    while chunk := os.read(fd, _READ_SIZE):
        yield chunk


def _id_of(path: str) -> FileId | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


class LogReader:
    """What a log holds that was not read yet, across its rotations. Plain reads: it never
    waits.

    The holder appends to PATH and, past the cap, renames it to PATH.1 (replacing the previous
    one) and starts a new PATH (fleetd.holder.members.LogFile). The reader keeps the file it reads
    open, so the rename loses nothing: once PATH names another file, the one it holds is
    complete, and it reads that to its end, then the new PATH from its start. A reader so far
    behind that a second rotation came finds the file in between at PATH.1, and reads it whole.
    """

    def __init__(self, path: str, on_file: Callable[[int], object] | None = None) -> None:
        """`on_file(fd)`: called before the chunks of each file read, with its descriptor."""
        self.path = path
        self.rotated = f"{path}.1"
        self.on_file = on_file
        self._fd = -1
        self._id: FileId | None = None
        self._finished: FileId | None = None
        """The file last read to its end, which PATH.1 names after a rotation."""
        self._started = False
        self._reading: FileId | None = None

    def read(self, write: Callable[[bytes], object]) -> None:
        """Pass everything written since the last call to `write`; the first call starts with
        PATH.1, the rotated part."""
        for chunk in self.chunks():
            write(chunk)

    def chunks(self) -> Iterator[bytes]:
        """What `read` passes on, one chunk at a time, as the caller asks for it."""
        if not self._started:
            self._started = True
            self._open()  # PATH first: a rotation now moves it to PATH.1, which is then skipped
            yield from self._whole(self.rotated, unless=(self._id,))
        while self._fd >= 0 or self._open():
            yield from self._rest()
            current = _id_of(self.path)
            if current is None or current == self._id:
                return  # still ours, or mid-rotation (the new PATH comes next)
            yield from self._rest()  # ours was rotated away: it is complete
            self._finished = self._id
            self.close()
            yield from self._whole(self.rotated, unless=(self._finished, current))

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # a member that printed nothing has no log yet
        status = os.fstat(self._fd)
        self._id = status.st_dev, status.st_ino
        return True

    def _rest(self) -> Iterator[bytes]:
        self._from(self._fd, self._id)
        yield from _chunks(self._fd)

    def _from(self, fd: int, file_id: FileId | None) -> None:
        if self.on_file is not None and file_id != self._reading:
            self._reading = file_id
            self.on_file(fd)

    def _whole(self, path: str, *, unless: tuple[FileId | None, ...]) -> Iterator[bytes]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            status = os.fstat(fd)
            if (status.st_dev, status.st_ino) in unless:
                return
            self._from(fd, (status.st_dev, status.st_ino))
            yield from _chunks(fd)
            self._finished = status.st_dev, status.st_ino
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- inotify ----------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_IN_MODIFY = 0x002
_IN_CLOSE_WRITE = 0x008
_IN_MOVED_FROM = 0x040
_IN_MOVED_TO = 0x080
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_WATCHED = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE


def _errno_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")


class Inotify:
    """Readable when anything in a watched directory changed. The events are not parsed: a
    wake-up only means "look again", which a LogReader does cheaply."""

    def __init__(self) -> None:
        fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise _errno_error("inotify_init1")
        self._fd = fd

    def watch(self, directory: str) -> bool:
        """Watch `directory`; False when it does not exist (yet)."""
        if _libc.inotify_add_watch(self._fd, os.fsencode(directory), _WATCHED) >= 0:
            return True
        if ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise _errno_error(f"inotify_add_watch {directory}")

    def fileno(self) -> int:
        return self._fd

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 65536):
                pass

    def close(self) -> None:
        os.close(self._fd)


# --- the member's holder ----------------------------------------------------------------------


class MemberPresence:
    """Whether a member is still in its cluster (or, with no `member`, whether any member
    is), from its holder: a `watch` on a member socket (a snapshot of the members, then a push
    per change), read when select says so, through the sans-io core (protocol.connection). A
    member that reports stopped may have exited and stay (stopped), or have left: `status_all`,
    which lists only the members in the cluster, tells. A name pushed that was not there is a
    member added. The holder closing the connection means it exited, and every member is gone.
    Without a socket path to ask (an older fleetd), the member is taken to be there for
    good."""

    def __init__(self, socket_path: str, member: str | None = None) -> None:
        self.socket_path = socket_path
        self.member = member
        self.members: set[str] | None = None
        """The members in the cluster, as its holder last said (None: not asked yet)."""
        self._gone = False
        self._sock: socket.socket | None = None
        self._core = ClientConnection(peer="the holder", on_push=self._pushed)
        self._asked: list[int] = []
        """The watch, then each status_all, in the order sent: each answer updates `members`."""

    @property
    def present(self) -> bool:
        if self._gone:
            return False
        if self.members is None:
            return True
        return self.member in self.members if self.member is not None else bool(self.members)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        """Connect and watch; a socket that is gone or refuses means the member is not served.
        Raises PermissionDenied if another user's process listens there (fleetctl._peer)."""
        if not self.socket_path:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
            check_peer(sock, self.socket_path, "the holder")
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            self._gone = True
            return
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._send(Watch, pushes=True)

    def fileno(self) -> int:
        assert self._sock is not None
        return self._sock.fileno()

    def receive(self) -> None:
        """Read what the holder sent (call when readable); raises the holder's error frame."""
        assert self._sock is not None
        try:
            data = self._sock.recv(65536)
        except ConnectionResetError:  # it exited with our request unread
            data = b""
        core = self._core
        core.receive_data(data)
        while self._asked and self._sock is not None:
            try:
                answer = core.take(self._asked[0])
            except ConnectionLost:
                self._ended()
                return
            if answer is None:
                return
            self._asked.pop(0)
            members = result_of(answer, StatusAll).members  # an error frame raises here
            self.members = {status.name for status in members}
        if core.failure is not None:
            self._ended()

    def _pushed(self, response: RawResponse) -> None:
        pushed = decode_result(response, MemberStatus)
        if self.member is not None and pushed.name != self.member:
            return
        if pushed.state == MemberState.STOPPED:
            self._send(StatusAll)
        elif self.members is not None:
            self.members.add(pushed.name)

    def _send(self, op: type[Op[WatchResult]], *, pushes: bool = False) -> None:
        request_id, frame = self._core.send(op, {}, pushes=pushes)
        self._asked.append(request_id)
        if self._sock is None:
            return
        try:
            self._sock.sendall(frame)
        except OSError:  # the holder is exiting: not the caller's stdout's broken pipe
            self._ended()

    def _ended(self) -> None:
        """The holder closed the connection: it exited, and every member with it."""
        self._gone = True
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --- the commands -------------------------------------------------------------------------------


def last_lines(data: bytes, count: int) -> bytes:
    """The last `count` lines of `data` (a last line without its newline counts as one)."""
    if count <= 0:
        return b""
    cut = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return data
    return data[cut + 1 :]


def _read_tail(reader: LogReader, out: BinaryIO, tail: int | None) -> None:
    """What the log holds, or with `tail` its last lines only."""
    if tail is None:
        reader.read(out.write)
        return
    held = bytearray()
    reader.read(held.extend)
    out.write(last_lines(bytes(held), tail))


def print_log(path: str, out: BinaryIO, *, tail: int | None = None) -> None:
    """What the log holds: PATH.1, then PATH (with `tail`, their last lines)."""
    reader = LogReader(path)
    try:
        _read_tail(reader, out, tail)
    finally:
        reader.close()
    out.flush()


def follow_log(
    paths: LogPaths, out: BinaryIO, *, stderr: bool = False, tail: int | None = None
) -> None:
    """Print the log (with `tail`, its last lines), then what the member writes, until it
    leaves its cluster; returns once its last output is printed. KeyboardInterrupt (the
    caller's signals) ends it earlier."""
    path = paths.stderr if stderr else paths.stdout
    reader = LogReader(path)
    member = MemberPresence(paths.socket, paths.member)
    changes = Inotify()
    try:
        watched = _watch(changes, path)  # before the first read: no write can go unnoticed
        member.open()
        _read_tail(reader, out, tail)
        while True:
            reader.read(out.write)
            out.flush()
            if not member.present:
                return
            waiting: list[Inotify | MemberPresence] = [changes]
            if member.connected:
                waiting.append(member)
            ready = select.select(waiting, [], [], None if watched else _RETRY)[0]
            if changes in ready:
                changes.drain()
            if member in ready:
                member.receive()
            watched = watched or _watch(changes, path)
    finally:
        changes.close()
        member.close()
        reader.close()


def _watch(changes: Inotify, path: str) -> bool:
    """Watch the log's directory; while it does not exist, its parent, to see it come."""
    directory = os.path.dirname(path)
    if changes.watch(directory):
        return True
    changes.watch(os.path.dirname(directory))
    return False


# --- lines with their times (--timestamps, and a cluster's logs) ---------------------------------

_TIMES_READ = 1 << 16

Line = tuple[int, bytes]
"""(Unix time in ns, the line with its newline, if it has one)."""


class TimedLog:
    """A LogReader's chunks as lines with their times (protocol.logtimes), handed to `emit`:
    give `file` as the reader's on_file and `chunk` as its write. Each file's times are in the
    sidecar whose header names the file's inode, under either name (a rotation renames both,
    one after the other). Bytes that no record dates (no sidecar: an older holder wrote the log,
    or someone removed it) take the file's modification time."""

    def __init__(self, path: str, emit: Callable[[int, bytes], object]) -> None:
        self.emit = emit
        directory, name = os.path.split(path)
        times = os.path.join(directory, times_name(name))
        self._times_paths = (times, f"{times}.1")
        self._lines = LineTimes()
        self._log_fd = -1
        self._inode = 0
        self._times_fd = -1
        self._times_at = SIZE

    def file(self, fd: int) -> None:
        """The reader goes on to another file: the one before is complete."""
        self.end()
        self._log_fd = os.dup(fd)  # kept for its modification time
        self._inode = os.fstat(fd).st_ino
        self._lines = LineTimes()

    def chunk(self, data: bytes) -> None:
        self._read_times()
        fallback = 0 if self._lines.recorded else os.fstat(self._log_fd).st_mtime_ns
        for when, line in self._lines.feed(data, fallback):
            self.emit(when, line)

    def end(self) -> None:
        """The file read last ended (rotated away, or its member left): its last line, if it
        has no newline, goes out as it is."""
        for when, line in self._lines.end():
            self.emit(when, line)
        self.close()

    def _read_times(self) -> None:
        """The records written since the last look (they precede the bytes they date)."""
        if self._times_fd < 0 and not self._find_times():
            return
        while True:
            data = os.pread(self._times_fd, _TIMES_READ, self._times_at)
            records = valid_records(data, self._lines.last_record)
            self._lines.add(records)
            self._times_at += len(records) * SIZE
            if len(records) * SIZE < _TIMES_READ:
                return

    def _find_times(self) -> bool:
        for path in self._times_paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            if is_header_of(os.pread(fd, SIZE, 0), self._inode):
                self._times_fd, self._times_at = fd, SIZE
                return True
            os.close(fd)
        return False

    def close(self) -> None:
        for fd in (self._log_fd, self._times_fd):
            if fd >= 0:
                os.close(fd)
        self._log_fd = self._times_fd = -1


class MemberLines:
    """A member's logs (`streams`: stdout, stderr or both) as lines with their times, each
    stream read as `fleetctl logs` reads it; both merged in time order, stdout first at equal
    times."""

    def __init__(self, paths: LogPaths, streams: Sequence[str]) -> None:
        self.name = paths.member
        self.paths = paths
        self._logs: list[tuple[LogReader, TimedLog, list[Line]]] = []
        for stream in streams:
            path = paths.stderr if stream == "stderr" else paths.stdout
            new: list[Line] = []
            timed = TimedLog(path, _appender(new))
            self._logs.append((LogReader(path, on_file=timed.file), timed, new))

    @property
    def directories(self) -> set[str]:
        return {os.path.dirname(reader.path) for reader, _, _ in self._logs}

    def lines(self) -> Iterator[Line]:
        """Every line its logs hold, in time order, read as they are asked for (a member's
        whole logs need not fit in memory); a last line with no newline comes too."""
        return heapq.merge(
            *(_lines_of(reader, timed, new) for reader, timed, new in self._logs), key=_time_of
        )

    def read(self, *, final: bool = False) -> list[Line]:
        """The lines written since the last call, in time order; `final`: the member left, and
        a last line with no newline comes too."""
        batches = []
        for reader, timed, new in self._logs:
            reader.read(timed.chunk)
            if final:
                timed.end()
            batches.append(new[:])
            new.clear()
        return list(heapq.merge(*batches, key=_time_of))

    def close(self) -> None:
        for reader, timed, _ in self._logs:
            reader.close()
            timed.close()


def _lines_of(reader: LogReader, timed: "TimedLog", new: list[Line]) -> Iterator[Line]:
    """One log's lines with their times, a chunk's worth at a time."""
    for chunk in reader.chunks():
        timed.chunk(chunk)
        yield from new
        new.clear()
    timed.end()
    yield from new
    new.clear()


def _appender(lines: list[Line]) -> Callable[[int, bytes], None]:
    def append(when: int, line: bytes) -> None:
        lines.append((when, line))

    return append


def _time_of(line: Line) -> int:
    return line[0]


def stamp(ns: int) -> bytes:
    """RFC 3339 in UTC to the millisecond, as `docker logs -t` (which prints nanoseconds):
    `2026-12-03T16:12:17.123Z`."""
    seconds, rest = divmod(ns, 1_000_000_000)
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{rest // 1_000_000:03d}Z".encode()


class LinePrinter:
    """Lines as `fleetctl logs` prints them: with a member's name (a cluster's logs, as
    compose prints them: `web  | ...`, names padded to one width), then the time (with
    --timestamps), then the line; each ends with a newline."""

    def __init__(self, out: BinaryIO, *, timestamps: bool, names: Sequence[str] = ()) -> None:
        self.out = out
        self.timestamps = timestamps
        self.prefixed = bool(names)
        self._width = max(map(len, names), default=0)

    def write(self, lines: Iterable[tuple[int, str, bytes]]) -> None:
        write = self.out.write
        for when, name, line in lines:
            if self.prefixed:
                self._width = max(self._width, len(name))
                write(f"{name:<{self._width}} | ".encode())
            if self.timestamps:
                write(stamp(when) + b" ")
            write(line if line.endswith(b"\n") else line + b"\n")
        self.out.flush()


def _merged(batches: dict[str, Iterable[Line]]) -> Iterator[tuple[int, str, bytes]]:
    """Every member's lines in time order; lines at equal times in the members' order."""
    named = [_named(name, lines) for name, lines in batches.items()]
    return heapq.merge(*named, key=_time_of_named)


def _named(name: str, lines: Iterable[Line]) -> Iterator[tuple[int, str, bytes]]:
    for when, line in lines:
        yield when, name, line


def _time_of_named(line: tuple[int, str, bytes]) -> int:
    return line[0]


def _last(lines: Iterable[Line], tail: int | None) -> Iterable[Line]:
    """All of `lines`, or the last `tail` of them (which reads them all, keeping only those)."""
    if tail is None:
        return lines
    return collections.deque(lines, maxlen=tail) if tail else ()


def _enough_descriptors() -> None:
    """Raise our open-file limit to its hard limit: a cluster's logs are all open at once (up
    to three descriptors per log: the file, a copy for its modification time, its sidecar),
    and a shell's soft limit (1,024) is used up by some 170 members."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def print_lines(
    found: Sequence[LogPaths],
    printer: LinePrinter,
    *,
    streams: Sequence[str],
    tail: int | None = None,
) -> None:
    """What the members' logs hold, interleaved in time order (with `tail`, each member's last
    lines)."""
    _enough_descriptors()
    logs = [MemberLines(paths, streams) for paths in found]
    try:
        printer.write(_merged({log.name: _last(log.lines(), tail) for log in logs}))
    finally:
        for log in logs:
            log.close()


def follow_lines(
    found: Sequence[LogPaths],
    printer: LinePrinter,
    *,
    streams: Sequence[str],
    tail: int | None = None,
    cluster: bool = False,
) -> None:
    """print_lines, then what the members write, interleaved in time order as it comes,
    until the member leaves its cluster (`cluster`: until every member has, the cluster is
    down); members added meanwhile are followed too. KeyboardInterrupt ends it earlier."""
    _enough_descriptors()
    logs = {paths.member: MemberLines(paths, streams) for paths in found}
    presence = _presence(found, cluster)
    changes = Inotify()
    try:
        watched = all([_watch_directories(changes, log) for log in logs.values()])
        presence.open()
        printer.write(_merged({name: _last(log.read(), tail) for name, log in logs.items()}))
        while True:
            joined = sorted((presence.members or set()) - set(logs)) if cluster else []
            for name in joined:
                logs[name] = MemberLines(_joined(found[0], name), streams)
                watched = _watch_directories(changes, logs[name]) and watched
            final = not presence.present
            printer.write(_merged({name: log.read(final=final) for name, log in logs.items()}))
            if final:
                return
            waiting: list[Inotify | MemberPresence] = [changes]
            if presence.connected:
                waiting.append(presence)
            ready = select.select(waiting, [], [], None if watched else _RETRY)[0]
            if changes in ready:
                changes.drain()
            if presence in ready:
                presence.receive()
            watched = watched or all([_watch_directories(changes, log) for log in logs.values()])
    finally:
        changes.close()
        presence.close()
        for log in logs.values():
            log.close()


def _presence(found: Sequence[LogPaths], cluster: bool) -> MemberPresence:
    """A member's presence; a cluster's, through the socket of a member still served."""
    if not cluster:
        return MemberPresence(found[0].socket, found[0].member)
    served = [paths.socket for paths in found if os.path.exists(paths.socket)]
    return MemberPresence(served[0] if served else found[0].socket)


def _joined(known: LogPaths, name: str) -> LogPaths:
    """The log paths of a member added to the cluster of `known`'s member."""
    runtime_dir = os.path.dirname(os.path.dirname(known.stdout))
    return LogPaths(
        cluster=known.cluster,
        member=name,
        stdout=member_log_path(runtime_dir, name),
        stderr=member_log_path(runtime_dir, name, stderr=True),
        socket=member_socket_path(runtime_dir, name),
    )


def _watch_directories(changes: Inotify, log: MemberLines) -> bool:
    return all([_watch(changes, os.path.join(directory, "-")) for directory in log.directories])
