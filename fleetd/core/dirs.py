"""Directories fleetd owns, held open: every name inside is resolved relative to a checked
directory descriptor and never through a symbolic link.

A supervisor writes, renames and deletes files on its users' behalf. A link planted in its
state directory (`files` → somebody's home) would turn a start-up sweep into a deletion
there, and a directory another user created first would let that user swap fleetd's socket.
So a `PrivateDir` is opened once, checked (a directory, owned by fleetd's user or root, not
writable by group or others), and from then on:

- a subdirectory is created mode 0700 and opened with O_NOFOLLOW, and checked the same way;
- a file is opened with O_NOFOLLOW and O_NONBLOCK (a planted FIFO cannot block fleetd) and
  must be a regular file;
- unlink, rename and rmdir act on the entry itself (the kernel never follows a link there);
- trees are removed with shutil.rmtree's descriptor-based walk, which never leaves the tree.

The configured directory itself (``$FLEET_STATE_DIR``, the socket's directory) may be reached
through links an administrator set up; what it resolves to is checked like the rest.
"""

import errno
import os
import shutil
import stat
from contextlib import suppress

from protocol.errors import UnsafePath

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TRUSTED_OWNERS = frozenset({os.geteuid(), 0})


def unsafe_reason(st: os.stat_result, *, directory: bool) -> str | None:
    """Why an entry with this lstat/fstat may not be used, or None."""
    wanted = stat.S_ISDIR if directory else stat.S_ISREG
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not wanted(st.st_mode):
        return f"is not a {'directory' if directory else 'regular file'}"
    if st.st_uid not in _TRUSTED_OWNERS:
        return f"is owned by uid {st.st_uid}, not by fleetd's user ({os.geteuid()}) or root"
    if directory and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def make_private_dirs(path: str) -> None:
    """Create `path` and any missing parent mode 0700 (os.makedirs gives parents 0777 & umask);
    what exists already is left as it is (PrivateDir.open checks the last one)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    make_private_dirs(os.path.dirname(path))
    with suppress(FileExistsError):
        os.mkdir(path, 0o700)


class PrivateDir:
    """An open, checked directory. Close it with `close` (or `with`)."""

    __slots__ = ("fd", "path")  # one per member of a holder

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str, *, create: bool = True) -> "PrivateDir":
        """The directory at `path` (created 0700 with its parents if missing and `create`);
        raises UnsafePath when it is not fleetd's, OSError when it cannot be opened."""
        path = os.path.abspath(path)
        if create:
            make_private_dirs(path)
        fd = os.open(path, _DIRECTORY)
        return cls._checked(fd, path)

    @classmethod
    def _checked(cls, fd: int, path: str) -> "PrivateDir":
        reason = unsafe_reason(os.fstat(fd), directory=True)
        if reason is not None:
            os.close(fd)
            raise UnsafePath(f"refusing {path}: it {reason}", path=path)
        return cls(fd, path)

    def __enter__(self) -> "PrivateDir":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def join(self, name: str) -> str:
        """The path of `name` inside, for messages and for programs that need a path."""
        return os.path.join(self.path, name)

    # Subdirectories ------------------------------------------------------------------------

    def subdir(self, name: str, *, create: bool = True) -> "PrivateDir":
        """`name` inside, created 0700 if missing and `create`; never through a link.
        Raises UnsafePath for a link, a file or another user's directory, FileNotFoundError
        when it is missing and not to be created."""
        _check_component(name)
        if create:
            with suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=self.fd)
        try:
            fd = os.open(name, _DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(
                    f"refusing {self.join(name)}: it {self._kind_of(name)}", path=self.join(name)
                ) from None
            raise
        return PrivateDir._checked(fd, self.join(name))

    def make_subdir(self, name: str) -> None:
        """`name` inside, made 0700 if missing, as `subdir` makes it, but not opened when it
        is new (a tenth of the cost); one already there is checked as `subdir` checks it."""
        _check_component(name)
        try:
            os.mkdir(name, 0o700, dir_fd=self.fd)
        except FileExistsError:
            self.subdir(name, create=False).close()

    def _kind_of(self, name: str) -> str:
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return "is not a directory"
        return unsafe_reason(st, directory=True) or "is not a directory"

    # Files ---------------------------------------------------------------------------------

    def open_file(self, name: str, flags: int, mode: int = 0o600) -> int:
        """A descriptor of the regular file `name` (O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC added);
        raises UnsafePath for a link or anything but a regular file of fleetd's user."""
        _check_component(name)
        try:
            fd = os.open(
                name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=self.fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(
                    f"refusing {self.join(name)}: it is a symbolic link", path=self.join(name)
                ) from None
            raise
        reason = unsafe_reason(os.fstat(fd), directory=False)
        if reason is not None:
            os.close(fd)
            raise UnsafePath(f"refusing {self.join(name)}: it {reason}", path=self.join(name))
        return fd

    def read_file(self, name: str, limit: int = 1 << 20) -> bytes:
        fd = self.open_file(name, os.O_RDONLY)
        try:
            return os.read(fd, limit)
        finally:
            os.close(fd)

    def write_new(self, name: str, data: bytes) -> None:
        """A file of `data` where there is none (else written atomically): no reader knows a
        new file yet, so it needs neither a temporary nor a rename (a third of the cost)."""
        try:
            fd = self.open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            self.write_atomically(name, data)
            return
        try:
            write_all(fd, data)
        except BaseException:
            with suppress(OSError):
                os.unlink(name, dir_fd=self.fd)
            raise
        finally:
            os.close(fd)

    def write_atomically(self, name: str, data: bytes, *, durable: bool = False) -> None:
        """Readers see the old content or the new, never a torn write; `durable`: fsynced,
        and so is the directory entry."""
        temporary = f"{name}.tmp"
        with suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=self.fd)
        fd = self.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            write_all(fd, data)
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with suppress(OSError):
                os.unlink(temporary, dir_fd=self.fd)
            raise
        os.close(fd)
        os.replace(temporary, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        if durable:
            self.fsync()

    def entry(self, name: str) -> os.stat_result | None:
        """The entry itself (a link is not followed), or None when there is none."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def unlink(self, name: str) -> bool:
        """Remove the entry (a link itself, never its target); False if it was not there."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def move(self, name: str, to: "PrivateDir", new_name: str) -> None:
        """Rename the entry `name` (whatever it is: a link moves as a link) into `to`."""
        _check_component(new_name)
        os.rename(name, new_name, src_dir_fd=self.fd, dst_dir_fd=to.fd)

    def remove_tree(self, name: str) -> bool:
        """Remove `name` and everything below it without following a link (a link is removed
        as a link); False if it was not there."""
        st = self.entry(name)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return self.unlink(name)
        shutil.rmtree(name, dir_fd=self.fd)
        return True

    def fsync(self) -> None:
        os.fsync(self.fd)


def write_all(fd: int, data: bytes) -> None:
    """A full disk writes short first, then fails: loop until all is written or it fails."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _check_component(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"not a single path component: {name!r}")
