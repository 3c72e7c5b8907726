"""The task runs' durable parts over every store backend (the conformance suite's backends,
tests/test_store.py): a run's event log, appended in batches with the records written
alongside, gap-free under concurrent appends, resumable after a seq."""

# ruff: noqa: F811 (the tests take the conformance fixtures imported below)

from typing import Any

import anyio
import msgspec
import pytest

from fleetd.store import Put, Store
from fleetd.tasks import events as events_module
from fleetd.tasks import records
from fleetd.tasks.events import EventLog, read_stored, stored_last_seq
from protocol.errors import Internal, StoreFull
from protocol.tasks import Heartbeat, WorkerEvent
from tests.test_store import backend, store  # noqa: F401 (the conformance fixtures)

pytestmark = pytest.mark.anyio


def heartbeat(task: str = "t") -> WorkerEvent:
    return Heartbeat(
        seq=0, run_id="run-1", worker_id="w", task_id=task, timestamp="2026-01-01T00:00:00Z"
    )


def seqs_of(encoded: list[bytes]) -> list[int]:
    return [msgspec.json.decode(data)["seq"] for data in encoded]


async def test_concurrent_appends_get_gap_free_seqs_in_the_order_stored(store: Store) -> None:
    log = EventLog(store, "run-1", 0)
    given: dict[str, list[int]] = {}

    async def append(task: str, count: int) -> None:
        given[task] = await log.append([heartbeat(task) for _ in range(count)])

    async with anyio.create_task_group() as tg:
        for n in range(60):
            tg.start_soon(append, f"t{n}", 1 + n % 3)
    stored = await read_stored(store, "run-1", 0, 10_000)
    assert seqs_of(stored) == list(range(1, 121))
    for task, seqs in given.items():
        assert [msgspec.json.decode(stored[s - 1])["task_id"] for s in seqs] == [task] * len(seqs)
    assert await stored_last_seq(store, "run-1") == 120


async def test_appends_are_written_in_batches(store: Store) -> None:
    log = EventLog(store, "run-1", 0)
    before = store.statistics().transactions
    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(log.append, [heartbeat()])
    assert store.statistics().transactions - before < 50


async def test_a_batch_writes_the_records_given_alongside_the_later_put_winning(
    store: Store,
) -> None:
    log = EventLog(store, "run-1", 0)
    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(log.append, [heartbeat()], [Put("runs/task/run-1/t", str(n).encode())])
    kv = await store.get("runs/task/run-1/t")
    assert kv is not None
    assert int(kv.value) in range(20)
    assert log.last_seq == 20


async def test_an_append_after_another_writers_is_refused_and_writes_nothing(store: Store) -> None:
    ours = EventLog(store, "run-1", 0)
    theirs = EventLog(store, "run-1", 0)
    await theirs.append([heartbeat()])
    with pytest.raises(Internal, match="another fleetd"):
        await ours.append([heartbeat()], [Put("runs/task/run-1/t", b"x")])
    assert await store.get("runs/task/run-1/t") is None
    assert await stored_last_seq(store, "run-1") == 1


async def test_a_first_write_that_fails_unpatient_fails_every_append_after_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit's: nothing is written of a run whose submit was not."""
    log = EventLog(store, "run-1", 0, patient=False)
    txn, behind = store.txn, []

    async def failing_with_one_more_queued(*args: Any) -> Any:
        if not behind:  # appended while the first write is on its way
            behind.append(log.enqueue([heartbeat()]))
        raise StoreFull("the store's disk is full; nothing was written")

    monkeypatch.setattr(store, "txn", failing_with_one_more_queued)
    with pytest.raises(StoreFull):
        await log.append([heartbeat()])
    monkeypatch.setattr(store, "txn", txn)
    with pytest.raises(StoreFull):
        await log.written(behind[0])
    with pytest.raises(StoreFull):
        await log.append([heartbeat()], [Put("runs/task/run-1/t", b"x")])
    assert await store.range("runs/") == ()


async def test_events_are_read_after_a_seq_across_buckets(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "EVENT_BUCKET", 7)
    monkeypatch.setattr(events_module, "EVENT_BUCKET", 7)
    monkeypatch.setattr(events_module, "TAIL", 5)
    log = EventLog(store, "run-1", 0)
    for _ in range(4):
        await log.append([heartbeat() for _ in range(10)])
    assert seqs_of(await log.read(3, 100)) == list(range(4, 41))
    assert seqs_of(await log.read(13, 5)) == list(range(14, 19))
    assert seqs_of(await log.read(37, 100)) == [38, 39, 40]  # from memory
    assert await log.read(40, 100) == []


async def test_the_events_of_one_write_share_a_key_in_each_bucket_they_fall_in(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(records, "EVENT_BUCKET", 7)
    monkeypatch.setattr(events_module, "EVENT_BUCKET", 7)
    log = EventLog(store, "run-1", 0)
    await log.append([heartbeat() for _ in range(10)])
    await log.append([heartbeat()])
    stored = await store.range(records.EVENTS)
    assert [kv.key for kv in stored] == [
        records.event_key("run-1", 1),
        records.event_key("run-1", 7),
        records.event_key("run-1", 11),
    ]
    assert seqs_of(await read_stored(store, "run-1", 5, 100)) == list(range(6, 12))


async def test_events_stored_a_key_each_are_read_and_appended_to(store: Store) -> None:
    """As fleetd wrote them before a write's events shared a key."""
    for seq in (1, 2):
        event = msgspec.json.encode(msgspec.structs.replace(heartbeat(), seq=seq))
        await store.put(records.event_key("run-1", seq), event)
    await store.put(records.seq_key("run-1"), b"2")
    log = EventLog(store, "run-1", await stored_last_seq(store, "run-1"))
    assert await log.append([heartbeat()]) == [3]
    assert seqs_of(await read_stored(store, "run-1", 0, 100)) == [1, 2, 3]
    assert seqs_of(await read_stored(store, "run-1", 1, 1)) == [2]


async def test_a_reopened_log_goes_on_from_the_stored_seq(store: Store) -> None:
    await EventLog(store, "run-1", 0).append([heartbeat(), heartbeat()])
    again = EventLog(store, "run-1", await stored_last_seq(store, "run-1"))
    assert await again.append([heartbeat()]) == [3]
