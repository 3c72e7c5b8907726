"""The store on etcd (v3 API, over gRPC): for several fleetd processes, on several hosts,
sharing one set of leases, claims and tasks. ``fleetd --store etcd://HOST:PORT[,HOST:PORT…]``.

The Store interface is etcd's shape already (fleetd.store), so most of this module is a
translation: a Compare is etcd's compare, a transaction etcd's Txn, a revision etcd's revision,
a lease etcd's lease, a watch etcd's watch. What etcd adds is a network between fleetd and its
state, and with it three rules:

- Every call has a deadline (CALL_TIMEOUT). An etcd that does not answer in time, or cannot
  be reached, or has lost its quorum, is StoreUnavailable: the request fails with a clear
  error, fleetd goes on, and the next request tries again (gRPC reconnects by itself, to the
  next endpoint listed when one is down).
- A call runs as a task of its own, which a cancelled caller cancels and leaves at once: gRPC
  answers a cancellation of its await with a bare asyncio.CancelledError that escapes anyio's
  cancel scopes and tears down task groups (../shared/ETCD-NOTES.md), and it stays in that
  task. Transactions go to etcd in batches (_Batches), which a cancelled caller leaves at once
  too, while its batch goes on. A write whose caller went away may still commit, as the Store
  interface allows.
- A watch survives a reconnect: it resumes from the revision after the last event it passed
  on, so that a broken stream loses nothing (or raises Compacted, if etcd forgot it meanwhile).

Keys live under a namespace (``fleet/`` by default; ``etcd://HOST:PORT/NAMESPACE`` for another),
so that fleet can share an etcd with others, and fleets one etcd with each other. Lease ids are
etcd's own: never reused, and not ordered.

gRPC is imported here only, so that the SQLite default never loads it (~19 MB, ~95 ms), and
with its fork handlers off: with them, children forked under uvloop sometimes died before
their exec (../shared/ETCD-NOTES.md). The client is aetcd's generated etcd API over grpc.aio.
"""

import asyncio
import ipaddress
import math
import os
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"  # before grpc is imported: see the docstring

import anyio
import grpc
import msgspec
import structlog
from aetcd import rpc
from anyio.abc import TaskStatus

from fleetd.store import (
    Compare,
    Delete,
    DeleteRange,
    DeleteResult,
    Event,
    Get,
    KeyValue,
    Lease,
    Operation,
    Put,
    PutResult,
    Range,
    RangeResult,
    Response,
    Store,
    StoreStatistics,
    TxnResult,
    check_branch,
)
from fleetd.store.watermark import Mark, Watermark
from protocol.errors import (
    Absent,
    Compacted,
    FleetError,
    Internal,
    InvalidRequest,
    StateLost,
    StoreFull,
    StoreUnavailable,
)

log = structlog.get_logger("fleetd.store.etcd")

SCHEME = "etcd"
META_SUFFIX = b":store"
"""The key of the store's identity: the namespace's name and this (``fleet:store``), outside
the namespace's keys, so that no range of the store's sees it."""
MARK_EVERY = 1.0
"""Seconds between writes of the revision reached to the state directory's watermark."""
DEFAULT_PORT = 2379
DEFAULT_NAMESPACE = "fleet/"
BATCHES_IN_FLIGHT = 2
"""Batches on their way to etcd at once (see _Batches): one sent while the other waits."""
BATCH_OPS = 128
"""etcd's --max-txn-ops, by default: a batch's transactions, plus the most operations any of
them has, at most (etcd gives a nested transaction what its parent's count leaves)."""
BATCH_BYTES = 1 << 20
"""A batch's size at most, under etcd's request limit (1.5 MiB by default)."""
CALL_TIMEOUT = 5.0
"""Seconds a call to etcd may take before the request that made it fails StoreUnavailable:
longer than an election (1 s by default), shorter than a client's patience."""
RECONNECT_BACKOFF = (100, 1000)
"""First and longest pause (ms) between gRPC's tries to reconnect to an etcd that went away:
gRPC's own (1 s, growing to 120 s) left fleetd without its store for seconds, up to minutes,
after etcd was back."""
WATCH_RETRY = (0.05, 2.0)
"""First and longest pause between tries to resume a broken watch (doubling)."""

