"""The store: everything fleetd keeps durably (leases, the claims journal, the task inbox).

The interface is shaped after etcd's v3 API so that an etcd backend fits it unchanged:

- one global ``revision`` that every write transaction advances by one; all the operations of a
  transaction share it, and reads, failed compares, grants and keepalives do not advance it;
- a key's ``create_revision`` is the revision of the transaction that created it, so it is
  strictly increasing across re-creations and serves as a fencing token;
- leases with a TTL: keys put with a lease are deleted, with delete events, when the lease
  expires or is revoked;
- watches over a key prefix, resumable from a past revision while the history keeps it
  (the history seam: see ``Store``).

Backends: ``fleetd.store.sqlite`` (the embedded default) and ``fleetd.store.etcd`` (for many
hosts). Values are opaque bytes; callers
encode their own records.
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Literal, Protocol, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from protocol.errors import Internal, InvalidRequest

__all__ = [
    "Compare",
    "Delete",
    "DeleteRange",
    "DeleteResult",
    "Event",
    "Get",
    "KeyValue",
    "Lease",
    "Operation",
    "Put",
    "PutResult",
    "Range",
    "RangeResult",
    "Response",
    "Store",
    "StoreStatistics",
    "TxnResult",
    "check_branch",
]


class KeyValue(msgspec.Struct, frozen=True):
    """A key as stored. ``version`` counts puts since the key was (re-)created, from 1."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


Target = Literal["value", "version", "create", "mod"]
CompareOp = Literal["==", "!=", "<", ">"]


class Compare(msgspec.Struct, frozen=True):
    """A guard of a transaction, as in etcd: an absent key has version, create and mod 0, and
    any comparison of its value fails (so ``Compare(k, "create", "==", 0)`` means "absent")."""

    key: str
    target: Target
    op: CompareOp
    operand: bytes | int

    def __post_init__(self) -> None:
        wants_bytes = self.target == "value"
        if wants_bytes != isinstance(self.operand, bytes):
            kind = "bytes" if wants_bytes else "an int"
            raise InvalidRequest(f"comparing {self.target} needs {kind} operand", key=self.key)


def _check_key(key: str) -> None:
    if not key:
        raise InvalidRequest("a key must not be empty")


class Put(msgspec.Struct, frozen=True):
    """Sets a key; with a lease, the key goes when the lease does. An unknown lease fails the
    whole transaction."""

    key: str
    value: bytes
    lease: int = 0

    def __post_init__(self) -> None:
        _check_key(self.key)


class Delete(msgspec.Struct, frozen=True):
    key: str

    def __post_init__(self) -> None:
        _check_key(self.key)


class DeleteRange(msgspec.Struct, frozen=True):
    """Deletes every key starting with ``prefix`` (all keys if it is empty)."""

    prefix: str


class Get(msgspec.Struct, frozen=True):
    key: str


class Range(msgspec.Struct, frozen=True):
    """Keys starting with ``prefix`` in key order; ``limit`` 0 means no limit."""

    prefix: str
    limit: int = 0

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise InvalidRequest("a range limit must not be negative", limit=self.limit)


Operation = Put | Delete | DeleteRange | Get | Range


class PutResult(msgspec.Struct, frozen=True):
    """A put's answer: that it was done. Not the key's previous value, which etcd reads and
    sends back for each put that asks for it, and which nothing here needs (a watch's events
    carry it)."""


class DeleteResult(msgspec.Struct, frozen=True):
    deleted: tuple[KeyValue, ...]


class RangeResult(msgspec.Struct, frozen=True):
    """``more`` says that ``limit`` cut the answer short."""

    kvs: tuple[KeyValue, ...]
    more: bool = False


Response = PutResult | DeleteResult | RangeResult


class TxnResult(msgspec.Struct, frozen=True):
    """``revision`` is the store's revision after the transaction: its own if it wrote."""

    succeeded: bool
    revision: int
    responses: tuple[Response, ...]


class Event(msgspec.Struct, frozen=True):
    """A change seen by a watch. A delete's ``kv`` carries only the key and, as
    ``mod_revision``, the revision of the deletion."""

    type: Literal["put", "delete"]
    kv: KeyValue
    prev_kv: KeyValue | None = None

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


