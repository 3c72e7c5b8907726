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

import contextlib
import ctypes
import errno
import os
import select
import socket
from collections.abc import Callable, Iterator
from typing import BinaryIO

from fleetctl._peer import check_peer
from protocol.base import Op
from protocol.clusters import LogPaths
from protocol.connection import ClientConnection, decode_result, result_of
from protocol.errors import ConnectionLost
from protocol.members import MemberState, MemberStatus, StatusAll, Watch, WatchResult
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

    def __init__(self, path: str) -> None:
        self.path = path
        self.rotated = f"{path}.1"
        self._fd = -1
        self._id: FileId | None = None
        self._finished: FileId | None = None
        """The file last read to its end, which PATH.1 names after a rotation."""
        self._started = False

    def read(self, write: Callable[[bytes], object]) -> None:
        """Pass everything written since the last call to `write`; the first call starts with
        PATH.1, the rotated part."""
        if not self._started:
            self._started = True
            self._open()  # PATH first: a rotation now moves it to PATH.1, which is then skipped
            self._whole(self.rotated, write, unless=(self._id,))
        while self._fd >= 0 or self._open():
            self._rest(write)
            current = _id_of(self.path)
            if current is None or current == self._id:
                return  # still ours, or mid-rotation (the new PATH comes next)
            self._rest(write)  # ours was rotated away: it is complete
            self._finished = self._id
            self.close()
            self._whole(self.rotated, write, unless=(self._finished, current))

    def _open(self) -> bool:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False  # a member that printed nothing has no log yet
        status = os.fstat(self._fd)
        self._id = status.st_dev, status.st_ino
        return True

    def _rest(self, write: Callable[[bytes], object]) -> None:
        for chunk in _chunks(self._fd):
            write(chunk)

    def _whole(
        self, path: str, write: Callable[[bytes], object], *, unless: tuple[FileId | None, ...]
    ) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            status = os.fstat(fd)
            if (status.st_dev, status.st_ino) in unless:
                return
            for chunk in _chunks(fd):
                write(chunk)
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
    """Whether a member is still in its cluster, from its holder: a `watch` on its member
    socket (a snapshot of the members, then a push per change), read when select says so,
    through the sans-io core (protocol.connection). A member that reports stopped may have
    exited and stay (stopped), or have left: `status_all`, which lists only the members in the
    cluster, tells. The holder closing the connection means it exited, and every member is
    gone. Without a socket path to ask (an older fleetd), the member is taken to be there for
    good."""

    def __init__(self, socket_path: str, member: str) -> None:
        self.socket_path = socket_path
        self.member = member
        self.present = True
        self._sock: socket.socket | None = None
        self._core = ClientConnection(peer="the holder", on_push=self._pushed)
        self._asked: list[int] = []
        """The watch, then each status_all, in the order sent: each answer updates `present`."""

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
            self.present = False
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
                self._gone()
                return
            if answer is None:
                return
            self._asked.pop(0)
            members = result_of(answer, StatusAll).members  # an error frame raises here
            self.present = any(status.name == self.member for status in members)
        if core.failure is not None:
            self._gone()

    def _pushed(self, response: RawResponse) -> None:
        pushed = decode_result(response, MemberStatus)
        if pushed.name == self.member and pushed.state == MemberState.STOPPED:
            self._send(StatusAll)

    def _send(self, op: type[Op[WatchResult]], *, pushes: bool = False) -> None:
        request_id, frame = self._core.send(op, {}, pushes=pushes)
        self._asked.append(request_id)
        if self._sock is None:
            return
        try:
            self._sock.sendall(frame)
        except OSError:  # the holder is exiting: not the caller's stdout's broken pipe
            self._gone()

    def _gone(self) -> None:
        """The holder closed the connection: it exited, and every member with it."""
        self.present = False
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
