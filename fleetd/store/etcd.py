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
  task. A write whose caller went away may still commit, as the Store interface allows.
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
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"  # before grpc is imported: see the docstring

import anyio
import grpc
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
from protocol.errors import (
    Absent,
    Compacted,
    FleetError,
    Internal,
    InvalidRequest,
    StoreFull,
    StoreUnavailable,
)

SCHEME = "etcd"
DEFAULT_PORT = 2379
DEFAULT_NAMESPACE = "fleet/"
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
        if parts.query or parts.fragment or "@" in parts.netloc:
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
            for address in _addresses(host, port):
                if isinstance(address, ipaddress.IPv4Address):
                    v4.append(f"{address}:{port}")
                else:
                    v6.append(f"[{address}]:{port}")
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

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._prefix = endpoints.namespace.encode()
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._leases: Any = None
        self._watches: Any = None
        self._maintenance: Any = None
        self._keepalive: _KeepAlive | None = None
        self._revision = 0
        self._compacted = 0
        self._transactions = 0
        self._operations = 0
        self._in_flight = 0
        self._watchers = 0
        self.cluster_id = 0
        """etcd's cluster id, as its answers carry it."""

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
        """Connects, reads the revision, then holds the connection until cancelled."""
        first, longest = RECONNECT_BACKOFF
        self._channel = grpc.aio.insecure_channel(
            self.endpoints.target(),
            options=[
                ("grpc.initial_reconnect_backoff_ms", first),
                ("grpc.max_reconnect_backoff_ms", longest),
            ],
        )
        try:
            self._kv = rpc.KVStub(self._channel)
            self._leases = rpc.LeaseStub(self._channel)
            self._watches = rpc.WatchStub(self._channel)
            self._maintenance = rpc.MaintenanceStub(self._channel)
            self._keepalive = _KeepAlive(self._leases)
            await self._range_request(rpc.RangeRequest(key=self._prefix, limit=1, keys_only=True))
            task_status.started()
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                if self._keepalive is not None:
                    self._keepalive.close()
                await self._channel.close()

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
        answer = await self._call(self._kv.Txn, request)
        self._seen(answer.header)
        ops = success if answer.succeeded else failure
        responses = tuple(
            self._response(op, r) for op, r in zip(ops, answer.responses, strict=True)
        )
        return TxnResult(answer.succeeded, answer.header.revision, responses)

    async def grant(self, ttl: float) -> tuple[int, float]:
        answer = await self._call(
            self._leases.LeaseGrant, rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        )
        if answer.error:
            raise Internal(f"etcd refused a lease: {answer.error}")
        return answer.ID, float(answer.TTL)

    async def keepalive(self, lease: int) -> float:
        assert self._keepalive is not None
        return float(await self._shielded(self._keepalive.renew(lease)))

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
            commits=self._transactions,
            queued=self._in_flight,
            leases=0,
            watchers=self._watchers,
        )

    async def compact(self, revision: int) -> None:
        """Make etcd forget the history before `revision` (tests and maintenance)."""
        await self._call(self._kv.Compact, rpc.CompactionRequest(revision=revision, physical=True))
        self._compacted = max(self._compacted, revision - 1)

    async def status(self) -> Any:
        """etcd's status of the member we are connected to (its leader, its revision)."""
        return await self._call(self._maintenance.Status, rpc.StatusRequest())

    # Translation ------------------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        return self._prefix + key.encode()

    def _compare(self, compare: Compare) -> Any:
        target, field = _TARGETS[compare.target]
        return rpc.Compare(
            result=_RESULTS[compare.op],
            target=target,
            key=self._key(compare.key),
            **{field: compare.operand},
        )

    def _request_op(self, op: Operation) -> Any:
        match op:
            case Put(key, value, lease):
                put = rpc.PutRequest(key=self._key(key), value=value, lease=lease, prev_kv=True)
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
                put = response.response_put
                return PutResult(self._kv_of(put.prev_kv) if put.HasField("prev_kv") else None)
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
            create_revision=kv.create_revision,
            mod_revision=kv.mod_revision,
            version=kv.version,
            lease=kv.lease,
        )

    def _event_of(self, event: Any) -> Event:
        prev = self._kv_of(event.prev_kv) if event.HasField("prev_kv") else None
        if event.type == rpc.Event.DELETE:
            key = event.kv.key[len(self._prefix) :].decode()
            deleted = KeyValue(key, b"", 0, event.kv.mod_revision, 0)
            return Event("delete", deleted, prev)
        return Event("put", self._kv_of(event.kv), prev)

    # Calls ------------------------------------------------------------------------------------

    async def _range_request(self, request: Any) -> Any:
        answer = await self._call(self._kv.Range, request)
        self._seen(answer.header)
        return answer

    def _seen(self, header: Any) -> None:
        self._revision = max(self._revision, header.revision)
        self.cluster_id = header.cluster_id

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        return await self._shielded(method(request, timeout=CALL_TIMEOUT, metadata=_REQUIRE_LEADER))

    async def _shielded(self, call: Awaitable[T]) -> T:
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
        self._next = start_revision or 0
        """The revision to resume from; 0: the next write (etcd's default)."""
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
        answer = await self._store._shielded(self._open(stream, create))
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
            raise Compacted(
                f"etcd no longer holds revision {self._next} (compacted up to "
                f"{answer.compact_revision}): read again, then watch from that read",
                compact_revision=answer.compact_revision,
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