class Lease(msgspec.Struct, frozen=True):
    """A live lease: ``remaining`` seconds until it expires unless kept alive."""

    id: int
    ttl: float
    remaining: float


class StoreStatistics(msgspec.Struct, frozen=True):
    """A snapshot of the store's counters.

    ``transactions`` and ``operations`` count what the store executed; ``commits`` counts the
    durable commits that carried them, so ``transactions / commits`` measures group commit.
    """

    revision: int
    compact_revision: int
    transactions: int
    operations: int
    commits: int
    queued: int
    leases: int
    watchers: int


def check_branch(operations: Sequence[Operation]) -> None:
    """Refuses a branch that writes one key twice: etcd does, and the outcome would otherwise
    depend on the backend."""
    written = [op.key for op in operations if isinstance(op, Put | Delete)]
    if len(set(written)) != len(written):
        raise InvalidRequest("a transaction must not write the same key twice")


R = TypeVar("R", PutResult, DeleteResult, RangeResult)


def _only(result: TxnResult, kind: type[R]) -> R:
    (response,) = result.responses
    if not isinstance(response, kind):
        raise Internal(f"store answered {type(response).__name__}, not {kind.__name__}")
    return response


class Store(Protocol):
    """What fleetd asks of a store. Backends subclass it to inherit the conveniences.

    Every write is durable before the awaiting caller resumes. A caller cancelled while waiting
    may still see its write happen: make writes idempotent per owner.

    ``shared``: other fleetd processes may write the same store (etcd), so that what a fleetd
    remembers of a record may be stale (fleetd.presence, fleetd.leases, fleetd.claims).

    The history seam. ``watch`` (events under a prefix, resumable from ``start_revision``),
    with ``revision``, ``Event``, ``StoreStatistics.compact_revision`` and the ``Compacted``
    error, forms the store's history: an etcd-shaped record of every change. On a shared
    store (etcd) fleetd's lease manager follows the other fleetds' writes through it; on
    SQLite only tests and benchmarks watch it (fleetd answers ``lease_watch`` from the lease
    manager's own event buffer), yet every write pays for the history: it is also the seam the
    task event log (issue 15: one ordered record per run, whichever host wrote it) is to be
    built on. tests/test_store.py ("Watches: the history seam") is its conformance suite,
    written against this interface for every backend to pass.
    """

    shared: bool = False
    max_operations: int = 0
    """Operations one transaction may hold at most (etcd: --max-txn-ops), 0 for no limit: a
    writer with more splits them where it may (fleetd.clusters.journaling)."""

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the store, then serve until cancelled; started once it answers requests."""
        ...

    @property
    def revision(self) -> int:
        """The revision of the last acknowledged write."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation] = (),
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        """Runs ``success`` if every compare holds, else ``failure``, atomically."""
        ...

    async def grant(self, ttl: float) -> tuple[int, float]:
        """A new lease, never reusing an id; returns its id and the TTL actually granted
        (a backend may raise a TTL it finds too short: use the one returned)."""
        ...

    async def keepalive(self, lease: int) -> float:
        """Resets the lease to its full TTL and returns it; 0 means the lease is lost."""
        ...

    async def revoke(self, lease: int) -> None:
        """Ends the lease now, deleting its keys; an unknown lease raises Absent."""
        ...

    async def leases(self) -> tuple[Lease, ...]: ...

    def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[Event]]:
        """Events on keys under ``prefix``, in revision order, from ``start_revision`` (default:
        the next write). A revision the history no longer holds raises Compacted: re-read the
        keys, then watch from the revision of that read plus one."""
        ...

    def statistics(self) -> StoreStatistics: ...

    async def get(self, key: str) -> KeyValue | None:
        result = await self.txn((), (Get(key),))
        kvs = _only(result, RangeResult).kvs
        return kvs[0] if kvs else None

    async def range(self, prefix: str, limit: int = 0) -> tuple[KeyValue, ...]:
        result = await self.txn((), (Range(prefix, limit),))
        return _only(result, RangeResult).kvs

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the write."""
        return (await self.txn((), (Put(key, value, lease),))).revision

    async def delete(self, key: str) -> bool:
        """Returns whether the key existed."""
        result = await self.txn((), (Delete(key),))
        return bool(_only(result, DeleteResult).deleted)
