"""The client of a warm holder template (fleetd.holder.template): a process that imported the
holder program once and forks holders on request, so that a holder costs a fork rather than
an interpreter's start-up (protocol.template is the wire).

    template = Template.start(env)         # python -m fleetd.holder.template, bound to us
    holder = template.fork(argv, env, stdio=(null, log, log), keep=(ready,), gate=gate_read,
                           session=True)   # its pid, and a pidfd (the template reaps it)

fleetd keeps one (fleetd.clusters.warm). Bound clusters share one per client process,
`bound_template(env)`: started by the first cluster, it exits with the process (it watches its
owner's pid), and a process forked from ours starts its own.

A template serves holders whose interpreter would start as its own did (`serves`): a holder
asked for with other PYTHON* or loader variables (a test's PYTHONPATH with a sitecustomize,
say) cannot be forked from it. fleetd then execs the holder; a bound cluster's process replaces
its template with one started in the new environment.

Every failure here is an Unavailable: the caller then execs the holder as it always could. A
template that answered out of turn, or not in time, is killed: an answer that came late would
be taken for the next one's.
"""

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from protocol.errors import ConnectionLost, Unavailable
from protocol.template import (
    MAX_TEMPLATE_MESSAGE,
    Fork,
    Refused,
    decode_answer,
    encode,
)

__all__ = [
    "FORK_TIMEOUT",
    "HOLDER_COMMAND",
    "ForkedHolder",
    "Template",
    "TemplateProcess",
    "bound_template",
    "startup_env",
]

FORK_TIMEOUT = 10.0
"""Seconds a fork may take, the template's own start-up included (its first request waits
until it imported the holder program): a fork takes milliseconds, and a template that hangs
must not take a launch's whole time before the holder is exec'd instead."""
HOLDER_COMMAND = (sys.executable, "-m", "fleetd.holder")
"""A holder exec'd rather than forked (fleetd when its template is gone; a bound cluster whose
process has no template): this interpreter, so the same packages."""
_STARTUP_PREFIXES = ("PYTHON", "LD_", "GLIBC_TUNABLES", "MALLOC_")
"""Variables read when an interpreter, or the loader under it, starts: a forked holder would
not see what they say."""
_CLOSE_GRACE = 1.0
"""Seconds a closed template gets to exit before we stop waiting to reap it (whoever
adopts it reaps it then)."""


def startup_env(env: Mapping[str, str]) -> dict[str, str]:
    """The part of an environment only an interpreter's start honours."""
    return {key: value for key, value in env.items() if key.startswith(_STARTUP_PREFIXES)}


@dataclass(frozen=True)
class ForkedHolder:
    """A holder the template forked. The template is its parent and reaps it: wait for its
    exit on `pidfd` (readable once it exited), signal it with signal.pidfd_send_signal."""

    pid: int
    pidfd: int


class TemplateProcess(Protocol):
    """The template's process, as our child: a subprocess.Popen for one exec'd (`start`), or
    what fleetd shows of the one it forked (fleetd.clusters.warm)."""

    @property
    def pid(self) -> int: ...

    returncode: int | None

    def wait(self, timeout: float | None = None) -> int:
        """Reap it; subprocess.TimeoutExpired if it has not exited within `timeout`."""
        ...


