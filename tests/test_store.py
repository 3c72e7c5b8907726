"""The store: a conformance suite every backend passes, then what only SQLite promises.

Temp dirs (`tempdir`) and the anyio backend (asyncio with uvloop) come from conftest.py.
The conformance tests take the `backend` fixture, parametrized by backend name; a backend's
harness says how to open (and reopen) a store on the same data and which short TTL it grants.
"""

import contextlib
import operator
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from fleetd.core.dirs import PrivateDir
from fleetd.store import (
    Compare,
    CompareOp,
    Delete,
    DeleteRange,
    DeleteResult,
    Event,
    Get,
    KeyValue,
    Put,
    PutResult,
    Range,
    RangeResult,
    Store,
    Target,
    sqlite,
)
from fleetd.store.scoped import Scoped
from fleetd.store.sqlite import NOTES_FLUSHED_WITHIN, SQLiteStore
from fleetd.store.watermark import Watermark
from protocol.errors import Absent, Compacted, Incompatible, Internal, InvalidRequest, StoreFull
from tests.etcd_server import GRPC_DRAIN, EtcdServer, need_etcd

HISTORY_KEPT = 2000
"""Revisions of history the SQLite test stores keep: enough for a slow watcher, small to
compact."""


class Backend(Protocol):
    """What the conformance suite needs of a backend's harness."""

    ttl: float
    """A short TTL that the backend grants as asked."""

    def open(self) -> AbstractAsyncContextManager[Store]:
        """A store on this backend's data; opening again after closing is a reopen."""
        ...

    async def compact(self, store: Store, revision: int) -> None:
        """Make the store's history forget `revision` and every one before it."""
        ...


@dataclass
class SQLiteBackend:
    directory: str
    ttl: float = 0.5

    @property
    def path(self) -> str:
        return os.path.join(self.directory, "store.db")

    def open(self) -> AbstractAsyncContextManager[Store]:
        return SQLiteStore.open(self.path, history=HISTORY_KEPT)

    async def compact(self, store: Store, revision: int) -> None:
        """SQLite keeps the last HISTORY_KEPT revisions: write that many more."""
        await put_concurrently(store, [f"compact/{n}" for n in range(HISTORY_KEPT)])
        assert store.statistics().compact_revision >= revision


class EtcdBackend:
    """An etcd server of its own in the temp dir, started by the first open: closing the
    store stops it, so that opening again is a restart on the same data."""

    ttl = 1.0

    def __init__(self, directory: str) -> None:
        self.server = EtcdServer(directory)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        from fleetd.store.etcd import EtcdStore

        await anyio.to_thread.run_sync(self.server.start)
        try:
            async with EtcdStore.open(self.server.url) as store:
                yield store
        finally:
            await anyio.sleep(GRPC_DRAIN)  # see tests/test_store_etcd.py's open_store
            await anyio.to_thread.run_sync(self.server.stop)

    async def compact(self, store: Store, revision: int) -> None:
        """etcd forgets the revisions before the one it compacts at: write one more, then
        compact at it."""
        from fleetd.store.etcd import EtcdStore

        assert isinstance(store, EtcdStore)
        await store.compact(await store.put("compact/after", b"v"))
        assert store.statistics().compact_revision >= revision

    def close(self) -> None:
        self.server.stop(signal.SIGKILL)


class ScopedBackend(SQLiteBackend):
    """SQLite seen through a scope (fleetd.store.scoped: a fleetd's own part of a shared
    store), with a key of its own beside the scope that the scoped store must never see."""

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Store]:
        async with SQLiteStore.open(self.path, history=HISTORY_KEPT) as store:
            if await store.get("beside") is None:
                await store.put("beside", b"not in the scope")
            yield Scoped(store, "homes/h:/state/")


BACKENDS: dict[str, Callable[[str], Backend]] = {
    "sqlite": SQLiteBackend,
    "etcd": EtcdBackend,
    "scoped": ScopedBackend,
}
"""Harnesses by backend name, made from a temp dir: the etcd one starts its own server there,
restarts it to reopen, and compacts with etcd's compaction."""


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tempdir: str) -> Iterator[Backend]:
    if request.param == "etcd":
        need_etcd()
    harness = BACKENDS[request.param](tempdir)
    yield harness
    if isinstance(harness, EtcdBackend):
        harness.close()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.open() as store:
        yield store


async def next_events(events: AsyncIterator[Event], count: int) -> list[Event]:
    with anyio.fail_after(5):
        return [await anext(events) for _ in range(count)]


