"""The state directory: what fleetd keeps in it, who may use it, and how to start it over.

    fleetd.lock                            held by the running fleetd (its pid inside)
    fleet.db, fleet.db-wal, fleet.db-shm   the store (fleetd.store.sqlite)
    fleet.watermark                        which store this is, and the revision it reached
    etcd.watermark, presence               the same of an etcd store; this fleetd's presence
                                           there (fleetd.store.etcd, fleetd.presence)
    claims-staging/ files/ inbox/          claims (fleetd.claims; their files: fleetd.delivery)
    clusters/                              definitions of detached clusters (fleetd.clusters)
    quarantine/                            files found at start-up that no record explains
    archive/                               what `fleetd reset-state` moved aside

fleetd opens it as a PrivateDir (fleetd.core.dirs): its own, not open to others, and nothing in it
is ever reached through a link. A store that was lost, replaced or rolled back stops fleetd
at start-up (fleetd.store.watermark); `reset_state` is the one way on from there, and it
archives rather than deletes.
"""

import fcntl
import functools
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import anyio

from fleetd.core.dirs import PrivateDir, unsafe_reason
from fleetd.core.pidfiles import is_running
from fleetd.store.sqlite import peek_revision, restart_from
from fleetd.store.watermark import Mark, Watermark
from protocol.errors import AlreadyRunning, FleetError, StateLost, StoreCorrupt, UnsafePath
from protocol.members import HOLDER_PIDFILE

if TYPE_CHECKING:
    from fleetd.store.etcd import Endpoints

LOCK_FILE = "fleetd.lock"
STORE_FILE = "fleet.db"
WATERMARK_FILE = "fleet.watermark"
ETCD_WATERMARK_FILE = "etcd.watermark"
ARCHIVE_DIR = "archive"
STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", f"{STORE_FILE}-journal")
RUNTIME_SUBDIR = "c"
"""Beside the control socket: c/<cluster>/, a holder's runtime directory (short: socket
paths are limited to 107 bytes)."""


