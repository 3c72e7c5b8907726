"""The etcd store under faults, against real etcd processes: a member stopped, frozen or
restarted under the store; callers giving up mid-call; a three-member cluster losing its
leader, then its quorum. And the addresses `--store etcd://…` takes.

Each test starts its own etcd (tests/etcd_server.py) with test-only raft timings, and needs it
(need_etcd: skipped without etcd, failed instead under FLEET_REQUIRE_ETCD=1, as in CI).
"""

import random
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, TypeVar

import anyio
import pytest
from anyio.abc import TaskStatus

from fleetd.store import Event, Put
from protocol.errors import InvalidRequest, StoreUnavailable
from tests.etcd_server import GRPC_DRAIN, EtcdCluster, EtcdServer, need_etcd

if TYPE_CHECKING:
    from fleetd.store.etcd import EtcdStore

T = TypeVar("T")
FAST = 1.0
"""Seconds within which a store must say it is unavailable when etcd refuses connections
(well under CALL_TIMEOUT) and serve again once etcd is back."""


@pytest.fixture
def server(tempdir: str) -> Iterator[EtcdServer]:
    need_etcd()
    with EtcdServer(tempdir) as server:
        yield server


@pytest.fixture
def cluster(tempdir: str) -> Iterator[EtcdCluster]:
    need_etcd()
    with EtcdCluster(tempdir) as cluster:
        yield cluster


@pytest.fixture
def call_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """A shorter CALL_TIMEOUT, for the tests that wait it out."""
    from fleetd.store import etcd

    monkeypatch.setattr(etcd, "CALL_TIMEOUT", 1.0)
    return etcd.CALL_TIMEOUT


@asynccontextmanager
async def open_store(url: str) -> "AsyncIterator[EtcdStore]":
    """The store on `url`, and after closing it a moment for gRPC to deliver the completions
    of the calls the close cancelled: gRPC hands each to the event loop its call started on,
    and one that arrives after the test's loop closed fails the next test ("Event loop is
    closed", grpc/grpc#25364). fleetd runs one loop for its life, so it never meets this."""
    from fleetd.store.etcd import EtcdStore

    try:
        async with EtcdStore.open(url) as store:
            yield store
    finally:
        await anyio.sleep(GRPC_DRAIN)


async def served(call: Callable[[], Awaitable[T]], timeout: float = 5.0) -> T:
    """`call`'s answer once the store serves again: StoreUnavailable until then."""
    with anyio.fail_after(timeout):
        while True:
            try:
                return await call()
            except StoreUnavailable:
                await anyio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (state the store's tasks change)
            await anyio.sleep(0.01)


async def in_thread(step: Callable[[], object]) -> None:
    """A blocking step of the etcd harness, off the event loop that gRPC runs on."""
    await anyio.to_thread.run_sync(step)


# One member stopped, frozen, restarted ------------------------------------------------------


async def test_a_stopped_etcd_is_unavailable_at_once_and_the_same_store_serves_when_back(
    server: EtcdServer,
) -> None:
    async with open_store(server.url) as store:
        await store.put("k", b"1")
        await in_thread(server.stop)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get("k"),
            lambda: store.put("k", b"2"),
            lambda: store.grant(5),
            store.leases,
        ]
        for call in calls:
            with anyio.fail_after(FAST), pytest.raises(StoreUnavailable) as refused:
                await call()
            assert "etcd at etcd://127.0.0.1:" in str(refused.value)
        await in_thread(server.start)
        kv = await served(lambda: store.get("k"), timeout=2 * FAST)
        assert kv is not None and kv.value == b"1"


async def test_a_frozen_etcd_is_unavailable_after_call_timeout_not_a_hang(
    server: EtcdServer, call_timeout: float
) -> None:
    async with open_store(server.url) as store:
        lease, _ = await store.grant(5)
        server.pause()
        for call in (lambda: store.put("k", b"1"), lambda: store.keepalive(lease)):
            started = anyio.current_time()
            with pytest.raises(StoreUnavailable, match="etcd"):
                await call()
            assert call_timeout <= anyio.current_time() - started < call_timeout + 0.5
        server.resume()
        assert await served(lambda: store.keepalive(lease)) > 0
        await store.put("k", b"2")


