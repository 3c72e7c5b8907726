"""The warm holder template: `python -m fleetd.holder.template --owner PID --socket-fd FD`,
exec'd, or run so in a child fleetd forked at its start (fleetd.clusters.warm).

It imports the holder program once, then forks a holder for each request on its socket
(protocol.template; fleetctl.template is the client), so that a holder costs a fork instead
of an interpreter's start-up and imports, and shares the template's pages until it writes
them (the template's objects are frozen out of the collector first, so that no collection in
a holder writes to them).

Single-threaded, always: no thread and no event loop ever run here, since a fork copies only
the calling thread and a lock another thread held would stay locked in the child. It polls
three descriptors: its socket (requests; EOF: its owner is done with it), a wake-up pipe for
SIGCHLD (it reaps the holders it forked) and a pidfd of its owner (fleetd, or a client
process with bound clusters), which ends it once the owner exits. Not PR_SET_PDEATHSIG: that
fires when the *thread* that started the template ends, and a client may start it from any
thread. The holders it forked outlive it: detached ones are session leaders, bound ones
watch their client themselves.

A forked holder starts as an exec'd one would: the signal dispositions of a fresh
interpreter and an empty signal mask; only the descriptors it was given (stdin, stdout and
stderr at 0, 1 and 2, the ones to keep from KEPT_FROM); a session of its own if asked; the
working directory and exactly the environment asked; behind its gate if it has one (a line:
run; EOF: exit, nothing ran, as fleetd.clusters.launch.GATE). Then the holder program's main,
and os._exit: a forked holder never returns into the template's loop. Its start time, which
fleetd journals and its pidfile repeats, is the time of the fork.
"""

import argparse
import contextlib
import fcntl
import gc
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn

import msgspec

from fleetd.core.startup import (
    leave_rich_out,
    load_what_anyio_loads_as_it_runs,
    name_process,
    return_free_memory,
)
from protocol.template import (
    MAX_FORK_FDS,
    MAX_TEMPLATE_MESSAGE,
    Fork,
    Forked,
    Refused,
    TemplateAnswer,
    decode_request,
    encode,
)

_RESET_SIGNALS = (signal.SIGCHLD, signal.SIGINT)
"""The signals whose disposition the template changes, and a holder gets back."""

Main = Callable[[Sequence[str]], int]
Disposition = Callable[[int, FrameType | None], Any] | int


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fleetd.holder.template",
        description="Fork holders on request (see fleetd.holder.template).",
    )
    parser.add_argument("--owner", type=int, required=True, help="exit when this process does")
    parser.add_argument("--socket-fd", type=int, required=True, help="the requests' socket")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name_process("fleetd-template")
    fresh = _dispositions(_RESET_SIGNALS)
    # A ^C at a terminal reaches the owner's whole process group: the owner decides what
    # becomes of it, and of us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    owner = _watch_owner(args.owner)
    if owner is None:
        return 0
    gc.disable()  # a collection while importing would leave holes in pages every holder shares
    leave_rich_out()
    load_what_anyio_loads_as_it_runs()  # what a holder imports, loaded once here
    from fleetd.holder import program

    program._parser()  # once here, its patterns compiled into re's cache for every holder
    requests = socket.socket(fileno=args.socket_fd)
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _wake)

    def run(argv: Sequence[str]) -> int:
        return program.main(argv)  # looked up now: a test's sitecustomize may have wrapped it

    template = _Template(requests, wake_read, owner, fresh, run)
    return_free_memory()
    template.serve()
    return 0


def _dispositions(signals: Sequence[int]) -> dict[int, Disposition]:
    """What these signals do now (in a fresh interpreter: before we change them)."""
    found: dict[int, Disposition] = {}
    for signum in signals:
        disposition = signal.getsignal(signum)
        if disposition is not None:  # set outside Python: nothing to restore
            found[signum] = disposition
    return found


def _wake(signum: int, frame: FrameType | None) -> None:
    """A handler of our own, so that SIGCHLD reaches the wake-up pipe; the loop reaps."""


