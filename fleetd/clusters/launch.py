"""Starting a detached holder for `fleetctl up`, and waiting until it serves.

A detached holder is a session leader with no tie to fleetd: fleetd's SIGTERM, crash or
upgrade leaves it and its members running (as containerd's shims outlive containerd).

It is forked from fleetd's warm template (fleetd.clusters.warm) when one runs, else exec'd
(`python -m fleetd.holder`) as it always could be; both ways alike. The record is written
(`starting`) before the holder is spawned, and the holder's pid and start time are journaled
before it runs: it is spawned behind a gate that fleetd opens only then (GATE for an exec'd
holder; the template's child waits on the same pipe). So a fleetd that dies mid-launch leaves
either a record naming the holder, which the next fleetd adopts (fleetd.clusters.adoption),
or a gate that read EOF and started nothing, whose record is cleaned up: never a holder that
nothing names (which start-up gc would take for dead, and remove the files of while it
starts).
"""

import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import anyio
import msgspec
import structlog

from fleetctl.template import HOLDER_COMMAND, ForkedHolder, Template
from fleetd.clusters.follow import READY_TIMEOUT, Follower
from fleetd.clusters.index import Held
from fleetd.clusters.links import holder_ready
from fleetd.clusters.records import HolderRecord, encode, holder_key
from fleetd.clusters.rundirs import CLUSTERS_DIR
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import process_start_time
from fleetd.state import RUNTIME_SUBDIR
from fleetd.store import Store
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import FleetError, InvalidRequest, Unavailable
from protocol.members import CLUSTER_FILE, HOLDER_LOG, runtime_dir_problem
from protocol.template import KEPT_FROM

log = structlog.get_logger("fleetd.clusters")

GATE = 'read -r go && exec "$@" </dev/null'
"""An exec'd holder's first process: a shell that waits for fleetd's line on its stdin, then
execs the holder in its place (same pid, same start time: what the journal already names); at
EOF (fleetd died before it journaled the pid) it exits, and no holder ever runs."""

_Args = Callable[[str, str, int], list[str]]
"""holder_args with a launch's own options given: (spec file, runtime dir, ready fd)."""

_SCRUBBED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_SCRUBBED_PREFIXES = ("LISTEN_",)


def holder_env(environ: Mapping[str, str]) -> dict[str, str]:
    """fleetd's environment minus what systemd meant for fleetd alone: a holder that inherited
    NOTIFY_SOCKET would speak for fleetd, and LISTEN_FDS would name fds it does not have."""
    return {
        key: value
        for key, value in environ.items()
        if key not in _SCRUBBED_ENV and not key.startswith(_SCRUBBED_PREFIXES)
    }


def holder_args(
    spec_file: str,
    runtime_dir: str,
    ready_fd: int,
    *,
    stopped: Collection[str] = (),
    ports: Mapping[str, int] | None = None,
) -> list[str]:
    """The holder's arguments; members in `stopped` are kept stopped, and `ports` are the
    ports members get back (a cluster started again: see Launcher.launch)."""
    args = [f"--spec={spec_file}", f"--dir={runtime_dir}", f"--ready-fd={ready_fd}"]
    args += [f"--stopped={name}" for name in sorted(stopped)]
    args += [f"--port={name}={port}" for name, port in sorted((ports or {}).items())]
    return args


def popen_detached(
    command: list[str], log_fd: int, gate: int, ready_fd: int
) -> subprocess.Popen[bytes]:
    """Fork and exec the holder's gate (GATE) in its own session, reading `gate`; it becomes
    the holder once fleetd writes a line there. subprocess, not anyio.open_process: an event
    loop's process transport kills a child still running when it closes, and a detached
    holder must outlive fleetd."""
    return subprocess.Popen(
        ["/bin/sh", "-c", GATE, "fleetd-holder", *command],
        stdin=gate,
        stdout=log_fd,
        stderr=log_fd,
        pass_fds=(ready_fd,),
        start_new_session=True,
        env=holder_env(os.environ),
        cwd="/",
    )


