"""The clusters' side of the journal: it makes the store say what the index says of each
cluster, and lists and collects those records for the claims journal (it is the clusters'
fleetd.journal.JournalProvider, as LeaseJournal is the leases').

Writes are made from memory when they are submitted, so a later write always says what is
newer, and each is one transaction (fleetd.clusters.records.cluster_writes). A cluster's
writes take turns: each reads what the store holds of it, and writes only the difference.
A full disk postpones a write, which is retried until it lands: fleetd keeps following its
holders and answering from memory meanwhile, and the caller is not failed for it.

Collection removes an exited holder's files first, then its records: a crash in between
leaves records whose files are gone, which the next gc deletes; never files no record names.
"""

import itertools
from collections.abc import Iterable

import anyio
import structlog

from fleetd.clusters.index import ClusterIndex
from fleetd.clusters.records import (
    HOLDERS,
    MEMBERS,
    HolderRecord,
    cluster_of,
    cluster_writes,
    decode_holder,
    holder_entry,
    holder_key,
    member_entries,
    members_prefix,
)
from fleetd.clusters.rundirs import (
    current_specs,
    exited_entries,
    remove_leftovers,
    runtime_dir_parts,
    still_running,
)
from fleetd.core.dirs import PrivateDir
from fleetd.core.locks import NameLocks
from fleetd.journal import Owners
from fleetd.store import Compare, Delete, DeleteRange, KeyValue, Put, Store
from protocol.claims import ClaimInfo
from protocol.errors import FleetError, StoreFull, UnsafePath

log = structlog.get_logger("fleetd.clusters")

RETRY_INTERVAL = 1.0
"""Seconds between tries of journal writes a full disk postponed."""


