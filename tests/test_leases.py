"""Leases: the pure decisions with an explicit clock, then fleetd's lease manager over its
control socket, with real holder processes for STONITH."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import msgspec
import pytest

from fleetctl import Client, SyncClient
from fleetd.core import identity as proc
from fleetd.leases import (
    Entry,
    EventLog,
    LeaseTable,
    StoredLease,
    Verdict,
    decide_acquire,
    decide_heartbeat,
    decide_release,
)
from protocol.errors import Compacted, InvalidRequest
from protocol.leases import Identity, LeaseInfo
from protocol.outcomes import Outcome
from tests.processes import Fleetd

ME = Identity(host="h", boot_id="b", pid=1, start_time=1)


def held(name: str = "n", owner: str = "a", deadline: float = 10.0, ttl: float = 5.0) -> Entry:
    record = StoredLease(owner=owner, identity=ME, ttl=ttl, state="held", token=7)
    return Entry(name, record, mod_revision=7, deadline=deadline)


def alive(_: Identity) -> bool:
    return True


def dead(_: Identity) -> bool:
    return False


# Pure decisions ------------------------------------------------------------------------------


def test_free_name_is_granted() -> None:
    assert decide_acquire(None, "a", 0.0, alive).verdict is Verdict.GRANT


def test_live_lease_of_another_owner_is_contested() -> None:
    assert decide_acquire(held(), "b", 5.0, alive).verdict is Verdict.CONTEST


def test_live_lease_of_the_same_owner_is_renewed() -> None:
    assert decide_acquire(held(), "a", 5.0, alive).verdict is Verdict.RENEW


def test_expired_lease_is_taken_over_naming_the_stale_holder() -> None:
    entry = held(deadline=10.0)
    decision = decide_acquire(entry, "b", 10.0, alive)
    assert (decision.verdict, decision.stale, decision.reason) == (Verdict.GRANT, entry, "expired")


def test_holder_of_an_expired_record_stays_stale_but_one_that_released_does_not() -> None:
    record = held().record
    expired = Entry("n", msgspec.structs.replace(record, state="expired"), 8)
    released = Entry("n", msgspec.structs.replace(record, state="released"), 8)
    assert decide_acquire(expired, "b", 0.0, alive).stale is expired
    assert decide_acquire(released, "b", 0.0, alive).stale is None


def test_lease_whose_holder_is_gone_is_taken_over_before_its_deadline() -> None:
    decision = decide_acquire(held(deadline=10.0), "b", 1.0, dead)
    assert (decision.verdict, decision.reason) == (Verdict.GRANT, "holder_gone")


def test_heartbeat_past_the_deadline_fails_even_before_anyone_takes_over() -> None:
    assert decide_heartbeat(held(deadline=10.0), "a", 0, 9.99)
    assert not decide_heartbeat(held(deadline=10.0), "a", 0, 10.0)


def test_heartbeat_with_another_grants_token_fails() -> None:
    assert decide_heartbeat(held(), "a", 7, 0.0)
    assert not decide_heartbeat(held(), "a", 6, 0.0)


@pytest.mark.parametrize(
    ("entry", "owner", "outcome"),
    [
        (None, "a", Outcome.ABSENT),
        (held(), "b", Outcome.NOT_OWNED),
        (held(), "a", Outcome.RELEASED),
        (held(deadline=0.5), "a", Outcome.ALREADY_RELEASED),
    ],
)
def test_release_outcomes(entry: Entry | None, owner: str, outcome: Outcome) -> None:
    assert decide_release(entry, owner, 0, 1.0) is outcome


def test_timer_heap_wakes_once_per_expiry_not_once_per_heartbeat() -> None:
    table = LeaseTable()
    entry = held(deadline=1.0, ttl=1.0)
    table.install(entry)
    for now in (0.3, 0.6, 0.9):
        table.renew(entry, now)
    assert table.next_deadline() == 1.0  # heartbeats did not touch the heap
    assert table.pop_expired(1.0) == []  # came up early: back in at its real deadline
    assert table.next_deadline() == pytest.approx(1.9)
    [(expired, deadline)] = table.pop_expired(2.0)
    assert (expired.record.state, expired.dirty, deadline) == ("expired", True, pytest.approx(1.9))
    assert table.next_deadline() is None


async def test_event_log_refuses_a_cursor_older_than_it_keeps() -> None:
    events = EventLog(capacity=2)
    lease = LeaseInfo(name="n", owner="a", token=1, ttl=1.0, state="held", identity=ME)
    for _ in range(3):
        events.append("acquired", lease)
    assert [e.seq for e in events.since(1, "")[0]] == [2, 3]
    with pytest.raises(Compacted):
        events.since(0, "")


# Identity and fencing of real processes ------------------------------------------------------


@contextmanager
def sleeper(*, ignore_term: bool = False) -> Iterator[subprocess.Popen[bytes]]:
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\ntime.sleep(60)\n"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) as process:
        try:
            assert process.stdout is not None and process.stdout.readline() == b"ready\n"
            yield process
        finally:
            process.kill()


def test_identity_is_read_from_proc() -> None:
    me = proc.identify(os.getpid())
    with open(f"/proc/{os.getpid()}/stat") as f:
        assert me.start_time == int(f.read().rsplit(")", 1)[1].split()[19])
    with open(proc.BOOT_ID_PATH) as f:
        assert me.boot_id == f.read().strip()
    assert proc.is_alive(me)


async def test_fence_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    with sleeper(ignore_term=True) as process:
        outcome = await proc.fence(proc.identify(process.pid), os.getuid(), grace=0.2)
        assert outcome == "killed"
        assert process.wait(5) == -signal.SIGKILL


async def test_fence_leaves_a_process_whose_start_time_differs_alone() -> None:
    with sleeper() as process:
        real = proc.identify(process.pid)
        recycled = Identity(
            host=real.host, boot_id=real.boot_id, pid=real.pid, start_time=real.start_time + 1
        )
        assert await proc.fence(recycled, os.getuid(), grace=0.2) == "pid_reused"
        assert process.poll() is None


# The lease manager in fleetd -----------------------------------------------------------------

HOLDER = """
import sys, time
from fleetctl import SyncClient
with SyncClient() as client:
    result = client.lease_acquire(sys.argv[1], sys.argv[2], float(sys.argv[3]))
    print(result.outcome, result.lease.token, flush=True)
    if sys.argv[4] == "stay":
        time.sleep(60)
