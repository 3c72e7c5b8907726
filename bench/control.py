"""The control socket: round trip, pipelined throughput, an idle daemon's cost, and the wall
time of each command a script runs (fleetctl's fast path) against a bare `python -c pass`.

Targets are for a 2-core machine, where fleetd and the benchmark each get about one core.
"""

import os
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import anyio

from bench.harness import (
    BIN,
    Figure,
    Fleetd,
    Target,
    cpu_seconds,
    percentile,
    rss_mib,
    running_fleetd,
)
from fleetctl import Client, SyncClient
from protocol.framing import encode
from protocol.messages import Ping

RTT_WARMUP, RTT_SAMPLES = 1_000, 10_000
RATE_WARMUP, RATE_SECONDS = 0.3, 2.0
IN_FLIGHT = 256
"""Pings in flight in all, spread over the connections: a client process with 16 connections
keeps 16 each in flight, in the library (tasks) and raw (frames per batch) alike."""
RAW_BATCHES = 2
"""Batches outstanding per raw connection: the daemon works on one while we read the other."""
CLI_WARMUP, CLI_RUNS = 3, 20
IDLE_SECONDS = 5
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    with running_fleetd() as fleetd:
        figures = _idle(fleetd)
        figures += anyio.run(_round_trip, fleetd.socket_path, backend_options=_UVLOOP)
        figures += _raw_round_trip(fleetd.socket_path)
        figures += _throughput(fleetd.socket_path)
        figures.append(
            Figure("rss_after_load_mib", "fleetd RSS after the load", rss_mib(fleetd.pid), "MiB")
        )
        figures += _cli(fleetd)
    return figures


def _idle(fleetd: Fleetd) -> list[Figure]:
    with SyncClient(fleetd.socket_path) as client:
        for _ in range(10):
            client.ping()
    rss = rss_mib(fleetd.pid)
    before = cpu_seconds(fleetd.pid)
    time.sleep(IDLE_SECONDS)
    idle_cpu = cpu_seconds(fleetd.pid) - before
    return [
        Figure("idle_rss_mib", "fleetd RSS at rest", rss, "MiB", Target(40)),
        Figure(
            "idle_cpu_ms", f"fleetd CPU in {IDLE_SECONDS} s idle", idle_cpu * 1e3, "ms", Target(10)
        ),
    ]


async def _round_trip(socket_path: str) -> list[Figure]:
    """Sequential pings on one connection through fleetctl.Client."""
    samples = []
    async with Client(socket_path) as client:
        for i in range(RTT_WARMUP + RTT_SAMPLES):
            started = time.perf_counter_ns()
            await client.ping()
            if i >= RTT_WARMUP:
                samples.append((time.perf_counter_ns() - started) / 1e3)
    return [
        Figure("rtt_p50_us", "round trip p50 (Client)", percentile(samples, 50), "µs", Target(100)),
        Figure("rtt_p99_us", "round trip p99 (Client)", percentile(samples, 99), "µs"),
    ]


def _raw_round_trip(socket_path: str) -> list[Figure]:
    """The same pings on a plain blocking socket: the daemon's share of the round trip."""
    frame = encode(Ping(id=1))
    samples = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        for i in range(RTT_WARMUP + RTT_SAMPLES):
            started = time.perf_counter_ns()
            sock.sendall(frame)
            if not sock.recv(4096).endswith(b"\n"):
                raise ConnectionError("expected one whole answer per recv from fleetd")
            if i >= RTT_WARMUP:
                samples.append((time.perf_counter_ns() - started) / 1e3)
    return [
        Figure("raw_rtt_p50_us", "round trip p50 (raw socket)", percentile(samples, 50), "µs"),
        Figure("raw_rtt_p99_us", "round trip p99 (raw socket)", percentile(samples, 99), "µs"),
    ]


