"""Claims: `fleetctl claims acquire` and `release` as whole processes, acquire+release pairs
through the library (sequential, and from concurrent callers), each beside the same figure for
leases, and `fleetctl gc` over 1,000 claims.

Every acquire is durable before it is answered: its record committed with its content (the
store's one flush), its staging file written out meanwhile (fleetd.delivery: no flush of its
own), then renamed into the inbox; a release commits its record, then moves the file out.
Concurrent requests share their disk work (fleetd.delivery's batches, and the store's group
commit). The figures include all of that (fleetd.claims says what each answer promises).
"""

import json
import statistics
import subprocess
import time

import anyio

from bench.harness import (
    BIN,
    Figure,
    Fleetd,
    Pair,
    Target,
    pairs_per_second,
    percentile,
    running_fleetd,
)
from fleetctl import Client

CONTENT = b"Do task X, then report.\n" * 8
CLI_WARMUP, CLI_RUNS = 3, 30
RATE_WARMUP, RATE_SECONDS = 0.5, 3.0
SEQUENTIAL_ROUNDS = 3
CONNECTIONS, TASKS = 4, 64
GC_CLAIMS = 1_000
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    with running_fleetd() as fleetd:
        figures = _cli(fleetd)
        figures += anyio.run(_sequential, fleetd.socket_path, backend_options=_UVLOOP)
        figures += anyio.run(_concurrent, fleetd.socket_path, backend_options=_UVLOOP)
        figures += _gc(fleetd)
    return figures


# -- whole processes ---------------------------------------------------------------------------


def _run(argv: list[str], fleetd: Fleetd, stdin: bytes, outcome: str) -> float:
    """Wall milliseconds of one process, which must answer `outcome`."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=fleetd.env, input=stdin, capture_output=True, check=False)
    elapsed = (time.perf_counter() - started) * 1e3
    if outcome and json.loads(done.stdout)["outcome"] != outcome:
        raise RuntimeError(f"{argv[1:]} answered {done.stdout!r}, not {outcome}")
    return elapsed


def _cli(fleetd: Fleetd) -> list[Figure]:
    """Interleaved rounds (python, acquire of a fresh key, its release), so that machine noise
    hits all three alike."""
    claims = [str(BIN / "fleetctl"), "claims"]
    times: dict[str, list[float]] = {"bare": [], "acquire": [], "release": []}
    for round_ in range(CLI_WARMUP + CLI_RUNS):
        what = ["--kind", "prompt_inbox", "--key", f"cli-{round_}", "--owner", "bench"]
        samples = {
            "bare": _run([str(BIN / "python"), "-c", "pass"], fleetd, b"", ""),
            "acquire": _run([*claims, "acquire", *what], fleetd, CONTENT, "acquired"),
            "release": _run([*claims, "release", *what], fleetd, b"", "released"),
        }
        if round_ >= CLI_WARMUP:
            for name, value in samples.items():
                times[name].append(value)
    bare, acquire, release = (statistics.median(times[name]) for name in times)
    return [
        Figure("python_pass_ms", "python -c pass (median)", bare, "ms"),
        Figure("cli_acquire_ms", "fleetctl claims acquire (median)", acquire, "ms"),
        Figure("cli_acquire_ratio", "claims acquire / python", acquire / bare, "x"),
        Figure("cli_release_ms", "fleetctl claims release (median)", release, "ms"),
        Figure("cli_release_ratio", "claims release / python", release / bare, "x"),
    ]


# -- the library -------------------------------------------------------------------------------
#
# Claims beside leases, in the same fleetd and the same run: a lease pair is two durable store
# writes, a claim pair the same two (with the content in the first) with its file written
# alongside the first, and a rename after each, so the gap between them is what the files cost.


async def _sequential(socket_path: str) -> list[Figure]:
    """One task, one connection: acquire then release the same name, over and over; claims
    and leases take turns, so that the machine's noise hits both alike."""
    claims: list[float] = []
    leases: list[float] = []
    async with Client(socket_path) as client:
        for _ in range(SEQUENTIAL_ROUNDS):
            await _timed_pairs(client, _pair, RATE_WARMUP / SEQUENTIAL_ROUNDS, [])
            await _timed_pairs(client, _pair, RATE_SECONDS / SEQUENTIAL_ROUNDS, claims)
            await _timed_pairs(client, _lease_pair, RATE_WARMUP / SEQUENTIAL_ROUNDS, [])
            await _timed_pairs(client, _lease_pair, RATE_SECONDS / SEQUENTIAL_ROUNDS, leases)
    return [
        Figure(
            "pair_p50_ms",
            "acquire+release pair p50 (Client)",
            percentile(claims, 50),
            "ms",
            Target(2.0),
        ),
        Figure("pair_p99_ms", "acquire+release pair p99", percentile(claims, 99), "ms"),
        Figure("lease_pair_p50_ms", "  lease pair p50, same run", percentile(leases, 50), "ms"),
    ]