async def test_a_watch_across_a_restart_resumes_after_its_last_event(server: EtcdServer) -> None:
    """Nothing written before the restart and not yet read is lost, nor anything written
    after it, and nothing already read comes again."""
    async with open_store(server.url) as store, store.watch("w/") as events:
        await store.put("w/1", b"")
        assert [e.kv.key for e in await next_events(events, 1)] == ["w/1"]
        before = await store.put("w/2", b"")
        await in_thread(server.stop)
        await in_thread(server.start)
        after = await served(lambda: store.put("w/3", b""))
        seen = await next_events(events, 2)
    assert [(e.kv.key, e.revision) for e in seen] == [("w/2", before), ("w/3", after)]


async def next_events(events: AsyncIterator[Event], count: int) -> list[Event]:
    with anyio.fail_after(10):
        return [await anext(events) for _ in range(count)]


# Callers giving up mid-call -----------------------------------------------------------------

CALLERS = 20
CALLS_EACH = 10
"""200 calls given up on in all: gRPC's stray CancelledError (../shared/ETCD-NOTES.md) came
hundreds of times in 3,000 before the store ran each call as a task of its own."""


@dataclass
class GivingUp:
    """Callers that each make calls under short, random timeouts, and what became of them."""

    store: "EtcdStore"
    lease: int
    outcomes: dict[str, int] = field(default_factory=dict)
    slowest: float = 0.0

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:  # what a stray CancelledError would end
            for caller in range(CALLERS):
                tg.start_soon(self.caller, caller)

    async def caller(self, caller: int) -> None:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: self.store.get("k"),
            lambda: self.store.put(f"k/{caller}", b"v"),
            lambda: self.store.txn((), (Put("t", b"v"),)),
            lambda: self.store.keepalive(self.lease),
        ]
        for n in range(CALLS_EACH):
            started = anyio.current_time()
            with anyio.move_on_after(random.uniform(0, 0.05)) as scope:
                try:
                    await calls[(caller + n) % len(calls)]()
                    outcome = "answered"
                except StoreUnavailable:
                    outcome = "unavailable"
            if scope.cancelled_caught:
                outcome = "gave up"
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
            self.slowest = max(self.slowest, anyio.current_time() - started)


async def test_callers_giving_up_on_a_frozen_etcd_leave_at_once_and_their_group_stands(
    server: EtcdServer,
) -> None:
    async with open_store(server.url) as store:
        lease, _ = await store.grant(30)
        server.pause()
        giving_up = GivingUp(store, lease)
        await giving_up.run()
        assert giving_up.outcomes == {"gave up": CALLERS * CALLS_EACH}
        assert giving_up.slowest < 0.5
        server.resume()
        assert await served(lambda: store.keepalive(lease)) > 0
        await store.put("k", b"after")


async def test_callers_giving_up_while_etcd_dies_under_their_calls_leave_cleanly(
    server: EtcdServer,
) -> None:
    """etcd frozen with calls in flight, then killed under them, then refusing connections:
    each call is answered, unavailable or given up on, and nothing else."""
    async with open_store(server.url) as store:
        lease, _ = await store.grant(30)
        server.pause()
        async with anyio.create_task_group() as tg:
            giving_up = GivingUp(store, lease)
            tg.start_soon(giving_up.run)
            await anyio.sleep(0.1)
            await in_thread(lambda: server.stop(signal.SIGKILL))
        assert sum(giving_up.outcomes.values()) == CALLERS * CALLS_EACH
        assert set(giving_up.outcomes) <= {"answered", "unavailable", "gave up"}
        assert giving_up.outcomes.get("gave up") and giving_up.outcomes.get("unavailable")
        assert giving_up.slowest < 0.5
        await in_thread(server.start)
        assert await served(lambda: store.keepalive(lease)) > 0


# A three-member cluster ---------------------------------------------------------------------

WRITERS = 4