class Template:
    """A running template and the socket to it. Thread-safe: forks are taken one at a time."""

    def __init__(
        self, process: TemplateProcess, sock: socket.socket, env: Mapping[str, str]
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.pidfd = os.pidfd_open(process.pid)
        """Readable once the template exited."""
        self._sock = sock
        self._startup = startup_env(env)
        self._lock = threading.Lock()
        self._open = True
        self._broken = ""
        """Why it is out of use, once it is."""

    @classmethod
    def start(cls, env: Mapping[str, str]) -> "Template":
        """Start a template owned by this process, with environment `env` (it exits once this
        process does, or closes it). It serves at once: requests wait while it imports.
        Raises OSError if it cannot be started."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            command = [
                sys.executable,
                "-m",
                "fleetd.holder.template",
                f"--owner={os.getpid()}",
                f"--socket-fd={theirs.fileno()}",
            ]
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=dict(env),
                cwd="/",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(process, ours, env)

    def serves(self, env: Mapping[str, str]) -> bool:
        """Whether a holder with environment `env` may be forked here: the template runs, and
        the variables only an interpreter's start honours are the ones it started with."""
        return startup_env(env) == self._startup and not self.out_of_use()

    def out_of_use(self) -> bool:
        """Whether the template exited, was closed, or was taken out of use. Never blocks
        (not even on a fork in progress in another thread)."""
        return bool(self._broken) or _readable(self.pidfd, 0)

    def fork(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        stdio: tuple[int, int, int],
        keep: Sequence[int] = (),
        gate: int | None = None,
        session: bool = False,
        cwd: str = "/",
        timeout: float = FORK_TIMEOUT,
    ) -> ForkedHolder:
        """Fork a holder running the holder program with `argv` (see protocol.template.Fork):
        `stdio` become its 0, 1 and 2, `keep` its 3, 4... (protocol.template.KEPT_FROM), and
        with a `gate` it waits for a line there first. The descriptors stay the caller's to
        close. Raises Unavailable (ConnectionLost once the template is gone)."""
        gated = gate is not None
        request = Fork(argv=list(argv), env=dict(env), cwd=cwd, session=session, gated=gated)
        fds = [*stdio, *([gate] if gate is not None else []), *keep]
        with self._lock:
            if self._broken:
                raise Unavailable(f"the holder template is out of use: {self._broken}")
            try:
                socket.send_fds(self._sock, [encode(request)], fds)
                data, pidfds = self._receive(timeout)
            except OSError as exc:
                raise self._break(ConnectionLost(f"the holder template is gone: {exc}")) from None
            try:
                answer = decode_answer(data)
            except msgspec.MsgspecError as exc:
                _close_all(pidfds)
                raise self._break(Unavailable(f"the holder template answered: {exc}")) from None
            if isinstance(answer, Refused):
                _close_all(pidfds)
                raise Unavailable(f"the holder template refused: {answer.message}")
            if len(pidfds) != 1:
                _close_all(pidfds)
                raise self._break(Unavailable("the holder template sent no pidfd"))
            return ForkedHolder(answer.pid, pidfds[0])

    def _receive(self, timeout: float) -> tuple[bytes, list[int]]:
        """The answer, or an error once the template exits or `timeout` passes."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self.pidfd, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(timeout * 1000)}
        if self._sock.fileno() not in ready:
            if ready:
                raise self._break(ConnectionLost("the holder template exited"))
            raise self._break(Unavailable(f"the holder template did not answer within {timeout}s"))
        data, pidfds, flags, _ = socket.recv_fds(self._sock, MAX_TEMPLATE_MESSAGE, 1)
        if not data:
            _close_all(pidfds)
            raise self._break(ConnectionLost("the holder template closed its socket"))
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_all(pidfds)
            raise self._break(Unavailable("the holder template's answer was cut short"))
        return data, pidfds

    def _break(self, error: Unavailable) -> Unavailable:
        """Take the template out of use and end it (a late answer would be read as the next
        request's); the caller holds the lock."""
        self._broken = error.message
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        return error

    def close(self) -> None:
        """End the template (the holders it forked go on), and reap it."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._broken = self._broken or "closed"
            self._sock.close()  # at EOF it would exit too, once done importing
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)
            os.close(self.pidfd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(_CLOSE_GRACE)

    def forget(self) -> None:
        """In a process forked from the template's owner: drop our copies of its descriptors.
        The template, and its process, are the parent's."""
        self._open = False
        self._broken = "it belongs to the parent process"
        self._sock.close()
        os.close(self.pidfd)
        self.process.returncode = 0  # not our child: never wait for it (its pid may be reused)


class _BoundTemplate:
    """This process's template for bound clusters, once started."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.template: Template | None = None

    def get(self, env: Mapping[str, str]) -> Template:
        with self.lock:
            if self.template is not None and not self.template.serves(env):
                self.template.close()
                self.template = None
            if self.template is None:
                self.template = Template.start(env)
            return self.template

    def forget(self) -> None:
        """In a child forked from this process: the template is the parent's."""
        self.lock = threading.Lock()  # another thread may have held it at the fork
        if self.template is not None:
            self.template.forget()
            self.template = None


_bound = _BoundTemplate()
os.register_at_fork(after_in_child=_bound.forget)


def bound_template(env: Mapping[str, str] | None = None) -> Template:
    """This process's template for bound clusters, serving holders with environment `env`
    (ours by default): started on first use, and again once it is out of use or was started
    in another environment (the one template a process keeps follows its latest: a process
    that went back and forth would start one each time, as an exec'd holder costs anyway).
    Raises OSError if it cannot be started."""
    return _bound.get(os.environ if env is None else env)


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
