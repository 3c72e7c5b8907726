"""A holder's runtime directory (c/<cluster>/ beside the control socket) as fleetd reads and
clears it: its pidfiles, the definition the holder keeps current, the sockets and logs it left.

The directory is named by a journal record, which fleetd must not trust to point anywhere
else: it is opened only as <socket dir>/c/<cluster>, through checked directory descriptors
(fleetd.core.dirs), never through a link. Everything here blocks on the disk: async callers
run it in a thread where the directory may be large.
"""

import contextlib
import functools
import os
import stat
from collections.abc import Iterator

import msgspec
import structlog

from fleetd.clusters.records import HolderRecord, holder_entry
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import process_start_time
from fleetd.journal import fleetd_entry
from fleetd.state import RUNTIME_SUBDIR
from protocol.claims import ClaimInfo
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import FleetError, UnsafePath
from protocol.members import (
    CLUSTER_FILE,
    HOLDER_PIDFILE,
    NOTIFY_SOCKET,
    PIDFILE,
    STDERR_LOG,
    STDOUT_LOG,
    member_log_path,
)

log = structlog.get_logger("fleetd.clusters")

CLUSTERS_DIR = "clusters"
"""Under the state directory: clusters/<name>/cluster.json, the definition as brought up."""


def runtime_dir_parts(record: HolderRecord) -> tuple[str, str] | None:
    """(the directory holding c/, the cluster) of a runtime directory as fleetd makes them:
    <socket dir>/c/<cluster>; None for anything else (a mangled record must not point
    fleetd at another directory)."""
    path = os.path.normpath(record.dir)
    parent = os.path.dirname(path)
    if not os.path.isabs(path) or os.path.basename(parent) != RUNTIME_SUBDIR:
        return None
    if os.path.basename(path) != record.spec.name:
        return None
    return os.path.dirname(parent), record.spec.name


@contextlib.contextmanager
def opened_runtime_dir(record: HolderRecord) -> Iterator[PrivateDir | None]:
    """A holder's runtime directory, opened without following a link; None when it is gone
    (gc removed it, or it was never made), or is not a directory fleetd made (logged)."""
    parts = runtime_dir_parts(record)
    directory: PrivateDir | None = None
    if parts is not None:
        root, cluster = parts
        try:
            with (
                PrivateDir.open(root, create=False) as top,
                top.subdir(RUNTIME_SUBDIR, create=False) as runtime,
            ):
                directory = runtime.subdir(cluster, create=False)
        except FileNotFoundError:
            pass  # gc removed it, or it was never made: nothing to read
        except (OSError, UnsafePath) as exc:
            log.warning("runtime_dir_refused", cluster=cluster, dir=record.dir, error=str(exc))
    else:
        log.warning("runtime_dir_refused", dir=record.dir, error="not <socket dir>/c/<cluster>")
    if directory is None:
        yield None
        return
    with directory:
        yield directory


def pidfile_in(directory: PrivateDir, name: str) -> tuple[int, int] | None:
    """(pid, start time) from a pidfile; None for a missing one, or a mangled one (logged: the
    process it named, if any, is then taken for gone)."""
    try:
        pid, start_time = directory.read_file(name, 64).split()
        return int(pid), int(start_time)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnsafePath) as exc:
        log.warning("pidfile_unreadable", path=directory.join(name), error=str(exc))
        return None


def holder_pidfile(record: HolderRecord) -> tuple[int, int] | None:
    """What the holder's own pidfile says, if it wrote one."""
    with opened_runtime_dir(record) as directory:
        return pidfile_in(directory, HOLDER_PIDFILE) if directory is not None else None


def _names_a_running_process(pidfile: tuple[int, int] | None) -> bool:
    """The pid is alive and its start time is the recorded one (not a recycled pid)."""
    return pidfile is not None and process_start_time(pidfile[0]) == pidfile[1]


