"""Leases: acquire+release latency, pipelined durable lease ops, the cost of 10,000 leases
heartbeating at 1 Hz, and how late a watcher hears of an expiry.

Targets are for a 2-core machine, where fleetd and the benchmark each get about one core.
"""

import os
import socket
import statistics
import sys
import threading
import time

import anyio

from bench.harness import (
    BIN,
    Figure,
    Fleetd,
    Target,
    cpu_seconds,
    pairs_per_second,
    percentile,
    rss_mib,
    running_fleetd,
)
from fleetctl import Client
from protocol.framing import encode
from protocol.messages import LeaseAcquire, LeaseHeartbeat, LeaseRelease

RTT_WARMUP, RTT_SAMPLES = 200, 2_000
RATE_WARMUP, RATE_SECONDS = 0.5, 3.0
CONNECTIONS, IN_FLIGHT = 4, 256
LIVE_LEASES, LIVE_TTL = 10_000, 10.0
LOAD_SECONDS = 10.0
TICKS_PER_SECOND = 100
"""The 10,000 heartbeats of each second go out in this many even batches."""
EXPIRING, EXPIRY_TTLS = 500, (0.3, 1.3)
_UVLOOP = {"use_uvloop": True}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


FLEETD = (str(BIN / "fleetd"),)
UNWATERMARKED = (sys.executable, "-m", "bench.unwatermarked")
"""fleetd with its watermark never written: the baseline of the watermark's cost."""


WATERMARK_ROUNDS = 3


def measure() -> list[Figure]:
    watermark = _watermark_cost()
    with running_fleetd() as fleetd:
        figures = anyio.run(_round_trip, fleetd.socket_path, backend_options=_UVLOOP)
        figures += anyio.run(_pipelined, fleetd.socket_path, backend_options=_UVLOOP)
        figures += watermark
        figures += _raw_pipelined(fleetd)
        tokens = anyio.run(_acquire_live, fleetd.socket_path, backend_options=_UVLOOP)
        load = _HeartbeatLoad(fleetd.socket_path, tokens)
        with load:
            figures += _heartbeat_cost(fleetd, load)
            figures += anyio.run(_expiry_lag, fleetd.socket_path, backend_options=_UVLOOP)
        figures.append(load.figure())
    return figures


async def _round_trip(socket_path: str) -> list[Figure]:
    """Sequential acquire+release pairs on one connection: two durable writes each."""
    samples = []
    async with Client(socket_path) as client:
        for i in range(RTT_WARMUP + RTT_SAMPLES):
            started = time.perf_counter_ns()
            await client.lease_acquire("rtt", "bench", 30)
            await client.lease_release("rtt", "bench")
            if i >= RTT_WARMUP:
                samples.append((time.perf_counter_ns() - started) / 1e3)
    return [
        Figure(
            "acquire_release_p50_us", "acquire+release p50 (Client)", percentile(samples, 50), "µs"
        ),
        Figure(
            "acquire_release_p99_us", "acquire+release p99 (Client)", percentile(samples, 99), "µs"
        ),
    ]


async def _pipelined_rate(socket_path: str) -> float:
    """IN_FLIGHT tasks over CONNECTIONS clients, each acquiring and releasing its own name."""
    return await pairs_per_second(
        socket_path,
        connections=CONNECTIONS,
        tasks=IN_FLIGHT,
        pair=_pair,
        warmup=RATE_WARMUP,
        seconds=RATE_SECONDS,
    )


async def _pipelined(socket_path: str) -> list[Figure]:
    rate = await _pipelined_rate(socket_path)
    return [
        Figure(
            "pipelined_lease_ops_per_s",
            f"pipelined lease ops, {IN_FLIGHT} in flight",
            rate,
            "ops/s",
            Target(10_000, upper=False),
        )
    ]


def _watermark_cost() -> list[Figure]:
    """Every commit notes its floor in the watermark (a pwrite), and one in RESERVED
    revisions, or once a second, advances it (a pwrite and an fdatasync) before its answer
    (fleetd.store.sqlite). The pipelined load against fleetd as it is and against one whose
    watermark is never written, alternately (each first in turn), WATERMARK_ROUNDS times each
    (this VM's noise is larger than the cost): the medians, and the cost between them."""
    marked: list[float] = []
    unmarked: list[float] = []
    pair = [(UNWATERMARKED, unmarked), (FLEETD, marked)]
    for _ in range(WATERMARK_ROUNDS):
        pair.reverse()  # neither always goes first
        for command, rates in pair:
            with running_fleetd(command=command) as fleetd:
                rates.append(
                    anyio.run(_pipelined_rate, fleetd.socket_path, backend_options=_UVLOOP)
                )
    with_mark, without = statistics.median(marked), statistics.median(unmarked)
    return [
        Figure(
            "pipelined_lease_ops_per_s_watermarked_median",
            f"  median of {WATERMARK_ROUNDS} fresh fleetds",
            with_mark,
            "ops/s",
            Target(10_000, upper=False),
        ),
        Figure(
            "pipelined_lease_ops_per_s_unwatermarked_median",
            "  the same, watermark never written",
            without,
            "ops/s",
        ),
        Figure(
            "watermark_cost_pct", "  cost of the watermark", (1 - with_mark / without) * 100, "%"
        ),
    ]