async def _timed_pairs(client: Client, pair: Pair, seconds: float, samples: list[float]) -> None:
    deadline = time.perf_counter() + seconds
    while (started := time.perf_counter()) < deadline:
        await pair(client, "seq")
        samples.append((time.perf_counter() - started) * 1e3)


async def _concurrent(socket_path: str) -> list[Figure]:
    """TASKS callers over CONNECTIONS clients, each acquiring and releasing its own name."""
    rates = {}
    for name, pair in (("claims", _pair), ("leases", _lease_pair)):
        ops = await pairs_per_second(
            socket_path,
            connections=CONNECTIONS,
            tasks=TASKS,
            pair=pair,
            warmup=RATE_WARMUP,
            seconds=RATE_SECONDS,
        )
        rates[name] = ops / 2
    return [
        Figure(
            "pairs_per_s",
            f"acquire+release pairs/s, {TASKS} callers",
            rates["claims"],
            "pairs/s",
            Target(2_000, upper=False),
        ),
        Figure("lease_pairs_per_s", "  lease pairs/s, same run", rates["leases"], "pairs/s"),
    ]


async def _pair(client: Client, key: str) -> None:
    acquired = await client.claim_acquire("prompt_inbox", key, "bench", CONTENT)
    released = await client.claim_release("prompt_inbox", key, "bench")
    if (acquired.outcome, released.outcome) != ("acquired", "released"):
        raise RuntimeError(f"{key}: {acquired.outcome}, {released.outcome}")


async def _lease_pair(client: Client, name: str) -> None:
    await client.lease_acquire(name, "bench", 30)
    await client.lease_release(name, "bench")


# -- gc ----------------------------------------------------------------------------------------


def _gc(fleetd: Fleetd) -> list[Figure]:
    """`fleetctl gc` over GC_CLAIMS held claims: once with every owner live (a scan that keeps
    them all), once with their owner gone (each claim's record and file removed)."""
    anyio.run(_claims_of, fleetd.socket_path, "keeper", True, backend_options=_UVLOOP)
    kept = _run([str(BIN / "fleetctl"), "--json", "gc"], fleetd, b"", "ok")
    anyio.run(_claims_of, fleetd.socket_path, "ghost", False, backend_options=_UVLOOP)
    started = time.perf_counter()
    done = subprocess.run(
        [str(BIN / "fleetctl"), "--json", "gc"], env=fleetd.env, capture_output=True, check=True
    )
    removing = (time.perf_counter() - started) * 1e3
    removed = len(json.loads(done.stdout)["removed"])
    if removed != GC_CLAIMS:
        raise RuntimeError(f"gc removed {removed} claims, not {GC_CLAIMS}")
    return [
        Figure("gc_keep_1000_ms", f"fleetctl gc, {GC_CLAIMS:,} claims kept", kept, "ms"),
        Figure(
            "gc_remove_1000_ms",
            f"fleetctl gc, {GC_CLAIMS:,} removed of {2 * GC_CLAIMS:,}",
            removing,
            "ms",
        ),
    ]


async def _claims_of(socket_path: str, owner: str, live: bool) -> None:
    """GC_CLAIMS claims of `owner`, whose lease stays held (`live`) or is released first, so
    that fleetd knows the owner and knows it gone."""
    async with Client(socket_path, timeout=60) as client:
        await client.lease_acquire(f"owner-{owner}", owner, 600)
        if not live:
            await client.lease_release(f"owner-{owner}", owner)

        async def acquire(start: int) -> None:
            for n in range(start, GC_CLAIMS, TASKS):
                result = await client.claim_acquire("prompt_inbox", f"{owner}-{n}", owner, CONTENT)
                if result.outcome != "acquired":
                    raise RuntimeError(f"{owner}-{n}: {result.outcome}")

        async with anyio.create_task_group() as tg:
            for start in range(TASKS):
                tg.start_soon(acquire, start)