def _watch_owner(pid: int) -> int | None:
    """A pidfd of the owner, which started us; None when it is gone already (our parent is
    someone else by now)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if os.getppid() != pid:
        os.close(pidfd)
        return None
    return pidfd


class _Template:
    def __init__(
        self,
        requests: socket.socket,
        wake: int,
        owner: int,
        fresh: dict[int, Disposition],
        run: Main,
    ) -> None:
        self.requests = requests
        self.wake = wake
        self.owner = owner
        self.fresh = fresh
        self.run = run

    def serve(self) -> None:
        """Until the owner exits or closes its end of the socket."""
        poller = select.poll()
        for fd in (self.requests.fileno(), self.wake, self.owner):
            poller.register(fd, select.POLLIN)
        while True:
            gc.freeze()  # what each holder will share, out of the collector's reach
            ready = {fd for fd, _ in poller.poll()}
            if self.wake in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wake, 512):
                        pass
                _reap()
            if self.requests.fileno() in ready and not self._answer_one():
                return
            if self.owner in ready:
                return

    def _answer_one(self) -> bool:
        """Answer one request; False once the owner is done with us."""
        try:
            data, fds, flags, _ = socket.recv_fds(self.requests, MAX_TEMPLATE_MESSAGE, MAX_FORK_FDS)
        except OSError:
            return False
        if not data:
            _close_all(fds)
            return False
        pidfd = None
        try:
            answer: TemplateAnswer
            try:
                answer, pidfd = self._fork(data, fds, flags)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                answer = Refused(message=f"not a fork request: {exc}")
            except _Refusal as exc:
                answer = Refused(message=str(exc))
            except OSError as exc:
                answer = Refused(message=f"cannot fork: {exc}")
            try:
                socket.send_fds(
                    self.requests, [encode(answer)], [pidfd] if pidfd is not None else []
                )
            except OSError:
                return False
        finally:
            _close_all(fds)
            if pidfd is not None:
                os.close(pidfd)
        return True

    def _fork(self, data: bytes, fds: list[int], flags: int) -> tuple[Forked, int]:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise _Refusal("the request was cut short: too large, or too many descriptors")
        request = decode_request(data)
        problem = request.fds_problem(len(fds))
        if problem:
            raise _Refusal(problem)
        pid = os.fork()
        if pid == 0:
            self._become_holder(request, fds)
        # Opened before the loop could reap it: the pid cannot have been recycled yet.
        return Forked(pid=pid), os.pidfd_open(pid)

    def _become_holder(self, request: Fork, fds: list[int]) -> NoReturn:
        """In the child: never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum, disposition in self.fresh.items():
                signal.signal(signum, disposition)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            self.requests.detach()  # closed below with the rest: its object must not close it
            gate = _arrange_fds(fds, request.gated)
            if request.session:
                os.setsid()
            os.chdir(request.cwd)
            os.environ.clear()
            os.environ.update(request.env)
            if gate is not None:
                _pass_gate(gate)
            gc.enable()
            code = self.run(request.argv)
        except SystemExit as stopped:  # argparse's, say
            code = _exit_status(stopped)
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _exit_status(stopped: SystemExit) -> int:
    """What the interpreter would exit with."""
    if stopped.code is None:
        return 0
    return stopped.code if isinstance(stopped.code, int) else 1


class _Refusal(Exception):
    """A request the template will not fork for."""


def _arrange_fds(fds: list[int], gated: bool) -> int | None:
    """stdin, stdout and stderr at 0, 1 and 2, the ones to keep from KEPT_FROM, the gate just
    above them; every other descriptor closed. The gate's new number, if there is one."""
    stdio, rest = fds[:3], fds[3:]
    gate = rest.pop(0) if gated else None
    placed = [*stdio, *rest]  # at 0, 1, 2, then from KEPT_FROM (3) on
    if gate is not None:
        placed.append(gate)
    # First above every target, so that placing one never overwrites another not placed yet.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, len(placed)) for fd in placed]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=target < 3)
    os.closerange(len(placed), os.sysconf("SC_OPEN_MAX"))
    return len(placed) - 1 if gate is not None else None


def _pass_gate(gate: int) -> None:
    """Wait for a line on the gate; at EOF (the launcher died before it journaled us) exit
    without running anything."""
    received = b""
    while b"\n" not in received:
        chunk = os.read(gate, 64)
        if not chunk:
            os._exit(0)
        received += chunk
    os.close(gate)


def _reap() -> None:
    """Every holder of ours that exited."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