@dataclass
class Writers:
    """Concurrent writers, each putting a new key per try and keeping what etcd acknowledged:
    key -> revision, and each writer's revisions in order."""

    store: "EtcdStore"
    acked: dict[str, int] = field(default_factory=dict)
    refused: list[StoreUnavailable] = field(default_factory=list)
    longest_try: float = 0.0
    backwards: list[tuple[int, int]] = field(default_factory=list)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for writer in range(WRITERS):
                tg.start_soon(self.writer, writer)
            tg.start_soon(self.watch_revision)
            task_status.started()

    async def writer(self, writer: int) -> None:
        last = 0
        for n in count():
            started = anyio.current_time()
            try:
                revision = await self.store.put(f"w/{writer}/{n}", f"{writer}/{n}".encode())
            except StoreUnavailable as exc:
                self.refused.append(exc)
                await anyio.sleep(0.01)
                continue
            finally:
                self.longest_try = max(self.longest_try, anyio.current_time() - started)
            if revision <= last:
                self.backwards.append((last, revision))
            self.acked[f"w/{writer}/{n}"] = last = revision

    async def watch_revision(self) -> None:
        """The store's own revision, sampled: it must never go back either."""
        last = 0
        while True:
            if self.store.revision < last:
                self.backwards.append((last, self.store.revision))
            last = self.store.revision
            await anyio.sleep(0.005)

    async def more_acked(self, count: int, timeout: float = 10.0) -> None:
        target = len(self.acked) + count
        await until(lambda: len(self.acked) >= target, timeout)

    async def all_acked_are_stored(self) -> bool:
        stored = {kv.key: kv for kv in await served(lambda: self.store.range("w/"))}
        return all(
            key in stored
            and stored[key].mod_revision == revision
            and stored[key].value == key.removeprefix("w/").encode()
            for key, revision in self.acked.items()
        )


async def test_writes_go_on_through_a_leader_kill_and_none_acknowledged_is_lost(
    cluster: EtcdCluster, call_timeout: float
) -> None:
    """A write a follower forwarded to the dead leader is lost by etcd, which answers it only
    at its request timeout (5 s and two elections): the store gives up on it at CALL_TIMEOUT,
    and the writer's next try goes through."""
    leader = cluster.leader()
    async with open_store(cluster.url_starting_at(leader)) as store:
        assert (await store.status()).header.member_id == int(leader.status()["member_id"])
        writers = Writers(store)
        async with anyio.create_task_group() as tg:
            await tg.start(writers.run)
            await writers.more_acked(100)
            await in_thread(lambda: leader.stop(signal.SIGKILL))
            await writers.more_acked(300)
            tg.cancel_scope.cancel()
        moved_to = (await store.status()).header.member_id
        assert moved_to in {int(m.status()["member_id"]) for m in cluster.running()}
        assert writers.longest_try < call_timeout + 0.5
        assert not writers.backwards
        assert await writers.all_acked_are_stored()


async def test_without_quorum_writes_are_unavailable_and_resume_with_it(
    cluster: EtcdCluster, call_timeout: float
) -> None:
    leader = cluster.leader()
    async with open_store(cluster.url_starting_at(leader)) as store:
        writers = Writers(store)
        async with anyio.create_task_group() as tg:
            await tg.start(writers.run)
            await writers.more_acked(50)
            second = next(m for m in cluster.running() if m is not leader)
            await in_thread(lambda: leader.stop(signal.SIGKILL))
            await in_thread(lambda: second.stop(signal.SIGKILL))
            await until(lambda: any("no leader" in str(exc) for exc in writers.refused))
            await in_thread(second.start)
            await writers.more_acked(50)
            tg.cancel_scope.cancel()
        assert writers.longest_try < call_timeout + 0.5
        assert not writers.backwards
        assert await writers.all_acked_are_stored()


async def test_a_lease_kept_alive_through_the_store_survives_a_leader_kill(
    cluster: EtcdCluster,
) -> None:
    """Its keepalive stream breaks with the member it ran to, and opens again on another."""
    leader = cluster.leader()
    async with open_store(cluster.url_starting_at(leader)) as store:
        lease, ttl = await store.grant(1)
        await store.put("held", b"", lease)

        async def keep_alive_for(seconds: float) -> None:
            with anyio.move_on_after(seconds):
                while True:
                    assert await served(lambda: store.keepalive(lease), timeout=ttl) > 0
                    await anyio.sleep(ttl / 5)

        await keep_alive_for(ttl)
        await in_thread(lambda: leader.stop(signal.SIGKILL))
        await keep_alive_for(3 * ttl)
        held = await store.get("held")
        assert held is not None and held.lease == lease