async def put_concurrently(store: Store, keys: list[str]) -> None:
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(store.put, key, b"v")


# Keys and values ---------------------------------------------------------------------------


async def test_put_then_get_returns_the_value_with_its_revisions(store: Store) -> None:
    revision = await store.put("a", b"1")
    assert await store.get("a") == KeyValue("a", b"1", revision, revision, 1)
    assert store.revision == revision


async def test_get_of_a_missing_key_returns_none(store: Store) -> None:
    assert await store.get("missing") is None


async def test_put_again_keeps_create_revision_and_counts_versions(store: Store) -> None:
    first = await store.put("a", b"1")
    second = await store.put("a", b"2")
    assert await store.get("a") == KeyValue("a", b"2", first, second, 2)


async def test_range_returns_the_prefix_in_key_order(store: Store) -> None:
    for key in ["p/b", "p/a", "q/a", "p/c", "p"]:
        await store.put(key, key.encode())
    assert [kv.key for kv in await store.range("p/")] == ["p/a", "p/b", "p/c"]
    assert [kv.key for kv in await store.range("p/", limit=2)] == ["p/a", "p/b"]
    assert len(await store.range("")) == 5


async def test_range_limit_reports_that_more_keys_exist(store: Store) -> None:
    await put_concurrently(store, ["r/1", "r/2", "r/3"])
    result = await store.txn((), (Range("r/", 2), Range("r/", 3)))
    assert result.responses == (
        RangeResult((await store.range("r/"))[:2], more=True),
        RangeResult(await store.range("r/"), more=False),
    )


async def test_delete_removes_the_key_and_says_whether_it_existed(store: Store) -> None:
    await store.put("a", b"1")
    assert await store.delete("a") is True
    assert await store.get("a") is None
    assert await store.delete("a") is False


async def test_delete_range_removes_the_prefix_in_one_revision(store: Store) -> None:
    await put_concurrently(store, ["d/1", "d/2", "e/1"])
    before = store.revision
    result = await store.txn((), (DeleteRange("d/"),))
    assert result.revision == before + 1
    assert isinstance(response := result.responses[0], DeleteResult)
    assert [kv.key for kv in response.deleted] == ["d/1", "d/2"]
    assert [kv.key for kv in await store.range("")] == ["e/1"]


async def test_revision_advances_only_on_writes(store: Store) -> None:
    start = store.revision
    await store.get("a")
    await store.delete("absent")
    await store.txn((Compare("a", "version", ">", 0),), (Put("a", b"1"),))
    await store.grant(10)
    assert store.revision == start
    assert await store.put("a", b"1") == start + 1


async def test_recreated_key_gets_a_new_create_revision_and_version(store: Store) -> None:
    first = await store.put("a", b"1")
    await store.delete("a")
    again = await store.put("a", b"2")
    kv = await store.get("a")
    assert kv is not None
    assert (kv.create_revision, kv.version) == (again, 1)
    assert again > first


async def test_revisions_keep_increasing_across_reopen(backend: Backend) -> None:
    async with backend.open() as store:
        first = await store.put("a", b"1")
        await store.delete("a")
        deleted_at = store.revision
    async with backend.open() as store:
        assert store.revision == deleted_at
        again = await store.put("a", b"2")
        kv = await store.get("a")
    assert kv is not None
    assert kv.create_revision == again > deleted_at > first


# Transactions ------------------------------------------------------------------------------