_RESULTS = {
    "==": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}
_TARGETS = {
    "value": (rpc.Compare.VALUE, "value"),
    "version": (rpc.Compare.VERSION, "version"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "mod": (rpc.Compare.MOD, "mod_revision"),
}
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}

_REQUIRE_LEADER = (("hasleader", "true"),)
"""Asks etcd to refuse a call at once ("no leader") while the member has no leader (no
quorum), as etcd's own client does, rather than let it wait out CALL_TIMEOUT."""

T = TypeVar("T")


class StoreMeta(msgspec.Struct, frozen=True):
    """A store's identity in etcd: a random id, and the base added to etcd's revisions (above
    zero once a state directory's store was reset onto an etcd that had lost it)."""

    id: int
    base: int = 0


_decode_meta = msgspec.json.Decoder(StoreMeta).decode


def new_store_id() -> int:
    return secrets.randbits(63) or 1


@dataclass(frozen=True)
class Endpoints:
    """Where etcd is, from ``etcd://HOST:PORT[,HOST:PORT…][/NAMESPACE]``."""

    hosts: tuple[tuple[str, int], ...]
    namespace: str = DEFAULT_NAMESPACE

    @classmethod
    def parse(cls, url: str) -> "Endpoints":
        """Raises InvalidRequest saying what is wrong with `url`."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unclosed or non-IPv6 bracket
            raise InvalidRequest(f"{url!r} is not an etcd address: {exc}") from None
        if parts.scheme != SCHEME or not parts.netloc:
            raise InvalidRequest(f"{url!r} is not an etcd address: etcd://HOST:PORT[,HOST:PORT…]")
        if "@" in parts.netloc:  # the message must not repeat a password
            raise InvalidRequest("an etcd address takes no user or password (etcd://HOST:PORT)")
        if parts.query or parts.fragment:
            raise InvalidRequest(f"{url!r}: only hosts, ports and a namespace are understood")
        hosts = tuple(_host_port(url, item) for item in parts.netloc.split(","))
        namespace = parts.path.strip("/")
        return cls(hosts, f"{namespace}/" if namespace else DEFAULT_NAMESPACE)

    def target(self) -> str:
        """A gRPC target naming every endpoint's addresses, which gRPC tries in turn (its
        pick_first policy) and reconnects to. Hosts are resolved now: a target of several
        addresses takes IP literals only."""
        v4: list[str] = []
        v6: list[str] = []
        for host, port in self.hosts:
            found = _addresses(host, port)
            ours = [a for a in found if a.version == 4] or found  # IPv4 where a host has both
            for address in ours:
                if isinstance(address, ipaddress.IPv4Address):
                    v4.append(f"{address}:{port}")
                else:
                    v6.append(f"[{address}]:{port}")
        if v4 and v6:  # one gRPC target takes one family
            raise StoreUnavailable(
                f"etcd at {self} mixes IPv4 and IPv6 endpoints: give them all in one family"
            )
        if not v4 and not v6:
            raise StoreUnavailable(f"no address found for etcd at {self}")
        return f"ipv4:{','.join(v4)}" if v4 else f"ipv6:{','.join(v6)}"

    def __str__(self) -> str:
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        return f"{SCHEME}://{hosts}/{self.namespace.rstrip('/')}"


def _host_port(url: str, item: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT, or a host alone (port 2379)."""
    if item.startswith("["):
        host, bracket, rest = item[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else ("" if rest else "2379")
        valid = bool(bracket)
    else:
        host, colon, port = item.partition(":")
        port = port if colon else str(DEFAULT_PORT)
        valid = ":" not in port
    digits = port.isascii() and port.isdigit()  # ASCII: int() takes other scripts' digits too
    if not valid or not host or not digits or not 0 < int(port) < 65536:
        raise InvalidRequest(f"{url!r}: {item!r} is not HOST:PORT")
    return host, int(port)


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StoreUnavailable(f"cannot resolve etcd host {host!r}: {exc.strerror}") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in found))