async def _pair(client: Client, name: str) -> None:
    await client.lease_acquire(name, "bench", 30)
    await client.lease_release(name, "bench")


async def _acquire_live(socket_path: str) -> list[int]:
    """LIVE_LEASES leases, acquired 256 at a time; their tokens in name order."""
    tokens = [0] * LIVE_LEASES
    async with Client(socket_path, timeout=60) as client:

        async def acquire(start: int) -> None:
            for n in range(start, LIVE_LEASES, 256):
                result = await client.lease_acquire(f"live/{n}", "bench", LIVE_TTL)
                assert result.lease is not None
                tokens[n] = result.lease.token

        async with anyio.create_task_group() as tg:
            for start in range(256):
                tg.start_soon(acquire, start)
    return tokens


class _HeartbeatLoad:
    """Every live lease heartbeated once a second, from a thread on a raw socket with frames
    encoded in advance, so that the figure is fleetd's cost, not the client's."""

    def __init__(self, socket_path: str, tokens: list[int]) -> None:
        frames = [
            encode(LeaseHeartbeat(id=n, name=f"live/{n}", owner="bench", token=token))
            for n, token in enumerate(tokens)
        ]
        per_tick = len(frames) // TICKS_PER_SECOND
        self.batches = [b"".join(frames[i : i + per_tick]) for i in range(0, len(frames), per_tick)]
        self.per_tick = per_tick
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.sent = self.answered = self.renewed = 0
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]

    def __enter__(self) -> "_HeartbeatLoad":
        for thread in self.threads:
            thread.start()
        time.sleep(2.0)  # let it settle
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.threads[0].join()
        self.sock.shutdown(socket.SHUT_WR)
        self.threads[1].join(10)
        self.sock.close()

    def _send(self) -> None:
        tick = 1 / TICKS_PER_SECOND
        next_at = time.monotonic()
        while not self.stopping.is_set():
            for batch in self.batches:
                self.sock.sendall(batch)
                self.sent += self.per_tick
                next_at += tick
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if self.stopping.is_set():
                    return

    def _receive(self) -> None:
        """Counts whole answers: a frame may arrive split across two reads, so only the lines
        a read completes are counted, the rest waits for the next read."""
        partial = b""
        while data := self.sock.recv(1 << 20):
            whole, _, partial = (partial + data).rpartition(b"\n")
            if whole:
                self.answered += whole.count(b"\n") + 1
                self.renewed += whole.count(b'"outcome":"renewed"')

    def figure(self) -> Figure:
        lost = self.answered - self.renewed
        return Figure(
            "heartbeats_not_renewed", "heartbeats answered not renewed", lost, "", Target(0)
        )


def _heartbeat_cost(fleetd: Fleetd, load: _HeartbeatLoad) -> list[Figure]:
    cpu_before, sent_before = cpu_seconds(fleetd.pid), load.sent
    started = time.monotonic()
    time.sleep(LOAD_SECONDS)
    elapsed = time.monotonic() - started
    share = (cpu_seconds(fleetd.pid) - cpu_before) / elapsed * 100
    return [
        Figure("heartbeats_per_s", "heartbeats/s sent", (load.sent - sent_before) / elapsed, "/s"),
        Figure(
            "heartbeat_10k_cpu_pct",
            f"fleetd CPU, {LIVE_LEASES:,} leases at 1 Hz",
            share,
            "% core",
            Target(25),
        ),
        Figure(
            "heartbeat_10k_rss_mib",
            f"fleetd RSS, {LIVE_LEASES:,} live leases",
            rss_mib(fleetd.pid),
            "MiB",
        ),
    ]