TARGETS: dict[Target, Callable[[KeyValue], bytes | int]] = {
    "value": lambda kv: kv.value,
    "version": lambda kv: kv.version,
    "create": lambda kv: kv.create_revision,
    "mod": lambda kv: kv.mod_revision,
}
OPS: dict[CompareOp, Callable[[Any, Any], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}


def operands_around(actual: bytes | int) -> list[bytes | int]:
    if isinstance(actual, bytes):
        return [b"a", actual, b"c"]
    return [actual - 1, actual, actual + 1]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("target", TARGETS)
async def test_compare_and_set_on_each_target_and_op(
    store: Store, target: Target, op: CompareOp
) -> None:
    await store.put("other", b"o")
    await store.put("k", b"a")
    await store.put("k", b"b")
    kv = await store.get("k")
    assert kv is not None
    for operand in operands_around(TARGETS[target](kv)):
        kv = await store.get("k")
        assert kv is not None
        expected = OPS[op](TARGETS[target](kv), operand)
        result = await store.txn((Compare("k", target, op, operand),), (Put("k", b"b"),))
        assert result.succeeded is expected, (target, op, operand)
        assert (await store.get("k") != kv) is expected


async def test_failed_compare_runs_the_failure_branch(store: Store) -> None:
    await store.put("k", b"mine")
    result = await store.txn(
        (Compare("k", "value", "==", b"yours"),), (Put("k", b"taken"),), (Get("k"), Delete("k"))
    )
    assert not result.succeeded
    assert isinstance(read := result.responses[0], RangeResult)
    assert [kv.value for kv in read.kvs] == [b"mine"]
    assert await store.get("k") is None


async def test_absent_key_compares_as_zeros_and_never_on_value(store: Store) -> None:
    absent = (
        Compare("k", "create", "==", 0),
        Compare("k", "version", "==", 0),
        Compare("k", "mod", "<", 1),
    )
    assert (await store.txn(absent, (Put("k", b"1"),))).succeeded
    await store.delete("k")
    assert not (await store.txn((Compare("k", "value", "!=", b"x"),))).succeeded


async def test_txn_puts_share_one_revision(store: Store) -> None:
    old = await store.put("a", b"0")
    result = await store.txn((), (Put("a", b"1"), Put("b", b"2")))
    assert result.revision == old + 1
    assert result.responses == (PutResult(), PutResult())
    assert [kv.mod_revision for kv in await store.range("")] == [old + 1, old + 1]


async def test_concurrent_transactions_as_wide_as_the_store_takes_all_commit(
    store: Store,
) -> None:
    """Batched together (etcd's nested transactions), they must not exceed etcd's limit."""
    width = store.max_operations or 128

    async def wide(n: int) -> None:
        await store.txn((), [Put(f"wide/{n}/{k:03d}", b"v") for k in range(width - n % 2)])

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(wide, n)
    assert len(await store.range("wide/")) == sum(width - n % 2 for n in range(6))


async def test_txn_writing_a_key_twice_is_refused(store: Store) -> None:
    with pytest.raises(InvalidRequest):
        await store.txn((), (Put("a", b"1"), Delete("a")))


async def test_put_with_an_unknown_lease_fails_the_whole_txn(store: Store) -> None:
    before = store.revision
    with pytest.raises(Absent):
        await store.txn((), (Put("a", b"1"), Put("b", b"2", lease=987654321)))
    assert await store.range("") == ()
    assert store.revision == before


# Leases ------------------------------------------------------------------------------------


async def test_expired_lease_deletes_its_keys_with_delete_events(
    store: Store, backend: Backend
) -> None:
    lease, _ = await store.grant(backend.ttl)
    await store.put("l/a", b"1", lease)
    await store.put("l/b", b"2", lease)
    await store.put("l/kept", b"3")
    async with store.watch("l/") as events:
        expired = await next_events(events, 2)
    assert [(e.type, e.kv.key, e.prev_kv and e.prev_kv.lease) for e in expired] == [
        ("delete", "l/a", lease),
        ("delete", "l/b", lease),
    ]
    assert [kv.key for kv in await store.range("l/")] == ["l/kept"]
    assert await store.leases() == ()
    assert await store.keepalive(lease) == 0


async def test_keepalive_extends_the_lease(store: Store, backend: Backend) -> None:
    lease, ttl = await store.grant(backend.ttl)
    await store.put("a", b"1", lease)
    for _ in range(3):
        await anyio.sleep(ttl * 0.6)
        assert await store.keepalive(lease) == ttl
    assert await store.get("a") is not None
    assert [held.id for held in await store.leases()] == [lease]


async def test_keepalive_of_an_unknown_lease_returns_zero(store: Store) -> None:
    assert await store.keepalive(987654321) == 0


async def test_revoke_deletes_the_lease_keys_at_once(store: Store) -> None:
    lease, _ = await store.grant(60)
    await store.put("a", b"1", lease)
    async with store.watch("") as events:
        await store.revoke(lease)
        (event,) = await next_events(events, 1)
    assert (event.type, event.kv.key) == ("delete", "a")
    assert await store.get("a") is None
    assert await store.keepalive(lease) == 0


async def test_revoking_an_unknown_lease_is_absent(store: Store) -> None:
    with pytest.raises(Absent):
        await store.revoke(987654321)


async def test_leases_get_their_full_ttl_again_after_reopen(backend: Backend) -> None:
    async with backend.open() as store:
        lease, ttl = await store.grant(backend.ttl)
        await store.put("a", b"1", lease)
        await anyio.sleep(ttl * 0.6)
    async with backend.open() as store:
        (held,) = await store.leases()
        assert held.id == lease
        assert held.remaining > ttl * 0.9
        assert await store.get("a") is not None


async def test_lease_ids_are_never_reused(backend: Backend) -> None:
    async with backend.open() as store:
        first, _ = await store.grant(60)
        await store.revoke(first)
    async with backend.open() as store:
        second, _ = await store.grant(60)
        third, _ = await store.grant(60)
    assert len({first, second, third}) == 3


# Watches: the history seam -----------------------------------------------------------------
# Only tests and benchmarks watch the store today; the etcd backend (issue 14) and the task
# event log (issue 15) are built on it (see the Store docstring). Written against Store and
# Backend only, so that every backend runs them.


async def test_watch_reports_puts_and_deletes_with_prev_kv(store: Store) -> None:
    async with store.watch("w/") as events:
        await store.put("w/a", b"1")
        await store.put("elsewhere", b"x")
        await store.put("w/a", b"2")
        await store.delete("w/a")
        seen = await next_events(events, 3)
    assert [(e.type, e.kv.value, e.prev_kv and e.prev_kv.value) for e in seen] == [
        ("put", b"1", None),
        ("put", b"2", b"1"),
        ("delete", b"", b"2"),
    ]
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})