class EtcdStore(Store):
    """The store on an etcd cluster; see the module docstring.

    Run it with ``await tg.start(store.serve)``, or ``async with EtcdStore.open(url)``. It is
    ready once etcd answered once (its revision then is `revision`'s start).
    """

    shared = True
    max_operations = BATCH_OPS

    def __init__(self, endpoints: Endpoints, *, watermark: Watermark | None = None) -> None:
        self.endpoints = endpoints
        self._watermark = watermark
        self._meta_key = endpoints.namespace.rstrip("/").encode() + META_SUFFIX
        self._prefix = endpoints.namespace.encode()
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._leases: Any = None
        self._watches: Any = None
        self._maintenance: Any = None
        self._keepalive: _KeepAlive | None = None
        self._batches: _Batches | None = None
        self._revision = 0
        self._compacted = 0
        self._marked = 0
        self._base = 0
        """Added to etcd's revisions (fleetd.store.etcd's docstring: Continuity)."""
        self._transactions = 0
        self._operations = 0
        self._in_flight = 0
        self._watchers = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator["EtcdStore"]:
        """The store, served for the duration of the block."""
        store = cls(Endpoints.parse(url))
        async with anyio.create_task_group() as tg:
            await tg.start(store.serve)
            try:
                yield store
            finally:
                tg.cancel_scope.cancel()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connects, checks that etcd holds the store the watermark describes (StateLost if
        not), then serves until cancelled, keeping the watermark up to date."""
        async with self.connected():
            meta = await self.read_meta()
            mark = self._watermark.read() if self._watermark is not None else None
            self._check_continuity(mark, meta)
            if meta is None:
                meta = await self.create_meta(StoreMeta(id=new_store_id()))
            self._base = meta.base
            await self.read_meta()  # the revision, now on our side of the base
            if self._watermark is not None:
                await anyio.to_thread.run_sync(self._mark, meta, mark is None)
            task_status.started()
            try:
                await self._keep_marking()
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._advance_mark)

    @asynccontextmanager
    async def connected(self) -> AsyncIterator[None]:
        """The channel and its stubs, for the duration of the block (`serve` holds them; so
        does `fleetd reset-state`, which needs no more)."""
        first, longest = RECONNECT_BACKOFF
        self._channel = grpc.aio.insecure_channel(
            self.endpoints.target(),
            options=[
                ("grpc.initial_reconnect_backoff_ms", first),
                ("grpc.max_reconnect_backoff_ms", longest),
            ],
        )
        keepalive = _KeepAlive(rpc.LeaseStub(self._channel))
        try:
            self._kv = rpc.KVStub(self._channel)
            self._leases = rpc.LeaseStub(self._channel)
            self._watches = rpc.WatchStub(self._channel)
            self._maintenance = rpc.MaintenanceStub(self._channel)
            self._keepalive = keepalive
            self._batches = _Batches(self._kv, self.endpoints)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                keepalive.close()
                await self._channel.close()

    # Continuity -------------------------------------------------------------------------------

    async def read_meta(self) -> "StoreMeta | None":
        """The store's identity in etcd, or None where etcd holds no fleet store; reads the
        current revision along."""
        answer = await self._range_request(rpc.RangeRequest(key=self._meta_key))
        return _decode_meta(answer.kvs[0].value) if answer.kvs else None

    async def create_meta(self, meta: "StoreMeta") -> "StoreMeta":
        """Write the identity of a new store, unless another fleetd just did: then that one."""
        absent = rpc.Compare(
            result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, key=self._meta_key
        )
        put = rpc.PutRequest(key=self._meta_key, value=msgspec.json.encode(meta))
        get = rpc.RangeRequest(key=self._meta_key)
        answer = await self._call(
            self._kv.Txn,
            rpc.TxnRequest(
                compare=[absent],
                success=[rpc.RequestOp(request_put=put)],
                failure=[rpc.RequestOp(request_range=get)],
            ),
        )
        if answer.succeeded:
            log.info("etcd_store_created", store=f"{meta.id:x}", base=meta.base)
            return meta
        return _decode_meta(answer.responses[0].response_range.kvs[0].value)

    async def replace_meta(self, old: "StoreMeta", new: "StoreMeta") -> None:
        """Rewrite the store's identity if it is still `old` (a reset moving its base up)."""
        same = rpc.Compare(
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.VALUE,
            key=self._meta_key,
            value=msgspec.json.encode(old),
        )
        put = rpc.PutRequest(key=self._meta_key, value=msgspec.json.encode(new))
        answer = await self._call(
            self._kv.Txn, rpc.TxnRequest(compare=[same], success=[rpc.RequestOp(request_put=put)])
        )
        if not answer.succeeded:
            raise StateLost(f"the store's identity in etcd at {self.endpoints} changed meanwhile")

    def _check_continuity(self, mark: Mark | None, meta: "StoreMeta | None") -> None:
        """Whether etcd holds the store this state directory used, at or past the revision
        it saw; StateLost saying what went wrong and what to do if not."""
        if mark is None:
            return
        where = f"etcd at {self.endpoints}"
        if meta is None:
            raise StateLost(
                f"{where} holds no fleet store, but this state directory used store "
                f"{mark.store_id:x} there up to revision {mark.revision}: etcd was wiped, or "
                "this is another etcd cluster. Point --store at the right one, or run `fleetd "
                "--store … reset-state` to start a new store there (revisions and fencing "
                f"tokens continue above {mark.revision})"
            )
        if meta.id != mark.store_id:
            raise StateLost(
                f"{where} holds store {meta.id:x}, not store {mark.store_id:x} that this state "
                "directory used: it is another store. Point --store at the right etcd, or run "
                "`fleetd --store … reset-state --keep-store` to join this one"
            )
        revision = self._revision + meta.base
        if revision < mark.revision:
            raise StateLost(
                f"{where} is at revision {revision}, but this state directory saw it reach "
                f"revision {mark.revision}: etcd was rolled back (restored from an older "
                "snapshot). Restore the newer one, or run `fleetd --store … reset-state "
                f"--keep-store` to go on from this one (revisions continue above {mark.revision})"
            )

    def _mark(self, meta: "StoreMeta", new: bool) -> None:
        assert self._watermark is not None
        if new:
            self._watermark.create(Mark.at(meta.id, self._revision))
        else:
            self._watermark.open()
        self._marked = self._revision

    async def _keep_marking(self) -> None:
        """Every MARK_EVERY seconds, write down the revision reached, if it moved."""
        while True:
            await anyio.sleep(MARK_EVERY)
            if self._watermark is not None and self._revision != self._marked:
                await anyio.to_thread.run_sync(self._advance_mark)

    def _advance_mark(self) -> None:
        if self._watermark is None or self._revision == self._marked:
            return
        revision = self._revision
        try:
            self._watermark.advance(revision, revision)
        except OSError as exc:
            log.warning("etcd_watermark_not_written", error=str(exc))
            return
        self._marked = revision

    # Store -----------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation] = (),
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        check_branch(success)
        check_branch(failure)
        request = rpc.TxnRequest(
            compare=[self._compare(c) for c in compares],
            success=[self._request_op(op) for op in success],
            failure=[self._request_op(op) for op in failure],
        )
        self._transactions += 1
        self._operations += len(success) + len(failure)
        queued = _Queued(request, self._keys_of(compares, success, failure))
        self._in_flight += 1
        try:
            assert self._batches is not None
            self._batches.add(queued)
            succeeded, answers, revision = await _left_if_cancelled(queued.answer)
        finally:
            self._in_flight -= 1
        self._revision = max(self._revision, self._ours(revision))
        ops = success if succeeded else failure
        responses = tuple(self._response(op, r) for op, r in zip(ops, answers, strict=True))
        return TxnResult(succeeded, self._ours(revision), responses)

    def _keys_of(
        self, compares: Sequence[Compare], *branches: Sequence[Operation]
    ) -> frozenset[bytes] | None:
        """The keys a transaction touches, or None when it reads or deletes a range (then it
        goes to etcd alone: see _Batches)."""
        keys = {self._key(compare.key) for compare in compares}
        for op in (op for branch in branches for op in branch):
            if isinstance(op, Range | DeleteRange):
                return None
            keys.add(self._key(op.key))
        return frozenset(keys)

    async def grant(self, ttl: float) -> tuple[int, float]:
        answer = await self._call(
            self._leases.LeaseGrant, rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        )
        if answer.error:
            raise Internal(f"etcd refused a lease: {answer.error}")
        return answer.ID, float(answer.TTL)

    async def keepalive(self, lease: int) -> float:
        assert self._keepalive is not None
        return float(await self._in_own_task(self._keepalive.renew(lease)))

    async def revoke(self, lease: int) -> None:
        await self._call(self._leases.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease))

    async def leases(self) -> tuple[Lease, ...]:
        listed = await self._call(self._leases.LeaseLeases, rpc.LeaseLeasesRequest())
        found = []
        for status in listed.leases:
            live = await self._call(
                self._leases.LeaseTimeToLive, rpc.LeaseTimeToLiveRequest(ID=status.ID)
            )
            if live.TTL >= 0:  # -1: expired meanwhile
                found.append(Lease(live.ID, float(live.grantedTTL), float(live.TTL)))
        return tuple(sorted(found, key=lambda lease: lease.id))

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        watch = _Watch(self, self._key(prefix), start_revision)
        self._watchers += 1
        try:
            await watch.start()
            yield watch
        finally:
            self._watchers -= 1
            watch.close()

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            revision=self._revision,
            compact_revision=self._compacted,
            transactions=self._transactions,
            operations=self._operations,
            commits=self._batches.sent if self._batches is not None else 0,
            queued=self._in_flight,
            leases=0,
            watchers=self._watchers,
        )

    async def compact(self, revision: int) -> None:
        """Make etcd forget the history before `revision` (tests and maintenance)."""
        request = rpc.CompactionRequest(revision=self._etcds(revision), physical=True)
        await self._call(self._kv.Compact, request)
        self._compacted = max(self._compacted, revision - 1)

    async def status(self) -> Any:
        """etcd's status of the member we are connected to (its leader, its member id)."""
        return await self._call(self._maintenance.Status, rpc.StatusRequest())

    # Translation ------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _compare(self, compare: Compare) -> Any:
        target, field = _TARGETS[compare.target]
        operand = compare.operand
        if compare.target in ("create", "mod") and isinstance(operand, int) and operand > 0:
            operand = operand - self._base if operand > self._base else -1  # before the base
        return rpc.Compare(
            result=_RESULTS[compare.op],
            target=target,
            key=self._key(compare.key),
            **{field: operand},
        )

    def _ours(self, revision: int) -> int:
        """etcd's revision as this store's: above every one a reset store had (its base)."""
        return revision + self._base if revision else 0

    def _etcds(self, revision: int) -> int:
        """This store's revision as etcd's (a revision before the base: etcd's first)."""
        return max(revision - self._base, 1)

    def _request_op(self, op: Operation) -> Any:
        match op:
            case Put(key, value, lease):
                put = rpc.PutRequest(key=self._key(key), value=value, lease=lease)
                return rpc.RequestOp(request_put=put)
            case Delete(key):
                delete = rpc.DeleteRangeRequest(key=self._key(key), prev_kv=True)
                return rpc.RequestOp(request_delete_range=delete)
            case DeleteRange(prefix):
                start = self._key(prefix)
                delete = rpc.DeleteRangeRequest(
                    key=start, range_end=_prefix_end(start), prev_kv=True
                )
                return rpc.RequestOp(request_delete_range=delete)
            case Get(key):
                return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(key)))
            case Range(prefix, limit):
                start = self._key(prefix)
                ranged = rpc.RangeRequest(key=start, range_end=_prefix_end(start), limit=limit)
                return rpc.RequestOp(request_range=ranged)
        raise Internal(f"no etcd request for {op!r}")

    def _response(self, op: Operation, response: Any) -> Response:
        match op:
            case Put():
                return PutResult()
            case Delete() | DeleteRange():
                deleted = response.response_delete_range.prev_kvs
                return DeleteResult(tuple(self._kv_of(kv) for kv in deleted))
            case Get() | Range():
                ranged = response.response_range
                return RangeResult(tuple(self._kv_of(kv) for kv in ranged.kvs), ranged.more)
        raise Internal(f"no answer for {op!r}")

    def _kv_of(self, kv: Any) -> KeyValue:
        return KeyValue(
            key=kv.key[len(self._prefix) :].decode(),
            value=kv.value,
            create_revision=self._ours(kv.create_revision),
            mod_revision=self._ours(kv.mod_revision),
            version=kv.version,
            lease=kv.lease,
        )

    def _event_of(self, event: Any) -> Event:
        prev = self._kv_of(event.prev_kv) if event.HasField("prev_kv") else None
        if event.type == rpc.Event.DELETE:
            key = event.kv.key[len(self._prefix) :].decode()
            deleted = KeyValue(key, b"", 0, self._ours(event.kv.mod_revision), 0)
            return Event("delete", deleted, prev)
        return Event("put", self._kv_of(event.kv), prev)

    # Calls ------------------------------------------------------------------------------------

    async def _range_request(self, request: Any) -> Any:
        answer = await self._call(self._kv.Range, request)
        self._revision = max(self._revision, self._ours(answer.header.revision))
        return answer

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        return await self._in_own_task(
            method(request, timeout=CALL_TIMEOUT, metadata=_REQUIRE_LEADER)
        )

    async def _in_own_task(self, call: Awaitable[T]) -> T:
        """`call` as a task of its own, which a cancelled caller cancels and leaves at once
        (see the module docstring): gRPC's answer to that stays in the task."""
        self._in_flight += 1
        try:
            task = await _cancellable(call)
        finally:
            self._in_flight -= 1
        try:
            return task.result()
        except grpc.aio.AioRpcError as exc:
            raise translated(exc, self.endpoints) from None
        except asyncio.CancelledError:  # not ours (we would have left): the channel closed
            raise StoreUnavailable(f"the connection to etcd at {self.endpoints} closed") from None


