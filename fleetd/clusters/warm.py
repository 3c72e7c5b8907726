"""fleetd's warm holder template (fleetd.holder.template, driven through fleetctl.template):
started before fleetd's event loop and threads, followed by its pidfd, and started again
after a pause once it is gone. Meanwhile holders are exec'd as before (fleetd.clusters.launch).

The pause doubles while templates keep dying young, so that one that cannot start or live
costs a process start every few minutes at most, not a tight loop; it starts over from the
first once a template lived STEADY seconds.

The first template is forked from fleetd itself, not exec'd: started before the event loop,
fleetd has one thread then, and the template starts with every module fleetd imported
(the interpreter, asyncio, uvloop, anyio, msgspec, structlog, protocol, fleetd.core), whose
pages fleetd, the template and every holder it forks then share until one of them writes to
them: where an exec'd template had its own copy of them all, several MiB. A template started
again later, from the event loop, where threads run, is exec'd as before.
"""

import contextlib
import fcntl
import os
import runpy
import select
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping
from typing import NoReturn

import anyio
import structlog
from anyio.abc import TaskStatus

from fleetctl.template import Template

log = structlog.get_logger("fleetd.clusters")

RESTART_FIRST = 5.0
"""Seconds between a template's exit and the next template's start, at first."""
RESTART_MAX = 300.0
STEADY = 60.0


class WarmTemplate:
    """fleetd's one template, when it runs. `env` is the holders' (fleetd.clusters.launch.
    holder_env): the template's own, and each forked holder's."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.template: Template | None = None

    def start(self) -> None:
        """Start a template now (blocking: fleetd's start-up calls this before its event loop
        runs). One that cannot start is said so, and holders are exec'd meanwhile."""
        try:
            if threading.active_count() == 1:
                self.template = fork_template(self.env)
            else:
                self.template = Template.start(self.env)
        except OSError as exc:
            log.warning("holder_template_not_started", error=str(exc))

    def usable(self) -> Template | None:
        """The template, unless it is gone or out of use."""
        template = self.template
        return template if template is not None and template.serves(self.env) else None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Follow the template; start another after a pause whenever it is gone. Cancelled,
        close it (it exits; the holders it forked go on)."""
        pause = RESTART_FIRST
        task_status.started()
        try:
            while True:
                if self.template is not None:
                    log.info("holder_template_started", pid=self.template.pid)
                    pause = await self._until_exit(self.template, pause)
                await anyio.sleep(pause)
                pause = min(pause * 2, RESTART_MAX)
                await anyio.to_thread.run_sync(self.start)
        finally:
            self.close()

    async def _until_exit(self, template: Template, pause: float) -> float:
        """Wait until the template exits; the pause before the next one."""
        born = anyio.current_time()
        await anyio.wait_readable(template.pidfd)
        self.template = None
        template.close()  # reaps it
        log.warning(
            "holder_template_exited", pid=template.pid, exit_code=template.process.returncode
        )
        return RESTART_FIRST if anyio.current_time() - born >= STEADY else pause

    def close(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None


TEMPLATE_MODULE = "fleetd.holder.template"
"""The template program: run in the forked child as `python -m` runs it in an exec'd one."""


def fork_template(env: Mapping[str, str]) -> Template:
    """A template forked from this process, which must have only one thread (a fork copies
    only the calling thread): as Template.start's, with environment `env`, working directory
    /, stdin and stdout on /dev/null, our stderr, and no other descriptor but its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    owner = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError):  # None, or closed, without stdio
            stream.flush()  # what a buffer holds now would be written twice
    try:
        pid = os.fork()
    except BaseException:
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        _become_template(theirs.detach(), owner, env)
    theirs.close()
    return Template(ForkedProcess(pid), ours, env)


def _become_template(sock: int, owner: int, env: Mapping[str, str]) -> NoReturn:
    """In the child: run the template program until it exits; never returns."""
    code = 1
    try:
        given, sock = sock, fcntl.fcntl(sock, fcntl.F_DUPFD, 3)  # above stdio, whichever it was
        null = os.open(os.devnull, os.O_RDWR)
        for fd in {0, 1, given} & {0, 1, 2}:  # a socket where fleetd had no stdio: not ours
            os.dup2(null, fd)
        os.closerange(3, sock)
        os.closerange(sock + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir("/")
        os.environ.clear()
        os.environ.update(env)
        sys.argv = [sys.argv[0], f"--owner={owner}", f"--socket-fd={sock}"]
        runpy.run_module(TEMPLATE_MODULE, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stopped:
        code = stopped.code if isinstance(stopped.code, int) else int(stopped.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stderr.flush()
        os._exit(code)


class ForkedProcess:
    """The forked template as our child, as subprocess.Popen shows an exec'd one."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if timeout is not None and not _exits_within(self.pid, timeout):
                raise subprocess.TimeoutExpired(TEMPLATE_MODULE, timeout)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def _exits_within(pid: int, timeout: float) -> bool:
    pidfd = os.pidfd_open(pid)  # our unreaped child: its pid is still its own
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(pidfd)