async def test_watch_resumes_from_a_past_revision(store: Store) -> None:
    await store.put("w/a", b"1")
    resume_at = await store.put("w/b", b"2")
    await store.put("w/c", b"3")
    async with store.watch("w/", start_revision=resume_at) as events:
        await store.put("w/d", b"4")
        seen = await next_events(events, 3)
    assert [e.kv.key for e in seen] == ["w/b", "w/c", "w/d"]


async def test_watch_from_a_compacted_revision_is_refused(store: Store, backend: Backend) -> None:
    first = await store.put("w/first", b"1")
    await backend.compact(store, first)
    with pytest.raises(Compacted):
        async with store.watch("w/", start_revision=first) as events:
            await anext(events)


async def test_after_compacted_a_read_then_a_watch_from_its_revision_misses_nothing(
    store: Store, backend: Backend
) -> None:
    """The recovery the Compacted error prescribes (a lease watcher's, after a restart)."""
    first = await store.put("w/a", b"1")
    await backend.compact(store, first)
    await store.put("w/b", b"2")
    read = await store.txn((), (Range("w/"),))
    (listed,) = read.responses
    assert isinstance(listed, RangeResult)
    await store.put("w/c", b"3")  # after the read, before the watch: must not be missed
    async with store.watch("w/", start_revision=read.revision + 1) as events:
        await store.delete("w/a")
        seen = await next_events(events, 2)
    assert [kv.key for kv in listed.kvs] == ["w/a", "w/b"]
    assert [(e.type, e.kv.key) for e in seen] == [("put", "w/c"), ("delete", "w/a")]


async def test_slow_watcher_loses_no_event(store: Store) -> None:
    keys = [f"s/{n:04}" for n in range(1500)]
    async with store.watch("s/") as events:
        await put_concurrently(store, keys)
        seen = await next_events(events, len(keys))
    assert sorted(e.kv.key for e in seen) == keys
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)


# Group commit ------------------------------------------------------------------------------


async def test_concurrent_puts_share_commits(store: Store) -> None:
    before = store.statistics()
    await put_concurrently(store, [f"g/{n}" for n in range(100)])
    after = store.statistics()
    assert after.transactions - before.transactions == 100
    assert after.commits - before.commits <= 10


async def test_concurrent_writes_of_one_key_all_land_in_order(store: Store) -> None:
    """Transactions on one key never share a commit they could not both be in."""
    await put_concurrently(store, ["same"] * 50)
    kv = await store.get("same")
    assert kv is not None and kv.version == 50


async def test_a_failing_transaction_fails_alone_among_concurrent_ones(store: Store) -> None:
    results: dict[str, object] = {}

    async def put(key: str, lease: int) -> None:
        try:
            results[key] = await store.put(key, b"v", lease)
        except Absent as exc:
            results[key] = exc

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(put, f"f/{n}", 987654321 if n == 7 else 0)
    assert isinstance(results.pop("f/7"), Absent)
    assert all(isinstance(revision, int) for revision in results.values())
    assert len(await store.range("f/")) == 19