@contextmanager
def exclusive_lock(directory: PrivateDir, name: str) -> Iterator[None]:
    """Hold an flock on `name` for as long as the block runs; a second fleetd fails here,
    before it could unlink and steal the socket of the first."""
    fd = directory.open_file(name, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise AlreadyRunning(
                f"another fleetd (pid {holder}) holds {directory.join(name)}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_store_files(directory: PrivateDir) -> None:
    """The store's files are absent or plain files of fleetd's user: SQLite opens them by
    name, so a link among them would be followed (UnsafePath), and a directory in their
    place is a store that cannot be read (StoreCorrupt)."""
    for name in STORE_FILES:
        entry = directory.entry(name)
        if entry is None:
            continue
        path = directory.join(name)
        if not (stat.S_ISREG(entry.st_mode) or stat.S_ISLNK(entry.st_mode)):
            raise StoreCorrupt(
                f"{path} is not a file (a directory or a device is in its place): move it "
                "away, restore the store from a backup, or run `fleetd reset-state`",
                path=path,
            )
        reason = unsafe_reason(entry, directory=False)
        if reason is not None:
            raise UnsafePath(f"refusing {path}: it {reason}", path=path)


# Reset -------------------------------------------------------------------------------------


def reset_state(state_path: str, runtime_root: str, *, keep_store: bool) -> list[str]:
    """Start the state directory over after its store was lost, replaced or rolled back;
    returns what was done, a line each. Refuses while fleetd runs (its lock) or while holders
    of the old state still run (their records would be archived from under them).

    Without `keep_store`, everything but the lock moves to archive/<UTC time>/ and a new,
    empty store starts; with it, the store as it is now is kept and adopted. Either way the
    revision goes above every revision the old watermark or store knew, so fencing tokens
    never repeat."""
    with PrivateDir.open(state_path) as state, exclusive_lock(state, LOCK_FILE):
        _refuse_live_holders(runtime_root)
        check_store_files(state)
        watermark = Watermark(state, WATERMARK_FILE)
        floor, notes = _highest_revision(state, watermark)
        if not keep_store:
            notes.append(_archive(state))
        try:
            mark = restart_from(state.join(STORE_FILE), watermark, floor)
        except StoreCorrupt as exc:
            raise StoreCorrupt(
                f"the store cannot be kept: {exc.message.split('. ')[0]}; run `fleetd "
                "reset-state` without --keep-store to archive it and start empty"
            ) from None
        notes.append(_restarted(mark, floor, keep_store))
        return notes


def reset_etcd_state(
    state_path: str, runtime_root: str, address: str, *, keep_store: bool
) -> list[str]:
    """`reset_state` for a state directory whose store is in etcd (`address`). Without
    `keep_store`, where etcd holds no fleet store (wiped, or another cluster): archive the
    state directory and start a new store there whose revisions continue above the old
    watermark's. With it: join the store etcd holds, its revisions moved above the
    watermark's if etcd was rolled back. A store other fleetds may use is never replaced."""
    from fleetd.store.etcd import Endpoints  # loads gRPC: only for an etcd store

    endpoints = Endpoints.parse(address)
    with PrivateDir.open(state_path) as state, exclusive_lock(state, LOCK_FILE):
        _refuse_live_holders(runtime_root)
        watermark = Watermark(state, ETCD_WATERMARK_FILE)
        notes = []
        try:
            mark = watermark.read()
        except StoreCorrupt:
            mark, notes = None, [f"{watermark.path} was damaged: going by etcd alone"]
        floor = mark.revision if mark is not None else 0
        reset = functools.partial(_reset_etcd, endpoints, state, watermark, floor, keep_store)
        return notes + anyio.run(reset, backend="asyncio")


async def _reset_etcd(
    endpoints: "Endpoints", state: PrivateDir, watermark: Watermark, floor: int, keep: bool
) -> list[str]:
    from fleetd.store.etcd import EtcdStore, StoreMeta, new_store_id

    store = EtcdStore(endpoints)
    notes = []
    async with store.connected():
        meta = await store.read_meta()
        at = store.revision  # etcd's own: no base applied yet
        if keep:
            if meta is None:
                raise StateLost(
                    f"etcd at {endpoints} holds no fleet store to keep: run `fleetd --store "
                    "… reset-state` without --keep-store to start one"
                )
            if at + meta.base <= floor:
                moved = StoreMeta(meta.id, floor - at + 1)
                await store.replace_meta(meta, moved)
                meta = moved
                notes.append(f"moved store {meta.id:x}'s revisions above {floor}")
            notes.append(f"kept store {meta.id:x} in etcd at {endpoints}")
        else:
            if meta is not None:
                raise StateLost(
                    f"etcd at {endpoints} holds store {meta.id:x}, which other fleetds may "
                    "use: run `fleetd --store … reset-state --keep-store` to join it (nothing "
                    "was changed)"
                )
            notes.append(_archive(state))
            meta = await store.create_meta(StoreMeta(new_store_id(), base=floor))
            tail = f"; revisions and fencing tokens continue above {floor}" if floor else ""
            notes.append(f"started store {meta.id:x} in etcd at {endpoints}{tail}")
    watermark.create(Mark.at(meta.id, at + meta.base))
    watermark.close()
    return notes


def _highest_revision(state: PrivateDir, watermark: Watermark) -> tuple[int, list[str]]:
    notes = []
    try:
        mark = watermark.read()
    except StoreCorrupt:
        mark, notes = None, [f"{watermark.path} was damaged: going by the store alone"]
    stored = peek_revision(state.join(STORE_FILE))
    known = [revision for revision in (mark and mark.revision, stored) if revision]
    if not known:
        notes.append("no revision is known from before: revisions start over")
    return max(known, default=0), notes


def _archive(state: PrivateDir) -> str:
    """Move everything but the lock and earlier archives into archive/<UTC time>/."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    with state.subdir(ARCHIVE_DIR) as archives:
        name, n = stamp, 1
        while archives.entry(name) is not None:
            n += 1
            name = f"{stamp}-{n}"
        moved = []
        with archives.subdir(name) as archive:
            for entry in state.names():
                if entry not in (LOCK_FILE, ARCHIVE_DIR):
                    state.move(entry, archive, entry)
                    moved.append(entry)
            archive.fsync()
            archives.fsync()
            state.fsync()
            where = archive.path
    if not moved:
        return "nothing to archive"
    return f"archived {', '.join(moved)} to {where}"


def _restarted(mark: Mark, floor: int, keep_store: bool) -> str:
    what = "kept the store" if keep_store else "started a new store"
    tail = f"; revisions and fencing tokens continue above {floor}" if floor else ""
    return f"{what} (store {mark.store_id:x}, revision {mark.revision}){tail}"


def _refuse_live_holders(runtime_root: str) -> None:
    """Holders of the old state still running would be left unmanaged: refuse."""
    try:
        with PrivateDir.open(runtime_root, create=False) as root:
            clusters = root.subdir(RUNTIME_SUBDIR, create=False)
    except FileNotFoundError:
        return
    except (OSError, UnsafePath) as exc:
        raise FleetError(f"cannot check for running holders in {runtime_root}: {exc}") from None
    with clusters:
        live = [
            name
            for name in clusters.names()
            if is_running(os.path.join(clusters.path, name, HOLDER_PIDFILE))
        ]
    if live:
        raise AlreadyRunning(
            f"holders of this state still run ({', '.join(live)} in {clusters.path}): stop "
            "them first (each holder.pid there names one; SIGTERM stops its members)"
        )
