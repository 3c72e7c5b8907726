"""Shared benchmark support: figures with targets, a real fleetd, and what /proc says about it.

Nothing here imports the tests: the benchmarks start fleetd the way systemd would, and wait for
its own READY=1 on a NOTIFY_SOCKET we hand it.
"""

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
"""The virtual environment's bin directory: fleetd, fleetctl and python live side by side."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Target:
    """A bound a figure should stay within: at most `bound` (upper) or at least `bound`."""

    bound: float
    upper: bool = True

    def met(self, value: float) -> bool:
        return value <= self.bound if self.upper else value >= self.bound

    def __str__(self) -> str:
        return f"{'≤' if self.upper else '≥'} {self.bound:,g}"


@dataclass(frozen=True)
class Figure:
    """One measured number. `key` names it in the JSON; `label` in the table."""

    key: str
    label: str
    value: float
    unit: str = ""
    target: Target | None = None

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.target.met(self.value) else "MISS"


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of `samples`, interpolating between closest ranks."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from VmRSS in /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def pss_mib(pid: int) -> float:
    """Proportional set size: resident pages, each shared page divided among its sharers (the
    interpreter and libraries two Python processes both map count once between them)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no Pss for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), from /proc/PID/stat.

    The kernel counts in clock ticks, so the resolution is 1/SC_CLK_TCK (usually 10 ms).
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / _CLOCK_TICKS


@dataclass(frozen=True)
class Fleetd:
    """A running fleetd started by `running_fleetd`."""

    process: subprocess.Popen[bytes]
    root: str
    """Its state directory and log, on the disk."""
    runtime: str
    """Its socket, and beside it the holders' runtime directories (c/CLUSTER/), on tmpfs."""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def socket_path(self) -> str:
        return os.path.join(self.runtime, "fleetd.sock")

    @property
    def env(self) -> dict[str, str]:
        """An environment in which fleetctl finds this fleetd without --socket."""
        return {**os.environ, "FLEET_SOCKET": self.socket_path}


@contextmanager
def running_fleetd(
    ready_timeout: float = 15.0,
    command: Sequence[str] = (str(BIN / "fleetd"),),
    store: str = "",
) -> Iterator[Fleetd]:
    """Start `fleetd` (or `command`, a variant of it) and yield it once it has said READY=1;
    with its store in etcd when `store` is an etcd:// address.

    Laid out as in production: the state directory on the disk (a fresh short /tmp
    directory), the socket and the holders' runtime directories beside it on tmpfs (where
    $XDG_RUNTIME_DIR and /run are; /dev/shm here). The daemon is stopped and the directories
    removed however the block ends, KeyboardInterrupt included. fleetd runs in its own
    session, so a ^C reaches only us and we stop it in order.
    """
    from fleetctl.bound import runtime_base

    root = tempfile.mkdtemp(dir="/tmp", prefix="flb-")
    runtime = tempfile.mkdtemp(dir=runtime_base(), prefix="flb-")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    process: subprocess.Popen[bytes] | None = None
    try:
        notify_path = os.path.join(root, "notify.sock")
        notify.bind(notify_path)
        env = {
            **os.environ,
            "FLEET_SOCKET": os.path.join(runtime, "fleetd.sock"),
            "FLEET_STATE_DIR": os.path.join(root, "state"),
            "NOTIFY_SOCKET": notify_path,
            "FLEET_STORE": store,
        }
        with open(os.path.join(root, "fleetd.log"), "wb") as log:
            process = subprocess.Popen(
                list(command),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        _wait_ready(notify, ready_timeout, root)
        yield Fleetd(process, root, runtime)
    finally:
        try:
            if process is not None:
                _stop(process)
        finally:
            notify.close()
            shutil.rmtree(root, ignore_errors=True)
            shutil.rmtree(runtime, ignore_errors=True)


def _wait_ready(notify: socket.socket, timeout: float, root: str) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        notify.settimeout(left)
        try:
            message = notify.recv(4096)
        except TimeoutError:
            break
        if b"READY=1" in message.split(b"\n"):
            return
    with open(os.path.join(root, "fleetd.log"), errors="replace") as f:
        log = f.read()
    raise RuntimeError(f"fleetd did not say READY=1 within {timeout}s; its log:\n{log}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait; SIGKILL if it will not go."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


Pair = Callable[[Any, str], Awaitable[None]]
"""Two operations on one name through a client (say acquire, then release)."""


async def pairs_per_second(
    socket_path: str, *, connections: int, tasks: int, pair: Pair, warmup: float, seconds: float
) -> float:
    """Operations per second with `tasks` tasks over `connections` clients, each task doing
    `pair` on a name of its own again and again (two operations a pair)."""
    from fleetctl import Client

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(Client(socket_path)) for _ in range(connections)]
        await _pairs_until(clients, tasks, pair, warmup)
        started = time.perf_counter()
        ops = await _pairs_until(clients, tasks, pair, seconds)
        return ops / (time.perf_counter() - started)


async def _pairs_until(clients: list[Any], tasks: int, pair: Pair, seconds: float) -> int:
    import anyio

    deadline = time.perf_counter() + seconds
    ops = 0

    async def worker(client: Any, name: str) -> None:
        nonlocal ops
        while time.perf_counter() < deadline:
            await pair(client, name)
            ops += 2

    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(worker, clients[n % len(clients)], f"pipe-{n}")
    return ops


TEMPLATE_NAME = "fleetd-template"
"""What `ps -e` shows for a holder template (fleetd.core.startup.name_process)."""


def template_of(fleetd: Fleetd) -> int:
    """fleetd's holder template: its child of that name (which it takes as it starts)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with open(f"/proc/{fleetd.pid}/task/{fleetd.pid}/children") as f:
            for pid in map(int, f.read().split()):
                with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as comm:
                    if comm.read().strip() == TEMPLATE_NAME:
                        return pid
        time.sleep(0.01)
    raise RuntimeError("fleetd runs no holder template")