class ClusterJournal:
    """Writes the index's clusters to the store; lists and collects them for claims."""

    journal_kinds: tuple[str, ...] = ("holder", "member", "socket", "log")

    def __init__(self, store: Store, index: ClusterIndex, state: PrivateDir) -> None:
        self.store = store
        self.index = index
        self.state = state
        self._unwritten: set[str] = set()
        """Clusters whose records a full disk kept from being written."""
        self._writes: dict[str, int] = {}
        """Per cluster being written, its latest write's number (forgotten once it ends)."""
        self._attempts = itertools.count(1)
        self._retry_due = anyio.Event()
        self._due: set[str] = set()
        """Clusters `write_soon` was asked for, not yet written."""
        self._due_set = anyio.Event()
        self._turns = NameLocks()
        """A cluster's writes, one at a time (see the module)."""

    async def write(self, name: str) -> None:
        """Make the store say what memory says of cluster `name`: live (its record and a
        record per member) or exited (its record alone); nothing once gc collected it."""
        self._writes[name] = attempt = next(self._attempts)
        try:
            async with self._turns.hold(name):
                stored = {kv.key: kv.value for kv in await self.store.range(members_prefix(name))}
                record, members = self._remembered(name)
                if record is not None:
                    for chunk in chunked(cluster_writes(record, members, stored), self.store):
                        await self.store.txn((), chunk)
        except StoreFull:
            if name not in self._unwritten:
                log.warning("journal_write_postponed", cluster=name, reason="disk full")
            self._unwritten.add(name)
            self._retry_due.set()
            return
        finally:
            latest = self._writes.get(name) == attempt
            if latest:
                del self._writes[name]
        if latest and name in self._unwritten:
            self._unwritten.discard(name)
            log.info("journal_written_late", cluster=name)

    def _remembered(self, name: str) -> tuple[HolderRecord | None, set[str]]:
        """The cluster's record and its members' names, as memory has them."""
        held = self.index.live.get(name)
        if held is not None:
            return held.record, {*held.specs, *held.statuses}
        return self.index.exited.get(name), set()

    def write_soon(self, name: str) -> None:
        """`write`, by `write_due`: the caller does not wait, and what is asked for while a
        write is under way makes one write after it (fleetd.tasks adds a member per worker
        slot, in bursts)."""
        self._due.add(name)
        self._due_set.set()

    async def write_due(self) -> None:
        """Until cancelled: write what write_soon was asked for. A write that fails (the
        store unreachable) is logged; the cluster's next change writes it whole again."""
        while True:
            await self._due_set.wait()
            self._due_set = anyio.Event()
            while self._due:
                name = self._due.pop()
                try:
                    await self.write(name)
                except FleetError as exc:
                    log.warning("journal_write_failed", cluster=name, error=exc.message)

    async def retry_postponed(self) -> None:
        """Until cancelled: write again, every RETRY_INTERVAL, what a full disk postponed."""
        while True:
            await self._retry_due.wait()
            await anyio.sleep(RETRY_INTERVAL)
            self._retry_due = anyio.Event()
            for name in sorted(self._unwritten):
                await self.write(name)

    # -- fleetd.journal.JournalProvider

    def journal_owners(self) -> Owners:
        """Members (as NAME and CLUSTER:NAME) and clusters as claim owners: live while the
        member runs (a cluster while any of its members does), or while its holder, re-adopted
        mid-launch, has not said yet; every member of an exited holder is known, and gone."""
        known: set[str] = set()
        live: set[str] = set()
        for cluster, held in self.index.live.items():
            starting = held.record.state == "starting"  # its members' fate is not known yet
            for name in {**held.specs, **held.statuses}:
                names = {name, f"{cluster}:{name}", cluster}
                known |= names
                status = held.statuses.get(name)
                if starting or (status is not None and status.running):
                    live |= names
        for cluster, record in self.index.exited.items():
            for name in current_specs(record):
                known |= {name, f"{cluster}:{name}", cluster}
        return Owners(live=frozenset(live), known=frozenset(known))

    async def journal_entries(self) -> list[ClaimInfo]:
        """The records (holders/, members/) as entries; an exited holder's members, sockets
        and logs as they remain on disk."""
        members: dict[str, list[KeyValue]] = {}
        for kv in await self.store.range(MEMBERS):
            members.setdefault(cluster_of(kv.key), []).append(kv)
        entries: list[ClaimInfo] = []
        for kv in await self.store.range(HOLDERS):
            name = kv.key.removeprefix(HOLDERS)
            entries += await self._entries_of(name, kv, members.get(name, ()))
        return entries

    async def journal_entry(self, kind: str, key: str) -> ClaimInfo | None:
        """One entry, from its cluster's records alone (every key of ours starts with the
        cluster's name): `claims inspect` costs the same however many clusters there are."""
        name = key.partition(":")[0]
        kv = await self.store.get(holder_key(name))
        if kv is None:
            return None
        members = await self.store.range(members_prefix(name))
        for entry in await self._entries_of(name, kv, members):
            if (entry.kind, entry.key) == (kind, key):
                return entry
        return None

    async def _entries_of(
        self, name: str, kv: KeyValue, members: Iterable[KeyValue]
    ) -> list[ClaimInfo]:
        record = decode_holder(kv.value)
        if record.state == "exited":
            return await anyio.to_thread.run_sync(exited_entries, name, record, kv.mod_revision)
        held = self.index.live.get(name)
        statuses = held.statuses if held is not None else {}
        entries = [holder_entry(name, record, kv.mod_revision)]
        for member in members:
            entries += member_entries(name, member, statuses)
        return entries

    async def journal_collect(self, *, dry_run: bool) -> list[ClaimInfo]:
        """Every exited holder's leftovers and records, each cluster under its lock (an `up` of
        the same name waits for it, and gc waits for an `up` under way), all clusters at once:
        one after another, each cluster's disk work and journal write made fleetd's start-up gc
        of 200 exited clusters take some 6 ms each. Reported in name order."""
        collected: dict[str, list[ClaimInfo]] = {}

        async def collect(name: str) -> None:
            async with self.index.lock(name):
                collected[name] = await self._collect_exited(name, dry_run)

        async with anyio.create_task_group() as tasks:
            for name in list(self.index.exited):
                tasks.start_soon(collect, name)
        return [entry for name in sorted(collected) for entry in collected[name]]

    async def _collect_exited(self, name: str, dry_run: bool) -> list[ClaimInfo]:
        record, key = self.index.exited.get(name), holder_key(name)
        kv = await self.store.get(key)
        if record is None or name in self.index.live or kv is None:
            return []
        if decode_holder(kv.value) != record or runtime_dir_parts(record) is None:
            log.warning("holder_not_collected", cluster=name, dir=record.dir)
            return []
        if await anyio.to_thread.run_sync(still_running, record):
            log.warning("holder_not_collected_still_running", cluster=name, dir=record.dir)
            return []
        found = await anyio.to_thread.run_sync(exited_entries, name, record, kv.mod_revision)
        if dry_run:
            return found
        try:
            await anyio.to_thread.run_sync(remove_leftovers, record, self.state)
        except (OSError, UnsafePath) as exc:
            log.warning("holder_not_collected", cluster=name, error=str(exc))
            return []
        result = await self.store.txn(
            (Compare(key, "mod", "==", kv.mod_revision),),
            (Delete(key), DeleteRange(members_prefix(name))),
        )
        if not result.succeeded:
            return []
        self.index.remove_exited(name)
        log.info("holder_collected", cluster=name, dir=record.dir, items=len(found))
        return found


def chunked(writes: list[Put | Delete], store: Store) -> list[list[Put | Delete]]:
    """`writes` in one transaction, or in as many as the store's limit needs (etcd's, for a
    cluster of more than a hundred members): member records first, the holder's record (the
    first write) last, so that a holder recorded live has every member recorded."""
    limit = store.max_operations
    if not limit or len(writes) <= limit:
        return [writes]
    holder, rest = writes[0], writes[1:]
    chunks = [rest[start : start + limit] for start in range(0, len(rest), limit)]
    return [*chunks, [holder]]
