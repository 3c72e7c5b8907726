"""Adopting, when fleetd starts, the holders an earlier fleetd left running: nothing is
restarted, and whatever died meanwhile is cleaned up.

    plan_adoption    pure: the journal's records and what start-up found of each (its
                     pidfile, which pids run since when) -> an AdoptionPlan
    adopt            the edges: reads the store, the disk and /proc, carries the plan out

A journaled holder is adopted when a process runs that is the one the journal names (pid
*and* start time, so a recycled pid is never taken for it); fleetd opens a pidfd and a watch
on a member socket (fleetd.clusters.follow). What names it: a live record, confirmed by the
pidfile the holder wrote; a starting record (fleetd died launching it) names it once the pid
was journaled, before the holder could run (fleetd.clusters.launch), so even while the holder
has written nothing yet; one without a pid (fleetd died before that, so its gate never opened)
has only the holder's pidfile to go by. A journaled holder with no such process is ended: its
record journaled exited, its sockets removed, its cgroup emptied; its members then read
`stopped` from their state files. Member records that no holder record owns are dropped.
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import anyio
import msgspec
import structlog

from fleetd.clusters.follow import Follower
from fleetd.clusters.index import Held
from fleetd.clusters.records import HOLDERS, MEMBERS, HolderRecord, cluster_of, decode_holder
from fleetd.clusters.rundirs import current_specs, holder_pidfile
from fleetd.core.pidfiles import process_start_time
from fleetd.store import Delete, Store

log = structlog.get_logger("fleetd.clusters")


@dataclass(frozen=True)
class Found:
    """What start-up found of a journaled holder: the pidfile the holder wrote, if any, and the
    start time of each pid its record or that pidfile names that runs."""

    pidfile: tuple[int, int] | None = None
    running: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AdoptionPlan:
    adopt: tuple[HolderRecord, ...] = ()
    """Holders that run, each record naming its process; `starting` ones may not serve yet."""
    end: tuple[HolderRecord, ...] = ()
    """Holders gone while no fleetd watched: to journal exited, and clear up after."""
    exited: tuple[HolderRecord, ...] = ()
    """Holders journaled exited already: known (their members' state files answer) until gc."""
    drop: tuple[str, ...] = ()
    """Keys of member records whose cluster has no holder record."""


def identify(record: HolderRecord, pidfile: tuple[int, int] | None) -> HolderRecord | None:
    """The record naming the holder's process (pid and start time), or None when nothing
    names one."""
    if record.state == "starting" and record.pid:
        return record
    if pidfile is None:
        return None
    if record.state == "starting":
        pid, start_time = pidfile
        return msgspec.structs.replace(record, pid=pid, start_time=start_time)
    return record if pidfile == (record.pid, record.start_time) else None


def plan_adoption(
    records: Sequence[HolderRecord], found: Mapping[str, Found], member_keys: Iterable[str]
) -> AdoptionPlan:
    """What to do with each journaled holder, given what start-up found (`found`, by cluster;
    a cluster missing there left nothing to find), and with member records no holder owns."""
    adopt: list[HolderRecord] = []
    end: list[HolderRecord] = []
    exited: list[HolderRecord] = []
    for record in records:
        if record.state == "exited":
            exited.append(record)
            continue
        seen = found.get(record.spec.name, Found())
        identified = identify(record, seen.pidfile)
        if identified is not None and seen.running.get(identified.pid) == identified.start_time:
            adopt.append(identified)
        else:
            end.append(identified or record)
    clusters = {record.spec.name for record in records}
    drop = sorted(key for key in member_keys if cluster_of(key) not in clusters)
    return AdoptionPlan(tuple(adopt), tuple(end), tuple(exited), tuple(drop))


# --- the edges ----------------------------------------------------------------------------


def find(records: Iterable[HolderRecord]) -> dict[str, Found]:
    """Each journaled holder's pidfile, and which of the pids named run since when."""
    found: dict[str, Found] = {}
    for record in records:
        if record.state == "exited":
            continue
        pidfile = holder_pidfile(record)
        pids = {record.pid, pidfile[0] if pidfile else 0} - {0}
        running = {pid: start for pid in pids if (start := process_start_time(pid)) is not None}
        found[record.spec.name] = Found(pidfile, running)
    return found


async def adopt(store: Store, follower: Follower) -> None:
    """Plan from the store, the disk and /proc; then carry the plan out, every holder at once:
    each adoption waits on its holder's answer and a journal write (which commit together),
    one after another they kept fleetd from serving for some 13 ms per live cluster."""
    records = [decode_holder(kv.value) for kv in await store.range(HOLDERS)]
    member_keys = [kv.key for kv in await store.range(MEMBERS)]
    found = await anyio.to_thread.run_sync(find, records)
    plan = plan_adoption(records, found, member_keys)
    if plan.drop:
        await store.txn((), [Delete(key) for key in plan.drop])
        log.warning("member_records_dropped", keys=list(plan.drop), reason="no holder record")
    for record in plan.exited:
        follower.index.add_exited(record)
    async with anyio.create_task_group() as tasks:
        for record in plan.end:
            tasks.start_soon(_end_one, record, follower)
        for record in plan.adopt:
            tasks.start_soon(_adopt_one, record, follower)


async def _end_one(record: HolderRecord, follower: Follower) -> None:
    await follower.gone(record, reason="holder_died_while_fleetd_was_down")


async def _adopt_one(record: HolderRecord, follower: Follower) -> None:
    pidfd = _pidfd_of(record)
    if pidfd is None:  # it exited since it was found
        await follower.gone(record, reason="holder_died_while_fleetd_was_down")
        return
    held = Held(record.spec.name, record, pidfd, current_specs(record))
    if record.state == "starting":
        await follower.follow_starting(held)
    else:
        await follower.follow(held)
    log.info("holder_adopted", cluster=held.name, pid=held.pid, was=record.state)


def _pidfd_of(record: HolderRecord) -> int | None:
    """A pidfd of the holder if it still runs: same pid, same start time. The start time is
    checked after the pidfd is open, so the pid cannot be recycled in between."""
    try:
        pidfd = os.pidfd_open(record.pid)
    except ProcessLookupError:
        return None
    if process_start_time(record.pid) == record.start_time:
        return pidfd
    os.close(pidfd)
    return None
