"""Starting a detached holder for `fleetctl up`, and waiting until it serves.

A detached holder is a session leader with no tie to fleetd: fleetd's SIGTERM, crash or
upgrade leaves it and its members running (as containerd's shims outlive containerd).

The record is written (`starting`) before the holder is spawned, and the holder's pid and
start time are journaled before it runs: it is spawned behind a gate (GATE) that fleetd opens
only then. So a fleetd that dies mid-launch leaves either a record naming the holder, which
the next fleetd adopts (fleetd.clusters.adoption), or a gate that read EOF and started
nothing, whose record is cleaned up: never a holder that nothing names (which start-up gc
would take for dead, and remove the files of while it starts).
"""

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping

import anyio
import msgspec
import structlog

from fleetd.clusters.follow import READY_TIMEOUT, Follower
from fleetd.clusters.index import Held
from fleetd.clusters.links import holder_log, holder_ready
from fleetd.clusters.records import HolderRecord, encode, holder_key
from fleetd.clusters.rundirs import CLUSTERS_DIR
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import process_start_time
from fleetd.state import RUNTIME_SUBDIR
from fleetd.store import Store
from protocol.definitions import ClusterSpec
from protocol.errors import FleetError, InvalidRequest
from protocol.members import CLUSTER_FILE, HOLDER_LOG, runtime_dir_problem

log = structlog.get_logger("fleetd.clusters")

GATE = 'read -r go && exec "$@" </dev/null'
"""A holder's first process: a shell that waits for fleetd's line on its stdin, then execs
the holder in its place (same pid, same start time: what the journal already names); at EOF
(fleetd died before it journaled the pid) it exits, and no holder ever runs."""

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


class Launcher:
    """Starts holders: their definition in the state directory, their runtime directory in
    `runtime`'s c/, their record in the store; hands each to the follower once it serves."""

    def __init__(
        self, store: Store, state: PrivateDir, runtime: PrivateDir, follower: Follower
    ) -> None:
        self.store = store
        self.state = state
        self.runtime = runtime
        self.follower = follower

    async def launch(self, spec: ClusterSpec, runtime_dir: str) -> Held:
        problem = runtime_dir_problem(runtime_dir, [m.name for m in spec.members])
        if problem:
            raise InvalidRequest(problem, cluster=spec.name)
        spec_file = self._write_definition(spec)
        record = HolderRecord(spec=spec, dir=runtime_dir, log=os.path.join(runtime_dir, HOLDER_LOG))
        await self.store.put(holder_key(spec.name), encode(record))  # journaled before it exists
        log_fd = self._open_holder_log(spec.name)
        try:
            process, record = await self._spawn(spec_file, record, log_fd)
        finally:
            os.close(log_fd)
        try:
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            process.wait()
            await self.follower.gone(record, reason="holder_died_at_start")
            raise FleetError(f"the holder failed to start: {holder_log(record.log)}") from None
        record = msgspec.structs.replace(record, state="live")
        held = Held(spec.name, record, pidfd, {m.name: m for m in spec.members}, process=process)
        await self.follower.follow(held)
        log.info("holder_started", cluster=spec.name, pid=process.pid, dir=runtime_dir)
        return held

    def _write_definition(self, spec: ClusterSpec) -> str:
        """clusters/<name>/cluster.json in the state directory; its path."""
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
        self, spec_file: str, record: HolderRecord, log_fd: int
    ) -> tuple[subprocess.Popen[bytes], HolderRecord]:
        """The holder, detached, its output to its log; and its record, which names it (pid
        and start time) in the journal before the gate opens. Returns once it is ready."""
        ready_read, ready_write = os.pipe()
        gate_read, gate_write = os.pipe()
        unclosed = {ready_read, ready_write, gate_read, gate_write}

        def close(fd: int) -> None:
            unclosed.discard(fd)
            os.close(fd)

        command = [
            sys.executable,
            "-m",
            "fleetd.holder",
            f"--spec={spec_file}",
            f"--dir={record.dir}",
            f"--ready-fd={ready_write}",
        ]
        try:
            process = await anyio.to_thread.run_sync(
                popen_detached, command, log_fd, gate_read, ready_write
            )
            close(ready_write)
            close(gate_read)
            try:
                start_time = process_start_time(process.pid) or 0  # exec keeps it: the holder's
                record = msgspec.structs.replace(record, pid=process.pid, start_time=start_time)
                await self.store.put(holder_key(record.spec.name), encode(record))
                os.write(gate_write, b"go\n")
                close(gate_write)
                await holder_ready(ready_read, READY_TIMEOUT, record.dir)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._abandon(process, record)
                raise
        finally:
            for fd in unclosed:
                os.close(fd)
        return process, record

    async def _abandon(self, process: subprocess.Popen[bytes], record: HolderRecord) -> None:
        """A holder that failed to get ready: kill its session, reap it, journal it gone."""
        with contextlib.suppress(ProcessLookupError):  # its session is gone already
            os.killpg(process.pid, signal.SIGKILL)
        await anyio.to_thread.run_sync(process.wait)
        await self.follower.gone(record, reason="holder_failed_to_start")