async def _expiry_lag(socket_path: str) -> list[Figure]:
    """Leases left to expire with spread TTLs, while a watcher long-polls: how long from each
    deadline (fleetd's CLOCK_MONOTONIC, the same clock as ours) to the watcher having it."""
    lags: list[float] = []
    low, high = EXPIRY_TTLS

    async def watch(watcher: Client) -> None:
        start = await watcher.lease_watch("exp/")
        cursor = start.cursor
        started.set()
        while len(lags) < EXPIRING:
            answer = await watcher.lease_watch("exp/", cursor, epoch=start.epoch)
            now = time.monotonic()
            cursor = answer.cursor
            lags.extend((now - e.deadline) * 1e3 for e in answer.events if e.type == "expired")

    started = anyio.Event()
    async with Client(socket_path) as client, Client(socket_path) as watcher:
        with anyio.fail_after(high + 20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch, watcher)
                await started.wait()
                for n in range(EXPIRING):
                    ttl = low + (high - low) * n / EXPIRING
                    await client.lease_acquire(f"exp/{n}", "bench", ttl)
    return [
        Figure("expiry_lag_p50_ms", "expiry lag p50 (under load)", percentile(lags, 50), "ms"),
        Figure(
            "expiry_lag_p99_ms",
            "expiry lag p99 (under load)",
            percentile(lags, 99),
            "ms",
            Target(50),
        ),
    ]


def _raw_pipelined(fleetd: Fleetd) -> list[Figure]:
    """Acquire+release pairs as pre-encoded frames on plain sockets: fleetd's own capacity,
    without the Python client's cost. Each batch holds a pair per name, in order; a release
    waits for the acquire before it on its name, so every pair really writes twice. With it,
    fleetd's CPU per op on its event loop and on its other threads (the store's database
    thread): CPU time, which this VM's noise distorts less than the rate."""
    connections = [_RawPairs(fleetd.socket_path, n) for n in range(CONNECTIONS)]
    try:
        for connection in connections:
            connection.send()
            connection.send()
        _collect(connections, RATE_WARMUP)
        cpu_before = _thread_cpu(fleetd.pid)
        started = time.perf_counter()
        ops = _collect(connections, RATE_SECONDS)
        rate = ops / (time.perf_counter() - started)
        loop, others = (
            (after - before) / ops * 1e6
            for before, after in zip(cpu_before, _thread_cpu(fleetd.pid), strict=True)
        )
        for connection in connections:
            connection.drain()
    finally:
        for connection in connections:
            connection.sock.close()
    unreleased = sum(c.sent * c.frames // 2 - c.released for c in connections)
    if unreleased:
        raise RuntimeError(f"{unreleased} pairs did not release: the benchmark is wrong")
    return [
        Figure(
            "raw_pipelined_lease_ops_per_s",
            f"pipelined lease ops, raw, {IN_FLIGHT} in flight",
            rate,
            "ops/s",
            Target(10_000, upper=False),
        ),
        Figure("raw_pipelined_loop_cpu_us", "  fleetd CPU per op, event loop", loop, "µs"),
        Figure("raw_pipelined_other_cpu_us", "  fleetd CPU per op, other threads", others, "µs"),
    ]


def _thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a process's main thread (fleetd's event loop) and of its other threads
    together, from /proc/PID/task/*/stat (resolution: a clock tick)."""
    loop = others = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        seconds = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        if int(tid) == pid:
            loop += seconds
        else:
            others += seconds
    return loop, others


class _RawPairs:
    def __init__(self, socket_path: str, index: int) -> None:
        per_batch = IN_FLIGHT // CONNECTIONS // 2
        self.batches = [
            b"".join(
                encode(request)
                for n in range(per_batch)
                for request in (
                    LeaseAcquire(id=2 * n, name=f"raw/{index}/{half}/{n}", owner="b", ttl=30),
                    LeaseRelease(id=2 * n + 1, name=f"raw/{index}/{half}/{n}", owner="b"),
                )
            )
            for half in range(2)
        ]
        self.frames = 2 * per_batch
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.sent = 0
        self.owed = 0
        self.released = 0
        self.buffer = b""

    def send(self) -> None:
        self.sock.sendall(self.batches[self.sent % 2])
        self.sent += 1
        self.owed += self.frames

    def await_batch(self) -> None:
        """Block until a batch's worth of answers came, counting the releases among them."""
        while self.buffer.count(b"\n") < self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("fleetd closed a raw benchmark connection")
            self.buffer += data
        lines = self.buffer.split(b"\n")
        batch, rest = lines[: self.frames], lines[self.frames :]
        self.buffer = b"\n".join(rest)
        self.owed -= self.frames
        self.released += sum(b'"outcome":"released"' in line for line in batch)

    def drain(self) -> None:
        while self.owed:
            self.await_batch()


def _collect(connections: list[_RawPairs], seconds: float) -> int:
    """Round-robin: take each connection's oldest batch of answers and send it another."""
    deadline = time.perf_counter() + seconds
    ops = 0
    while time.perf_counter() < deadline:
        for connection in connections:
            connection.await_batch()
            ops += connection.frames
            connection.send()
    return ops
