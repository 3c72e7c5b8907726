"""The SQLite store: durable write latency, group-commit throughput, and keepalive rate.

Writes are synchronous=FULL, so latency is bounded below by one fsync of the WAL; throughput
under concurrency shows how much group commit amortizes it.
"""

import os
import shutil
import tempfile
import time

import anyio

from bench.harness import percentile
from fleetd.store import Compare, Put
from fleetd.store.sqlite import SQLiteStore

LATENCY_WARMUP, LATENCY_SAMPLES = 200, 2_000
CALLERS, TXNS_PER_CALLER = 128, 60
KEEPALIVES = 200_000


async def measure() -> dict[str, float]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="store-bench-")
    try:
        async with SQLiteStore.open(os.path.join(directory, "store.db")) as store:
            figures = await _put_latency(store)
            figures |= await _concurrent_txns(store)
            figures |= await _keepalives(store)
        return figures
    finally:
        shutil.rmtree(directory)


async def _put_latency(store: SQLiteStore) -> dict[str, float]:
    for n in range(LATENCY_WARMUP):
        await store.put(f"warm/{n}", b"x" * 100)
    samples = []
    for n in range(LATENCY_SAMPLES):
        started = time.perf_counter()
        await store.put(f"seq/{n}", b"x" * 100)
        samples.append((time.perf_counter() - started) * 1e6)
    return {
        "store_put_p50_us": percentile(samples, 50),
        "store_put_p99_us": percentile(samples, 99),
    }


async def _concurrent_txns(store: SQLiteStore) -> dict[str, float]:
    """Each caller compare-and-sets its own key, as a lease acquire or claim would."""

    async def caller(index: int) -> None:
        key = f"cas/{index}"
        for version in range(TXNS_PER_CALLER):
            await store.txn((Compare(key, "version", "==", version),), (Put(key, b"x" * 100),))

    before = store.statistics()
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for index in range(CALLERS):
            tg.start_soon(caller, index)
    elapsed = time.perf_counter() - started
    after = store.statistics()
    return {
        "store_txn_per_s_128_callers": CALLERS * TXNS_PER_CALLER / elapsed,
        "store_txns_per_commit_128_callers": (after.transactions - before.transactions)
        / (after.commits - before.commits),
    }


async def _keepalives(store: SQLiteStore) -> dict[str, float]:
    lease, _ = await store.grant(60)
    started = time.perf_counter()
    for _ in range(KEEPALIVES):
        await store.keepalive(lease)
    return {"store_keepalive_per_s": KEEPALIVES / (time.perf_counter() - started)}