"""


def start_holder(
    fleetd: Fleetd, name: str, owner: str, ttl: float, *, stay: bool = True
) -> tuple[subprocess.Popen[bytes], int]:
    """A process holding a lease on its own connection (bound to itself); its token."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, owner, str(ttl), "stay" if stay else "exit"],
        env=fleetd.env,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    with process.stdout:
        outcome, token = process.stdout.readline().split()
    assert outcome == b"acquired"
    return process, int(token)


async def test_lease_lifecycle_outcomes(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client:
        first = await client.lease_acquire("job", "a", 5)
        assert first.outcome is Outcome.ACQUIRED and first.lease is not None
        assert (await client.lease_acquire("job", "a", 5)).outcome is Outcome.ALREADY_ACQUIRED
        assert (await client.lease_acquire("job", "b", 5)).outcome is Outcome.CONTESTED
        assert (await client.lease_heartbeat("job", "a")).outcome is Outcome.RENEWED
        assert (await client.lease_heartbeat("job", "b")).outcome is Outcome.NOT_OWNED
        assert (await client.lease_release("job", "b")).outcome is Outcome.NOT_OWNED
        assert (await client.lease_release("job", "a")).outcome is Outcome.RELEASED
        assert (await client.lease_release("job", "a")).outcome is Outcome.ALREADY_RELEASED
        assert (await client.lease_release("other", "a")).outcome is Outcome.ABSENT
        assert (await client.lease_heartbeat("job", "a")).outcome is Outcome.NOT_OWNED


async def test_holder_identity_comes_from_peer_credentials(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client:
        lease = (await client.lease_acquire("who", "a", 5)).lease
        assert lease is not None and lease.identity == proc.identify(os.getpid())
        with sleeper() as stranger, pytest.raises(InvalidRequest, match="ancestors"):
            await client.lease_acquire("who2", "a", 5, pid=stranger.pid)


async def test_tokens_strictly_increase_across_grants_and_survive_a_restart(
    fleetd: Fleetd,
) -> None:
    async with Client(fleetd.socket_path) as client:
        tokens = []
        for owner in ("a", "b", "a"):
            result = await client.lease_acquire("t", owner, 30)
            assert result.lease is not None
            tokens.append(result.lease.token)
            await client.lease_release("t", owner)
        held_token = (await client.lease_acquire("t", "c", 30)).lease.token  # type: ignore[union-attr]
        await client.lease_acquire("idle", "c", 0.2)
    fleetd.stop()
    fleetd.start()
    async with Client(fleetd.socket_path) as client:
        kept = (await client.lease_inspect("t")).lease
        assert kept is not None and (kept.state, kept.token, kept.owner) == (
            "held",
            held_token,
            "c",
        )
        assert kept.remaining > 29  # the full TTL again after a restart
        assert (await client.lease_acquire("t", "d", 30)).outcome is Outcome.CONTESTED
        await client.lease_release("t", "c")
        after = (await client.lease_acquire("t", "d", 30)).lease
    assert tokens == sorted(set(tokens)) and after is not None
    assert after.token > held_token > tokens[-1]


async def test_a_thousand_concurrent_acquires_make_exactly_one_winner(fleetd: Fleetd) -> None:
    results = []

    async def attempt(client: Client, owner: str) -> None:
        results.append(await client.lease_acquire("hot", owner, 30))

    async with (
        Client(fleetd.socket_path) as one,
        Client(fleetd.socket_path) as two,
        anyio.create_task_group() as tg,
    ):
        for n in range(1000):
            tg.start_soon(attempt, one if n % 2 else two, f"owner-{n}")
    winners = [r for r in results if r.outcome is Outcome.ACQUIRED]
    assert len(winners) == 1 and len(results) == 1000
    token = winners[0].lease.token  # type: ignore[union-attr]
    assert all(
        r.outcome is Outcome.CONTESTED and r.lease and r.lease.token == token
        for r in results
        if r is not winners[0]
    )


async def test_expiry_is_pushed_to_a_waiting_watcher(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client, Client(fleetd.socket_path) as watcher:
        start = await watcher.lease_watch("exp")
        await client.lease_acquire("exp", "a", 0.3)
        events = []
        with anyio.fail_after(5):
            async for event in watcher.watch_leases("exp"):
                events.append(event)
                if event.type == "expired":
                    break
        assert time.monotonic() - events[-1].deadline < 0.5
        assert (await client.lease_heartbeat("exp", "a")).outcome is Outcome.NOT_OWNED
        history = await watcher.lease_watch("exp", start.cursor, epoch=start.epoch, wait=0)
        assert [e.type for e in history.events] == ["acquired", "expired"]


async def test_heartbeats_keep_a_lease_past_its_ttl(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client:
        await client.lease_acquire("kept", "a", 0.3)
        for _ in range(9):
            await anyio.sleep(0.1)
            assert (await client.lease_heartbeat("kept", "a")).outcome is Outcome.RENEWED


async def test_watch_from_another_fleetd_epoch_is_compacted(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client:
        with pytest.raises(Compacted):
            await client.lease_watch(after=0, epoch="not-this-one", wait=0)


def test_stonith_kills_a_sigstopped_holder_past_its_ttl_and_takes_the_lease(
    fleetd: Fleetd,
) -> None:
    holder, token = start_holder(fleetd, "stale", "a", 0.3)
    try:
        holder.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        with SyncClient(fleetd.socket_path) as client:
            result = client.lease_acquire("stale", "b", 5)
        assert result.outcome is Outcome.ACQUIRED and result.fence == "terminated"
        assert result.previous is not None and result.previous.identity.pid == holder.pid
        assert result.lease is not None and result.lease.token > token
        assert holder.wait(5) == -signal.SIGTERM
    finally:
        holder.kill()
        holder.wait()


def test_lease_of_a_holder_that_exited_is_taken_at_once_with_nothing_signalled(
    fleetd: Fleetd,
) -> None:
    holder, _ = start_holder(fleetd, "orphan", "a", 60, stay=False)
    holder.wait(5)
    with SyncClient(fleetd.socket_path) as client:
        result = client.lease_acquire("orphan", "b", 5)
    assert (result.outcome, result.fence) == (Outcome.ACQUIRED, "gone")


def test_stale_record_whose_pid_now_names_another_process_is_not_signalled(
    fleetd: Fleetd,
) -> None:
    """A recycled PID, simulated: the record's start time no longer matches the process."""
    holder, _ = start_holder(fleetd, "reused", "a", 0.3)
    try:
        fleetd.stop()
        database = sqlite3.connect(os.path.join(fleetd.state_dir, "fleet.db"))
        with database:
            (value,) = database.execute(
                "SELECT value FROM kv WHERE key = 'leases/reused'"
            ).fetchone()
            record = json.loads(value)
            record["identity"]["start_time"] += 1
            database.execute(
                "UPDATE kv SET value = ? WHERE key = 'leases/reused'",
                (json.dumps(record).encode(),),
            )
        database.close()
        fleetd.start()
        time.sleep(0.5)  # past the full TTL the restart gave it
        with SyncClient(fleetd.socket_path) as client:
            result = client.lease_acquire("reused", "b", 5)
        assert (result.outcome, result.fence) == (Outcome.ACQUIRED, "pid_reused")
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("name", ["", "-lead", "with space", "x" * 129, "tab\t", "ünï"])
async def test_invalid_names_are_refused_clearly(fleetd: Fleetd, name: str) -> None:
    async with Client(fleetd.socket_path) as client:
        with pytest.raises(InvalidRequest, match="invalid lease name"):
            await client.lease_acquire(name, "a", 5)


@pytest.mark.parametrize("ttl", [0, -1, 0.01, 1e9, math.inf])
async def test_out_of_range_ttls_are_refused_clearly(fleetd: Fleetd, ttl: float) -> None:
    async with Client(fleetd.socket_path) as client:
        with pytest.raises(InvalidRequest, match="ttl"):
            await client.lease_acquire("t", "a", ttl)


async def test_empty_owner_is_refused_and_unknown_owner_cannot_release(fleetd: Fleetd) -> None:
    async with Client(fleetd.socket_path) as client:
        with pytest.raises(InvalidRequest, match="invalid owner"):
            await client.lease_acquire("t", "", 5)
        await client.lease_acquire("t", "a", 5)
        refused = await client.lease_release("t", "stranger")
    assert refused.outcome is Outcome.NOT_OWNED
    assert "last held by 'a', not 'stranger'" in refused.message


async def test_a_reload_forgets_records_gone_and_keeps_the_deadlines_of_the_others(
    tempdir: str,
) -> None:
    """What a fleetd on a shared store does once its watch of the others' writes lost its
    place (etcd compacted past it): the table made the store's again."""
    from fleetd.core.dispatch import Peer
    from fleetd.leases import LeaseManager
    from fleetd.store.sqlite import SQLiteStore
    from protocol.messages import LeaseAcquire

    path = os.path.join(tempdir, "store.db")
    async with (
        await anyio.open_process(["sleep", "60"]) as holder,
        SQLiteStore.open(path) as store,
        anyio.create_task_group() as tg,
    ):
        me = Peer(holder.pid, os.getuid(), os.getgid())  # not fleetd (here, this process)
        manager = LeaseManager(store)
        await tg.start(manager.serve)
        for name in ("kept", "gone"):
            await manager.acquire(LeaseAcquire(id=0, name=name, owner="a", ttl=60), me)
        kept = manager.table.get("kept")
        assert kept is not None
        await store.delete("leases/gone")  # as another fleetd's presence expiring would
        await manager._reload()
        assert manager.table.get("gone") is None
        assert manager.table.get("kept") is kept
        tg.cancel_scope.cancel()
        holder.kill()


def test_a_lease_held_through_another_fleetd_is_neither_renewed_nor_released_here() -> None:
    """Its deadline is kept by the fleetd it was acquired through (a shared store): a
    heartbeat here would renew nothing there, a release here would go unseen there."""
    foreign = held(deadline=math.inf)
    foreign.foreign = True
    assert not decide_heartbeat(foreign, "a", 7, 5.0)
    assert decide_release(foreign, "a", 7, 5.0) is Outcome.NOT_OWNED
    assert decide_acquire(foreign, "a", 5.0, alive).verdict is Verdict.CONTEST