def still_running(record: HolderRecord) -> bool:
    """Whether the holder's pidfile, or any member's, names a running process (pid and start
    time): the journal says exited, but a live process's files are never removed. A member
    directory that cannot be read might name one: it counts as running (logged)."""
    with opened_runtime_dir(record) as directory:
        if directory is None:
            return False
        if _names_a_running_process(pidfile_in(directory, HOLDER_PIDFILE)):
            return True
        for name in directory.names():
            entry = directory.entry(name)
            if entry is None or not stat.S_ISDIR(entry.st_mode):
                continue  # sockets, the holder's log and pidfile: no member lives there
            try:
                with directory.subdir(name, create=False) as member:
                    if _names_a_running_process(pidfile_in(member, PIDFILE)):
                        return True
            except (OSError, UnsafePath) as exc:
                log.warning("member_dir_unreadable", dir=directory.join(name), error=str(exc))
                return True
        return False


def current_specs(record: HolderRecord) -> dict[str, MemberSpec]:
    """The members a holder serves now (it rewrites cluster.json as members join and leave),
    else those it was started with. An unreadable cluster.json is logged: members added since
    the launch are then unknown to fleetd (their status reads absent)."""
    specs = {m.name: m for m in record.spec.members}
    with opened_runtime_dir(record) as directory:
        if directory is None:
            return specs
        try:
            current = msgspec.json.decode(directory.read_file(CLUSTER_FILE), type=ClusterSpec)
        except FileNotFoundError:
            return specs  # the holder never ran: what it was started with is all there is
        except (OSError, msgspec.MsgspecError, FleetError) as exc:
            log.warning("cluster_file_unreadable", cluster=record.spec.name, error=str(exc))
            return specs
    return specs | {m.name: m for m in current.members}


def remove_sockets(record: HolderRecord) -> None:
    """The sockets a killed holder could not remove: its members' (started with, or found)
    and its notify socket."""
    with opened_runtime_dir(record) as directory:
        if directory is None:
            return
        names = {m.name for m in record.spec.members}
        try:
            names |= {e.removesuffix(".sock") for e in directory.names() if e.endswith(".sock")}
        except OSError as exc:
            log.warning("runtime_dir_unlisted", dir=record.dir, error=str(exc))
        for name in names:
            directory.unlink(f"{name}.sock")
        directory.unlink(NOTIFY_SOCKET)


def remove_leftovers(record: HolderRecord, state: PrivateDir) -> None:
    """An exited holder's runtime directory and definition, never through a link; either may
    be gone already (a gc that a crash interrupted)."""
    parts = runtime_dir_parts(record)
    assert parts is not None
    root, cluster = parts
    with contextlib.ExitStack() as stack:
        try:
            top = stack.enter_context(PrivateDir.open(root, create=False))
            runtime = stack.enter_context(top.subdir(RUNTIME_SUBDIR, create=False))
        except FileNotFoundError:
            pass
        else:
            runtime.remove_tree(cluster)
    with (
        contextlib.suppress(FileNotFoundError),
        state.subdir(CLUSTERS_DIR, create=False) as clusters,
    ):
        clusters.remove_tree(cluster)


def exited_entries(cluster: str, record: HolderRecord, revision: int) -> list[ClaimInfo]:
    """An exited holder and what it left in its runtime directory: member directories with
    their logs, and any socket a killed holder could not remove."""
    entries = [holder_entry(cluster, record, revision)]
    left = functools.partial(fleetd_entry, held=False, revision=revision)
    with opened_runtime_dir(record) as directory:
        if directory is None:
            return entries
        for name in directory.names():
            entry, path = directory.entry(name), directory.join(name)
            if name.endswith(".sock"):
                key = f"{cluster}:{name.removesuffix('.sock')}"
                entries.append(left("socket", key, key, path=path))
            elif entry is not None and stat.S_ISDIR(entry.st_mode):
                key = f"{cluster}:{name}"
                entries.append(left("member", key, cluster, path=path))
                for stream, log_name in (("stdout", STDOUT_LOG), ("stderr", STDERR_LOG)):
                    logs = (f"{name}/{log_name}", f"{name}/{log_name}.1")
                    if any(directory.entry(log) is not None for log in logs):
                        log_path = member_log_path(record.dir, name, stderr=stream == "stderr")
                        entries.append(left("log", f"{key}:{stream}", key, path=log_path))
    return entries