async def test_a_create_rolled_back_with_a_failed_neighbour_is_made_once(store: Store) -> None:
    created: list[bool] = []

    async def create(key: str, lease: int) -> None:
        with contextlib.suppress(Absent):
            absent = Compare(key, "create", "==", 0)
            created.append((await store.txn((absent,), (Put(key, b"v", lease),))).succeeded)

    async with anyio.create_task_group() as tg:  # one batch, whose first try fails
        tg.start_soon(create, "r/kept", 0)
        tg.start_soon(create, "r/lost", 987654321)
    kept = await store.get("r/kept")
    assert created == [True]
    assert kept is not None and (kept.version, kept.create_revision) == (1, kept.mod_revision)
    assert await store.get("r/lost") is None


async def test_a_watch_resumed_beside_a_write_sees_it(store: Store) -> None:
    """The watch's read of the history and the write go in one batch, the write first."""
    start = await store.put("h/a", b"1") + 1
    seen: list[Event] = []

    async def watch() -> None:
        async with store.watch("h/", start_revision=start) as events:
            seen.extend(await next_events(events, 1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.put, "h/b", b"2")
        tg.start_soon(watch)
    assert [(e.kv.key, e.kv.mod_revision) for e in seen] == [("h/b", start)]


# SQLite only -------------------------------------------------------------------------------


async def test_overdue_lease_is_lost_at_keepalive_and_expires_at_once(tempdir: str) -> None:
    now = [1000.0]
    async with SQLiteStore.open(os.path.join(tempdir, "store.db"), clock=lambda: now[0]) as store:
        lease, _ = await store.grant(30)
        await store.put("a", b"1", lease)
        async with store.watch("a") as events:
            now[0] += 31
            assert await store.keepalive(lease) == 0
            (event,) = await next_events(events, 1)
    assert event.type == "delete"


async def test_reopen_restarts_every_lease_from_its_full_ttl(tempdir: str) -> None:
    now = [1000.0]
    path = os.path.join(tempdir, "store.db")
    async with SQLiteStore.open(path, clock=lambda: now[0]) as store:
        lease, _ = await store.grant(30)
        now[0] += 29
    async with SQLiteStore.open(path, clock=lambda: now[0]) as store:
        assert [(held.id, held.remaining) for held in await store.leases()] == [(lease, 30)]


WRITER = """
import sys

import anyio

from fleetd.store.sqlite import SQLiteStore


async def write(store, worker):
    for n in range(1_000_000):
        key = f"k/{worker}/{n}"
        await store.put(key, b"x" * 100)
        print(key, flush=True)


async def main():
    async with SQLiteStore.open(sys.argv[1]) as store:
        async with anyio.create_task_group() as tg:
            for worker in range(16):
                tg.start_soon(write, store, worker)


anyio.run(main, backend_options={"use_uvloop": True})
"""


async def read_acknowledged_until_killed(process: Process, kill_after: int) -> list[str]:
    assert process.stdout is not None
    output = ""
    async for chunk in TextReceiveStream(process.stdout):
        output += chunk
        if output.count("\n") >= kill_after and process.returncode is None:
            process.send_signal(signal.SIGKILL)
    return output.split("\n")[:-1]  # the last line may be cut short


async def test_acknowledged_writes_survive_sigkill(tempdir: str) -> None:
    path = os.path.join(tempdir, "store.db")
    process = await anyio.open_process([sys.executable, "-c", WRITER, path], stderr=None)
    try:
        with anyio.fail_after(20):
            acknowledged = await read_acknowledged_until_killed(process, kill_after=2000)
            assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            with anyio.CancelScope(shield=True):
                await process.wait()
        await process.aclose()
    async with SQLiteStore.open(path) as store:
        stored = {kv.key for kv in await store.range("k/")}
    assert len(acknowledged) >= 2000
    assert set(acknowledged) <= stored


async def test_full_disk_writes_nothing_and_the_store_recovers(tempdir: str) -> None:
    big = b"x" * (1 << 20)
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        await store.put("kept", b"1")
        await store.set_max_pages(await store.set_max_pages(1) + 8)
        before = store.revision
        outcomes: dict[str, object] = {}

        async def attempt(name: str, request: Any) -> None:
            try:
                outcomes[name] = await request
            except StoreFull as error:
                outcomes[name] = error

        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, "big", store.txn((), (Put("half", b"h"), Put("big", big))))
            tg.start_soon(attempt, "small", store.put("small", b"s"))
            tg.start_soon(attempt, "read", store.get("kept"))
        assert isinstance(outcomes["big"], StoreFull)
        assert outcomes["small"] == before + 1
        assert isinstance(outcomes["read"], KeyValue)
        assert await store.get("half") is None
        assert store.revision == before + 1

        await store.set_max_pages(None)
        await store.txn((), (Put("half", b"h"), Put("big", big)))
        assert [kv.key for kv in await store.range("")] == ["big", "half", "kept", "small"]