def fork_detached(
    template: Template,
    args: list[str],
    env: Mapping[str, str],
    *,
    log_fd: int,
    gate: int,
    ready: int,
) -> ForkedHolder:
    """The holder forked from the template, as popen_detached would start it: its own
    session, stdin /dev/null, its output to its log, behind `gate`, `ready` kept (at
    KEPT_FROM, which `args` names). Raises Unavailable."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return template.fork(
            args, env, stdio=(null, log_fd, log_fd), keep=(ready,), gate=gate, session=True
        )
    finally:
        os.close(null)


@dataclass(frozen=True)
class Started:
    """A holder just spawned (at its gate): its pid, a pidfd, and, when fleetd exec'd it,
    the process to reap (a forked holder is the template's child: the template reaps it)."""

    pid: int
    pidfd: int
    process: subprocess.Popen[bytes] | None = None


class Launcher:
    """Starts holders: their definition in the state directory, their runtime directory in
    `runtime`'s c/, their record in the store; hands each to the follower once it serves.
    They are forked from `template` while it runs."""

    def __init__(
        self,
        store: Store,
        state: PrivateDir,
        runtime: PrivateDir,
        follower: Follower,
        template: WarmTemplate | None = None,
    ) -> None:
        self.store = store
        self.state = state
        self.runtime = runtime
        self.follower = follower
        self.template = template

    async def launch(
        self,
        spec: ClusterSpec,
        runtime_dir: str,
        *,
        members: Sequence[MemberSpec] = (),
        stopped: Collection[str] = (),
        ports: Mapping[str, int] | None = None,
    ) -> Held:
        """A holder for `spec` (what the journal records as the cluster's definition),
        serving it once ready. A cluster started again after its last member stopped (its
        holder exited) is given `members` (its definition and the members added since),
        those in `stopped` kept stopped, and the `ports` its members had."""
        served = ClusterSpec(name=spec.name, members=list(members)) if members else spec
        problem = runtime_dir_problem(runtime_dir, [m.name for m in served.members])
        if problem:
            raise InvalidRequest(problem, cluster=spec.name)
        spec_file = self.write_definition(served)
        record = HolderRecord(spec=spec, dir=runtime_dir, log=os.path.join(runtime_dir, HOLDER_LOG))
        await self.store.put(holder_key(spec.name), encode(record))  # journaled before it exists
        log_fd = self._open_holder_log(spec.name)
        extra = functools.partial(holder_args, stopped=stopped, ports=ports)
        try:
            started, record = await self._spawn(spec_file, record, log_fd, extra)
        finally:
            os.close(log_fd)
        record = msgspec.structs.replace(record, state="live")
        specs = {m.name: m for m in served.members}
        held = Held(spec.name, record, started.pidfd, specs, process=started.process)
        await self.follower.follow(held)
        log.info("holder_started", cluster=spec.name, pid=started.pid, dir=runtime_dir)
        return held

    def write_definition(self, spec: ClusterSpec) -> str:
        """clusters/<name>/cluster.json in the state directory (what a holder of it starts
        with, and what apply made of it); its path."""
        try:
            with (
                self.state.subdir(CLUSTERS_DIR) as clusters,
                clusters.subdir(spec.name) as directory,
            ):
                directory.write_atomically(CLUSTER_FILE, msgspec.json.encode(spec))
                return directory.join(CLUSTER_FILE)
        except OSError as exc:
            raise FleetError(f"cannot prepare cluster {spec.name!r}: {exc}") from None

    def _open_holder_log(self, cluster: str) -> int:
        """The runtime directory c/<cluster>/ (made 0700, or an existing one of ours, never
        through a link) and the holder's log in it, open for appending."""
        try:
            with (
                self.runtime.subdir(RUNTIME_SUBDIR) as root,
                root.subdir(cluster) as directory,
            ):
                return directory.open_file(HOLDER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise FleetError(f"cannot prepare cluster {cluster!r}: {exc}") from None

    async def _spawn(
        self, spec_file: str, record: HolderRecord, log_fd: int, args: "_Args"
    ) -> tuple[Started, HolderRecord]:
        """The holder, detached, its output to its log; and its record, which names it (pid
        and start time) in the journal before the gate opens. Returns once it is ready."""
        ready_read, ready_write = os.pipe()
        gate_read, gate_write = os.pipe()
        unclosed = {ready_read, ready_write, gate_read, gate_write}

        def close(fd: int) -> None:
            unclosed.discard(fd)
            os.close(fd)

        try:
            started = await self._start(
                spec_file, record.dir, log_fd, gate_read, ready_write, args=args
            )
            close(ready_write)
            close(gate_read)
            try:
                # A fork's start time is the fork's; exec keeps the gate's: the holder's own.
                start_time = process_start_time(started.pid) or 0
                record = msgspec.structs.replace(record, pid=started.pid, start_time=start_time)
                await self.store.put(holder_key(record.spec.name), encode(record))
                os.write(gate_write, b"go\n")
                close(gate_write)
                await holder_ready(ready_read, READY_TIMEOUT, record.dir)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._abandon(started, record)
                raise
        finally:
            for fd in unclosed:
                os.close(fd)
        return started, record

    async def _start(
        self, spec_file: str, runtime_dir: str, log_fd: int, gate: int, ready: int, *, args: "_Args"
    ) -> Started:
        """The holder at its gate: forked from the template if one serves, else exec'd."""
        if self.template is not None:
            forked_args = args(spec_file, runtime_dir, KEPT_FROM)
            forked = await self._fork(
                self.template, forked_args, log_fd=log_fd, gate=gate, ready=ready
            )
            if forked is not None:
                return Started(forked.pid, forked.pidfd)
        command = [*HOLDER_COMMAND, *args(spec_file, runtime_dir, ready)]
        process = await anyio.to_thread.run_sync(popen_detached, command, log_fd, gate, ready)
        return Started(process.pid, os.pidfd_open(process.pid), process)

    async def _fork(
        self, warm: WarmTemplate, args: list[str], *, log_fd: int, gate: int, ready: int
    ) -> ForkedHolder | None:
        """Forked from the template; None when it is gone or fails (then exec it: one that
        misbehaved is out of use, and fleetd.clusters.warm starts another)."""
        template = warm.usable()
        if template is None:
            return None
        fork = functools.partial(fork_detached, log_fd=log_fd, gate=gate, ready=ready)
        try:
            return await anyio.to_thread.run_sync(fork, template, args, warm.env)
        except Unavailable as exc:
            log.warning("holder_template_failed", pid=template.pid, error=exc.message)
            return None

    async def _abandon(self, started: Started, record: HolderRecord) -> None:
        """A holder that failed to get ready: kill it, see it exit, journal it gone."""
        with contextlib.suppress(ProcessLookupError):  # it is gone already
            signal.pidfd_send_signal(started.pidfd, signal.SIGKILL)
        if started.process is not None:
            # Our child, not reaped yet: its group cannot be another's (a forked holder's
            # pid is reaped by the template, and could be; its members die with it anyway).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(started.process.wait)
        else:
            await anyio.wait_readable(started.pidfd)
        os.close(started.pidfd)
        await self.follower.gone(record, reason="holder_failed_to_start")