@dataclass(eq=False)
class _Queued:
    """A transaction waiting for its batch: its `answer` is (succeeded, its responses, the
    revision of the batch)."""

    request: Any
    keys: frozenset[bytes] | None
    answer: "asyncio.Future[tuple[bool, Any, int]]" = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    alone: bool = False


def _width(request: Any) -> int:
    """What etcd counts of a transaction against --max-txn-ops: its widest branch."""
    return max(len(request.compare), len(request.success), len(request.failure))


class _Batches:
    """Transactions sent to etcd many at a time, as SQLite's group commit does: each a nested
    transaction of one Txn call, so that a batch costs one gRPC call and one raft entry, where
    a call each cost fleetd ~130 µs of gRPC's CPU and etcd a proposal each.

    A nested transaction's compares see the state before the batch, and one call may not
    write a key twice: so a batch takes only transactions whose keys are disjoint (each other's,
    and those of the batches in flight), a key's transactions go in the order they came, and
    one that reads or deletes a range goes alone. All of a batch's writes share its revision
    (a lease token is a key's create revision: still unique per name, and increasing). An
    error etcd gives for one member fails the whole call: its members are then sent again,
    each alone, to get each its own answer.
    """

    def __init__(self, kv: Any, endpoints: Endpoints) -> None:
        self._kv = kv
        self._endpoints = endpoints
        self._queue: deque[_Queued] = deque()
        self._busy: set[bytes] = set()
        """Keys of the batches in flight."""
        self._sending = 0
        self._scheduled = False
        self._tasks: set[asyncio.Future[None]] = set()
        self.sent = 0
        """Txn calls made: transactions / sent is how well they batch."""

    def add(self, queued: _Queued) -> None:
        """Queue `queued`; batches leave at the end of this turn of the event loop, so that
        the transactions of one turn share them."""
        self._queue.append(queued)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        while self._queue and self._sending < BATCHES_IN_FLIGHT:
            batch = self._take()
            if not batch:
                return  # what is queued waits for keys in flight
            self._sending += 1
            for queued in batch:
                self._busy |= queued.keys or set()
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[_Queued]:
        taken: list[_Queued] = []
        blocked = set(self._busy)
        left: deque[_Queued] = deque()
        size = 0
        widest = 0
        while self._queue:
            queued = self._queue.popleft()
            keys = queued.keys
            alone = keys is None or queued.alone
            width = max(widest, _width(queued.request))
            fits = not taken or (  # one alone is sent as it is: etcd judges it
                len(taken) + 1 + width <= BATCH_OPS
                and size + queued.request.ByteSize() < BATCH_BYTES
            )
            if alone and not taken and not (keys or set()) & blocked:
                left.extend(self._queue)
                self._queue.clear()
                taken.append(queued)
                break
            if alone or not fits or (keys is not None and keys & blocked):
                blocked |= keys or set()
                left.append(queued)
                continue
            assert keys is not None
            blocked |= keys
            taken.append(queued)
            size += queued.request.ByteSize()
            widest = width
        self._queue = left
        return taken

    async def _send(self, batch: list[_Queued]) -> None:
        try:
            answers = await self._call(batch)
        except grpc.aio.AioRpcError as exc:
            if len(batch) > 1 and exc.code() not in _UNAVAILABLE:
                for queued in reversed(batch):  # each alone, in the order they came
                    queued.alone = True
                    self._queue.appendleft(queued)
            else:
                self._fail(batch, translated(exc, self._endpoints))
        except BaseException:  # the channel closed under it (fleetd stopping)
            self._fail(
                batch, StoreUnavailable(f"the connection to etcd at {self._endpoints} closed")
            )
            raise
        else:
            for queued, answer in zip(batch, answers, strict=True):
                if not queued.answer.done():
                    queued.answer.set_result(answer)
        finally:
            self._sending -= 1
            for queued in batch:
                self._busy -= queued.keys or set()
            self._pump()

    async def _call(self, batch: list[_Queued]) -> list[tuple[bool, Any, int]]:
        self.sent += 1
        if len(batch) == 1:
            answer = await self._kv.Txn(
                batch[0].request, timeout=CALL_TIMEOUT, metadata=_REQUIRE_LEADER
            )
            return [(answer.succeeded, answer.responses, answer.header.revision)]
        nested = [rpc.RequestOp(request_txn=queued.request) for queued in batch]
        answer = await self._kv.Txn(
            rpc.TxnRequest(success=nested), timeout=CALL_TIMEOUT, metadata=_REQUIRE_LEADER
        )
        revision = answer.header.revision
        return [
            (r.response_txn.succeeded, r.response_txn.responses, revision) for r in answer.responses
        ]

    def _fail(self, batch: list[_Queued], error: FleetError) -> None:
        for queued in batch:
            if not queued.answer.done():
                queued.answer.set_exception(error)