async def test_database_from_a_newer_fleetd_is_refused(tempdir: str) -> None:
    path = os.path.join(tempdir, "store.db")
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA user_version = 999")
    connection.close()
    with pytest.raises(Incompatible, match="newer"):
        async with SQLiteStore.open(path):
            pass


async def test_closed_store_refuses_requests(tempdir: str) -> None:
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        await store.put("a", b"1")
    with pytest.raises(anyio.ClosedResourceError):
        await store.get("a")


async def test_a_bug_in_the_database_thread_fails_its_batch_and_ends_the_store(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: object, jobs: object) -> None:
        raise RuntimeError("a bug")

    store = SQLiteStore(os.path.join(tempdir, "store.db"))
    outcomes: list[BaseException] = []
    with pytest.raises(ExceptionGroup) as ended:
        async with anyio.create_task_group() as tg:
            await tg.start(store.serve)
            monkeypatch.setattr("fleetd.store.sqlite._Database.run_batch", broken)
            try:
                await store.put("a", b"1")
            except Internal as exc:
                outcomes.append(exc)
    assert [type(o) for o in outcomes] == [Internal]
    assert ended.group_contains(RuntimeError, match="a bug")


async def test_a_caller_cancelled_while_its_write_commits_leaves_the_others_answered(
    tempdir: str,
) -> None:
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        with anyio.move_on_after(0):
            await store.put("cancelled", b"1")
        await put_concurrently(store, [f"k/{n}" for n in range(20)])
        assert len(await store.range("k/")) == 20


@asynccontextmanager
async def watermarked(tempdir: str) -> AsyncIterator[tuple[SQLiteStore, Watermark, PrivateDir]]:
    """A SQLite store serving with its watermark, "wm" in `tempdir`; it stops on exit."""
    with PrivateDir.open(tempdir) as state:
        watermark = Watermark(state, "wm")
        store = SQLiteStore(state.join("store.db"), watermark=watermark)
        async with anyio.create_task_group() as tg:
            await tg.start(store.serve)
            yield store, watermark, state
            tg.cancel_scope.cancel()


async def test_every_answered_commit_is_within_the_watermark_and_notes_its_floor(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite, "RESERVED", 3)
    async with watermarked(tempdir) as (store, _, state):
        for n in range(10):
            revision = await store.put("a", b"%d" % n)
            mark = Watermark(state, "wm").read()
            assert mark is not None
            assert mark.floor == revision - 1
            assert revision <= mark.revision <= revision + 3


async def test_an_idle_store_flushes_its_notes_within_a_second(tempdir: str) -> None:
    async with watermarked(tempdir) as (store, watermark, _):
        await store.put("a", b"1")  # past the watermark: advanced
        await store.put("a", b"2")  # within it: noted
        assert watermark.noted_at is not None
        with anyio.fail_after(NOTES_FLUSHED_WITHIN + 2):
            # noted_at is cleared by the database thread: polled, as no event says so
            while watermark.noted_at is not None:  # noqa: ASYNC110
                await anyio.sleep(0.02)


async def test_a_store_that_stops_flushes_its_notes(tempdir: str) -> None:
    async with watermarked(tempdir) as (store, watermark, _):
        await store.put("a", b"1")
        await store.put("a", b"2")
        assert watermark.noted_at is not None
    assert watermark.noted_at is None


async def test_a_watermark_that_fails_leaves_the_batch_committed_once(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Watermark, floor: int, revision: int) -> None:
        raise RuntimeError("a bug in the watermark")

    with PrivateDir.open(tempdir) as state:
        store = SQLiteStore(state.join("store.db"), watermark=Watermark(state, "wm"))
        async with anyio.create_task_group() as tg:
            await tg.start(store.serve)
            monkeypatch.setattr(Watermark, "advance", broken)
            first = await store.put("a", b"1")
            second = await store.put("a", b"2")
            assert second == first + 1
            kv = await store.get("a")
            assert kv is not None and (kv.value, kv.version) == (b"2", 2)
            tg.cancel_scope.cancel()
