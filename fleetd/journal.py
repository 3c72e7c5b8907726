"""The journal's view of fleetd's own resources, through one interface each resource module
implements, so that the claims journal lists and collects everything fleetd creates without
reaching into another module's records.

    Owners             who fleetd knows of, and who of them is live (what claims' gc asks)
    JournalProvider    what a resource module offers: its owners, its entries, its collection
    fleetd_entry       a ClaimInfo for a resource fleetd writes itself (no content, no digest)
    LeaseJournal       the leases' provider, over LeaseManager's records

Entries are views: each record stays where its module writes it (``holders/``, ``members/``,
``leases/``), in that module's transactions, so nothing is written twice and only the module
that owns a record ever deletes it. protocol.claims documents the kinds and their mapping.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fleetd.core import identity as proc
from fleetd.leases import Entry, LeaseManager
from protocol.claims import ClaimInfo, ClaimState


@dataclass(frozen=True)
class Owners:
    """Who fleetd knows of (lease holders past and present, members and clusters it journals)
    and who of them is live. An owner fleetd knows nothing of may be an agent that is simply
    not running now (an inbox waits for its reader): its claims are kept."""

    live: frozenset[str] = frozenset()
    known: frozenset[str] = frozenset()

    def gone(self, owner: str) -> bool:
        return owner in self.known and owner not in self.live

    @staticmethod
    def union(every: Iterable["Owners"]) -> "Owners":
        """One name live anywhere is live: a bare member name may be a stopped member of
        one cluster and a running one of another."""
        live: set[str] = set()
        known: set[str] = set()
        for owners in every:
            live |= owners.live
            known |= owners.known
        return Owners(live=frozenset(live), known=frozenset(known))


class JournalProvider(Protocol):
    """A module whose resources are journal entries of `journal_kinds`."""

    @property
    def journal_kinds(self) -> tuple[str, ...]: ...

    def journal_owners(self) -> Owners:
        """The claim owners this module knows of, and the live ones among them."""
        ...

    async def journal_entries(self) -> list[ClaimInfo]:
        """Every entry, in a stable order."""
        ...

    async def journal_entry(self, kind: str, key: str) -> ClaimInfo | None:
        """The entry `key` of `kind`, if there is one, for the price of that one."""
        ...

    async def journal_collect(self, *, dry_run: bool) -> list[ClaimInfo]:
        """Remove (with `dry_run`, only find) every entry no live owner holds; each as it was.
        Must never touch a live owner's resource, and must be idempotent."""
        ...


def fleetd_entry(
    kind: str,
    key: str,
    owner: str,
    *,
    held: bool,
    revision: int,
    path: str = "",
    detail: str = "",
) -> ClaimInfo:
    state: ClaimState = "held" if held else "released"
    return ClaimInfo(
        kind=kind,
        key=key,
        owner=owner,
        state=state,
        revision=revision,
        path=path,
        sha256="",
        size=0,
        acquired_at=0.0,
        detail=detail,
    )


def lease_entry(entry: Entry, live: bool) -> ClaimInfo:
    """A lease as a journal entry: its token is the revision; a held lease past its deadline
    that the timer has not marked yet is `expired` already."""
    state = entry.record.state
    detail = "expired" if state == "held" and not live else state
    return fleetd_entry(
        "lease", entry.name, entry.record.owner, held=live, revision=entry.token, detail=detail
    )


class LeaseJournal:
    """Leases in the journal: LeaseManager lists its records and deletes dead ones; the
    mapping to journal entries and owners lives here, away from the leases' hot path."""

    journal_kinds: tuple[str, ...] = ("lease",)

    def __init__(self, leases: LeaseManager) -> None:
        self._leases = leases

    def journal_owners(self) -> Owners:
        """Every lease owner is known; live while its lease is live and its process runs."""
        known: set[str] = set()
        live: set[str] = set()
        for entry, is_live in self._leases.records():
            known.add(entry.record.owner)
            if is_live and proc.is_alive(entry.record.identity):
                live.add(entry.record.owner)
        return Owners(live=frozenset(live), known=frozenset(known))

    async def journal_entries(self) -> list[ClaimInfo]:
        return [lease_entry(entry, live) for entry, live in self._leases.records()]

    async def journal_entry(self, kind: str, key: str) -> ClaimInfo | None:
        """From the lease table in memory (one kind, keyed by name)."""
        for entry in await self.journal_entries():
            if (entry.kind, entry.key) == (kind, key):
                return entry
        return None

    async def journal_collect(self, *, dry_run: bool) -> list[ClaimInfo]:
        removed = await self._leases.remove_dead(dry_run=dry_run)
        return [lease_entry(entry, live=False) for entry in removed]