class _KeepAlive:
    """One LeaseKeepAlive stream for every renewal, as etcd's own clients keep (a stream per
    renewal costs three times as much); opened again after it broke. One renewal at a time."""

    def __init__(self, leases: Any) -> None:
        self._leases = leases
        self._stream: Any = None
        self._lock = asyncio.Lock()

    async def renew(self, lease: int) -> int:
        async with self._lock:
            if self._stream is None or self._stream.done():  # broke since the last renewal
                self._stream = self._leases.LeaseKeepAlive()
            stream = self._stream
            try:
                await _within(stream.write(rpc.LeaseKeepAliveRequest(ID=lease)))
                answer = await _within(stream.read())
            except asyncio.InvalidStateError:  # broke between the check and the write
                self.close()
                raise StoreUnavailable("etcd ended the lease keepalive stream") from None
            except BaseException:
                self.close()
                raise
            if answer is grpc.aio.EOF:
                self.close()
                raise StoreUnavailable("etcd closed the lease keepalive stream")
            return int(answer.TTL)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None


class _Watch:
    """One etcd watch, resumed after the stream breaks from the revision after the last event
    passed on (see the module docstring)."""

    def __init__(self, store: EtcdStore, prefix: bytes, start_revision: int | None) -> None:
        self._store = store
        self._prefix = prefix
        self._next = store._etcds(start_revision) if start_revision else 0
        """etcd's revision to resume from; 0: the next write (etcd's default)."""
        self._stream: Any = None
        self._pending: deque[Event] = deque()
        self._closed = False

    async def start(self) -> None:
        """Open the stream, and wait until etcd says the watch is in place: a write made
        once the caller resumes is seen."""
        stream = self._store._watches.Watch()
        self._stream = stream
        create = rpc.WatchCreateRequest(
            key=self._prefix,
            range_end=_prefix_end(self._prefix),
            start_revision=self._next,
            prev_kv=True,
        )
        answer = await self._store._in_own_task(self._open(stream, create))
        if not self._next:
            self._next = answer.header.revision + 1
        self._take(answer)

    async def _open(self, stream: Any, create: Any) -> Any:
        await _within(stream.write(rpc.WatchRequest(create_request=create)))
        while True:
            answer = await _within(stream.read())
            if answer is grpc.aio.EOF:
                raise StoreUnavailable("etcd closed the watch stream")
            self._check(answer)
            if answer.created:
                return answer

    def _check(self, answer: Any) -> None:
        if answer.compact_revision:
            compacted = self._store._ours(answer.compact_revision)
            raise Compacted(
                f"etcd no longer holds revision {self._store._ours(self._next)} (compacted up "
                f"to {compacted}): read again, then watch from that read",
                compact_revision=compacted,
            )
        if answer.canceled:
            raise StoreUnavailable(f"etcd cancelled the watch: {answer.cancel_reason}")

    def _take(self, answer: Any) -> None:
        for event in answer.events:
            self._pending.append(self._store._event_of(event))
            self._next = event.kv.mod_revision + 1

    def __aiter__(self) -> "_Watch":
        return self

    async def __anext__(self) -> Event:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            try:
                answer = (await _cancellable(self._stream.read())).result()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _UNAVAILABLE:
                    raise translated(exc, self._store.endpoints) from None
                answer = grpc.aio.EOF
            if answer is grpc.aio.EOF:
                await self._resume()
                continue
            self._check(answer)
            self._take(answer)
        return self._pending.popleft()

    async def _resume(self) -> None:
        """Open the watch again from the next revision, pausing between tries, until it is."""
        pause, longest = WATCH_RETRY
        while True:
            self._stream.cancel()
            try:
                await self.start()
                return
            except StoreUnavailable:
                await anyio.sleep(pause)
                pause = min(pause * 2, longest)

    def close(self) -> None:
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()