def _throughput(socket_path: str) -> list[Figure]:
    figures = []
    for connections in (1, 16):
        library = anyio.run(_library_rate, socket_path, connections, backend_options=_UVLOOP)
        raw = _raw_rate(socket_path, connections)
        figures += [
            Figure(
                f"library_rps_{connections}conn",
                f"pipelined, Client, {connections} conn",
                library,
                "req/s",
                Target(30_000, upper=False),
            ),
            Figure(
                f"raw_rps_{connections}conn",
                f"pipelined, raw socket, {connections} conn",
                raw,
                "req/s",
                Target(30_000, upper=False),
            ),
        ]
    return figures


async def _library_rate(socket_path: str, connections: int) -> float:
    """Requests/s with IN_FLIGHT concurrent `ping()` tasks spread over `connections` clients."""
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(socket_path)) for _ in range(connections)]
        await _ping_until(clients, RATE_WARMUP)
        started = time.perf_counter()
        answered = await _ping_until(clients, RATE_SECONDS)
        return answered / (time.perf_counter() - started)


async def _ping_until(clients: list[Client], seconds: float) -> int:
    deadline = time.perf_counter() + seconds
    answered = 0

    async def pinger(client: Client) -> None:
        nonlocal answered
        while time.perf_counter() < deadline:
            await client.ping()
            answered += 1

    async with anyio.create_task_group() as tg:
        for client in clients:
            for _ in range(IN_FLIGHT // len(clients)):
                tg.start_soon(pinger, client)
    return answered


class _RawConnection:
    """A plain blocking socket that writes pre-encoded batches of pings and counts answers."""

    def __init__(self, socket_path: str, batch: bytes, size: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(socket_path)
        self.batch, self.size = batch, size
        self.owed = 0
        self.surplus = 0

    def send(self) -> None:
        self.sock.sendall(self.batch)
        self.owed += self.size

    def await_batch(self) -> None:
        """Block until one more batch has been answered (one answer per newline)."""
        while self.surplus < self.size:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("fleetd closed a raw benchmark connection")
            self.surplus += data.count(b"\n")
        self.surplus -= self.size
        self.owed -= self.size


def _raw_rate(socket_path: str, connections: int) -> float:
    """Requests/s when batches of pre-encoded ping frames are written on plain sockets."""
    per_connection = IN_FLIGHT // connections
    batch = b"".join(encode(Ping(id=i)) for i in range(per_connection))
    conns = [_RawConnection(socket_path, batch, per_connection) for _ in range(connections)]
    try:
        for conn in conns:
            for _ in range(RAW_BATCHES):
                conn.send()
        _answer_batches(conns, RATE_WARMUP)
        started = time.perf_counter()
        answered = _answer_batches(conns, RATE_SECONDS)
        rate = answered / (time.perf_counter() - started)
        for conn in conns:
            while conn.owed:
                conn.await_batch()
        return rate
    finally:
        for conn in conns:
            conn.sock.close()


def _answer_batches(conns: list[_RawConnection], seconds: float) -> int:
    """Round-robin: collect each connection's oldest batch of answers and send it another."""
    deadline = time.perf_counter() + seconds
    answered = 0
    while time.perf_counter() < deadline:
        for conn in conns:
            conn.await_batch()
            answered += conn.size
            conn.send()
    return answered


SCRIPTED_MEMBERS = 1_000
"""Members up while the commands scripts run are timed: `status` lists them all."""

ScriptedCommand = tuple[str, str, list[str], bytes | None, float]
"""A figure's key and label, the fleetctl arguments, its stdin, and its target (÷ python)."""


def _scripted_commands() -> list[ScriptedCommand]:
    """Every command a script calls, each on the fast path (fleetctl._fast), per round: the
    claim and the lease are acquired, used and released, the 1-member cluster brought up and
    (untimed) down again."""
    n = SCRIPTED_MEMBERS
    claim = ["--kind", "prompt_inbox", "--key", "task-{round}"]
    lease = ["build", "--owner", "bench"]
    return [
        ("ping", "fleetctl ping", ["ping"], None, 1.25),
        ("json_ping", "fleetctl --json ping", ["--json", "ping"], None, 1.25),
        ("status", f"fleetctl status N={n}", ["status"], None, 1.5),
        ("json_status", f"fleetctl --json status N={n}", ["--json", "status"], None, 1.5),
        ("wait", "fleetctl wait (running)", ["wait", "s0"], None, 1.5),
        (
            "claims_acquire",
            "fleetctl claims acquire",
            ["claims", "acquire", *claim, "--owner", "bench"],
            b"do X\n",
            1.5,
        ),
        ("claims_inspect", "fleetctl claims inspect", ["claims", "inspect", *claim], None, 1.5),
        (
            "claims_release",
            "fleetctl claims release",
            ["claims", "release", *claim, "--owner", "bench"],
            None,
            1.5,
        ),
        ("lease_acquire", "fleetctl lease acquire", ["lease", "acquire", *lease], None, 1.5),
        ("lease_heartbeat", "fleetctl lease heartbeat", ["lease", "heartbeat", *lease], None, 1.5),
        ("lease_release", "fleetctl lease release", ["lease", "release", *lease], None, 1.5),
        ("up_wait", "fleetctl up --wait (1 member)", ["up", "-f", "{one}", "--wait"], None, 3.0),
    ]


def _cli(fleetd: Fleetd) -> list[Figure]:
    """Whole-process wall time of each command a script runs, against `python -c pass`: the
    commands interleaved, round after round, so that machine noise hits all alike."""
    commands = _scripted_commands()
    times: dict[str, list[float]] = {"bare": [], **{command[0]: [] for command in commands}}
    with tempfile.TemporaryDirectory(prefix="flb-") as tmp, _members_up(fleetd, tmp):
        one = os.path.join(tmp, "one.toml")
        with open(one, "w") as f:
            f.write('name = "one"\n[members.a]\ncommand = ["sleep", "3600"]\n')
        for round_ in range(CLI_WARMUP + CLI_RUNS):
            times["bare"].append(_wall([str(BIN / "python"), "-c", "pass"], fleetd, None))
            for key, _, args, stdin, _ in commands:
                argv = [arg.format(round=round_, one=one) for arg in args]
                times[key].append(_wall([str(BIN / "fleetctl"), *argv], fleetd, stdin))
            _fleetctl(fleetd, "down", "one")
    bare = statistics.median(times["bare"][CLI_WARMUP:])
    figures = [Figure("python_pass_ms", "python -c pass (median)", bare, "ms")]
    for key, label, _, _, target in commands:
        median = statistics.median(times[key][CLI_WARMUP:])
        figures += [
            Figure(f"fleetctl_{key}_ms", f"{label} (median)", median, "ms"),
            Figure(
                f"fleetctl_{key}_ratio", "  ÷ python -c pass", median / bare, "x", Target(target)
            ),
        ]
    return figures


@contextmanager
def _members_up(fleetd: Fleetd, tmp: str) -> Iterator[None]:
    """SCRIPTED_MEMBERS sleeping members in one cluster, brought up for the block, then down."""
    path = os.path.join(tmp, "many.toml")
    with open(path, "w") as f:
        f.write('name = "many"\n')
        for i in range(SCRIPTED_MEMBERS):
            f.write(f'[members.s{i}]\ncommand = ["sleep", "3600"]\n')
    _fleetctl(fleetd, "up", "-f", path, "--wait", "--timeout", "2m")
    try:
        yield
    finally:
        _fleetctl(fleetd, "down", "many")


def _wall(argv: list[str], fleetd: Fleetd, stdin: bytes | None) -> float:
    """Milliseconds `argv` took, start to exit; it must exit 0."""
    started = time.perf_counter()
    done = subprocess.run(
        argv,
        env=fleetd.env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = (time.perf_counter() - started) * 1e3
    if done.returncode != 0:
        raise RuntimeError(f"{argv} exited {done.returncode}: {done.stderr.decode()}")
    return elapsed


def _fleetctl(fleetd: Fleetd, *args: str) -> None:
    subprocess.run(
        [str(BIN / "fleetctl"), *args], env=fleetd.env, stdout=subprocess.DEVNULL, check=True
    )