# Addresses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "hosts", "namespace"),
    [
        ("etcd://db:2380", [("db", 2380)], "fleet/"),
        ("etcd://db", [("db", 2379)], "fleet/"),
        ("etcd://[::1]:2380", [("::1", 2380)], "fleet/"),
        ("etcd://[fe80::1]", [("fe80::1", 2379)], "fleet/"),
        ("etcd://a:1,b,[::1]:3", [("a", 1), ("b", 2379), ("::1", 3)], "fleet/"),
        ("etcd://db:2379/", [("db", 2379)], "fleet/"),
        ("etcd://db:2379/staging", [("db", 2379)], "staging/"),
        ("etcd://db:2379/teams/ops/", [("db", 2379)], "teams/ops/"),
    ],
)
def test_an_etcd_address_names_its_hosts_and_namespace(
    url: str, hosts: list[tuple[str, int]], namespace: str
) -> None:
    need_etcd()
    from fleetd.store.etcd import Endpoints

    endpoints = Endpoints.parse(url)
    assert (list(endpoints.hosts), endpoints.namespace) == (hosts, namespace)
    assert Endpoints.parse(str(endpoints)) == endpoints


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://db:2379", "is not an etcd address"),
        ("db:2379", "is not an etcd address"),
        ("etcd:///fleet", "is not an etcd address"),
        ("etcd://db:0", "'db:0' is not HOST:PORT"),
        ("etcd://db:65536", "is not HOST:PORT"),
        ("etcd://db:port", "is not HOST:PORT"),
        ("etcd://db:", "is not HOST:PORT"),
        ("etcd://db:-1", "is not HOST:PORT"),
        ("etcd://db:１２", "is not HOST:PORT"),  # noqa: RUF001 (digits int() would take)
        ("etcd://db:1:2", "is not HOST:PORT"),
        ("etcd://a:1,,b:2", "'' is not HOST:PORT"),
        ("etcd://[::1]x", "is not HOST:PORT"),
        ("etcd://[::1", "is not an etcd address"),
        ("etcd://[db]:2379", "is not an etcd address"),
        ("etcd://db:2379?timeout=1", "only hosts, ports and a namespace"),
        ("etcd://db:2379#x", "only hosts, ports and a namespace"),
    ],
)
def test_a_bad_etcd_address_is_refused_saying_why(url: str, says: str) -> None:
    need_etcd()
    from fleetd.store.etcd import Endpoints

    with pytest.raises(InvalidRequest) as refused:
        Endpoints.parse(url)
    assert says in str(refused.value)
    assert repr(url) in str(refused.value)


@pytest.mark.parametrize("url", ["etcd://user@db:2379", "etcd://user:secret@db:2379"])
def test_an_etcd_address_with_a_user_is_refused_without_repeating_it(url: str) -> None:
    need_etcd()
    from fleetd.store.etcd import Endpoints

    with pytest.raises(InvalidRequest, match="takes no user or password") as refused:
        Endpoints.parse(url)
    assert "user" not in str(refused.value).replace("no user", "")
    assert "secret" not in str(refused.value)


def test_endpoints_of_both_address_families_are_refused_not_dropped() -> None:
    need_etcd()
    from fleetd.store.etcd import Endpoints

    with pytest.raises(StoreUnavailable, match="mixes IPv4 and IPv6"):
        Endpoints.parse("etcd://127.0.0.1:2379,[::1]:2379").target()
    assert Endpoints.parse("etcd://localhost:2379").target().startswith("ipv4:127.0.0.1")


def test_a_test_etcd_whose_port_was_taken_meanwhile_starts_on_another(tempdir: str) -> None:
    """tests/etcd_server.py's own guard: free_port finds a port free only a moment before
    etcd binds it, and a parallel test's process may take it in between."""
    need_etcd()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = EtcdServer(tempdir)
        server.client_port = taken.getsockname()[1]
        with server:
            assert server.client_port != taken.getsockname()[1]
            assert server.healthy()