async def _within(step: Awaitable[T]) -> T:
    """One step of a stream (a write, a read) within CALL_TIMEOUT, timed out on our side
    (gRPC's own deadline would end the whole stream)."""
    return (await _cancellable(step, CALL_TIMEOUT)).result()


async def _cancellable(step: Awaitable[T], timeout: float | None = None) -> "asyncio.Future[T]":
    """`step` run to its end as a task of its own, which our cancellation (or `timeout`)
    cancels: gRPC's answer to it (a bare asyncio.CancelledError) stays in that task and never
    reaches anyio's scopes. Not asyncio.wait_for, which drops a step's error that races the
    cancellation, for asyncio to log ("Task exception was never retrieved")."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.wait((task,), timeout=timeout)
    except BaseException:
        _abandon(task)
        raise
    if not task.done():
        _abandon(task)
        raise StoreUnavailable(f"etcd did not answer within {timeout}s")
    return task


async def _left_if_cancelled(answer: "asyncio.Future[T]") -> T:
    """A batch's answer, which a cancelled caller leaves without cancelling it (the batch is
    others' too), its outcome then taken so that asyncio does not log it."""
    try:
        return await asyncio.shield(answer)
    except BaseException:
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        raise


def _abandon(task: "asyncio.Future[Any]") -> None:
    """Cancels a step its caller left, and takes its outcome when it comes, so that asyncio
    does not log it."""
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    task.cancel()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def translated(exc: grpc.aio.AioRpcError, endpoints: Endpoints) -> FleetError:
    """What etcd's error means to fleetd's caller."""
    code, detail = exc.code(), exc.details() or ""
    if code in _UNAVAILABLE:
        return StoreUnavailable(f"etcd at {endpoints} does not answer: {detail or code.name}")
    if code == grpc.StatusCode.NOT_FOUND:
        return Absent(f"etcd: {detail}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "space" in detail:
        return StoreFull(f"etcd is out of space ({detail}): compact and defragment it")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in detail:
        return Compacted(f"etcd: {detail}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"etcd refused the request: {detail}")
    return StoreUnavailable(f"etcd at {endpoints} failed: {code.name}: {detail}")
