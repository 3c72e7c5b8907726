"""Clusters of processes: fleet beside supervisord, started, killed and asked in the same run.

supervisord (PyPI's `supervisor`) lives in a bench-only virtual environment, bench/.venv-supervisor,
created on first run. Both supervise N `sleep 3600` members (fleet: ready "none", restart
"always"; supervisord: autostart, autorestart, startsecs=0), so each figure has a ratio.

supervisord is watched through its own log ("spawned", "entered RUNNING state"), not by
polling its XML-RPC: every request wakes its main loop, which then reaps and restarts at once,
whereas left alone it notices a dead child only when its 1 s poll() times out. One row shows
the restart as an XML-RPC poller sees it, for contrast.

Targets are for a 2-core machine.
"""

import contextlib
import http.client
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import fleetctl
from bench.harness import (
    BIN,
    Figure,
    Fleetd,
    Target,
    cpu_seconds,
    percentile,
    pss_mib,
    rss_mib,
    running_fleetd,
    template_of,
)
from fleetctl import Client
from fleetctl.bound import Cluster, runtime_base

SIZES = (100, 500, 1000)
BIG = 1000
KILLS = 20
SV_KILLS = {100: 6, 500: 6, 1000: 10}
"""supervisord takes 1 to 2 s per restart: fewer kills keep the section near 2 minutes."""
IDLE_SECONDS = 5
CLI_WARMUP, CLI_RUNS = 2, 10
STATUS_WARMUP, STATUS_SECONDS = 200, 1.0
ALL_STATUS_SECONDS = 1.0
RATE_WINDOWS = 3
"""A rate is the median of this many windows of its seconds: a burst of the machine's other
load (this VM is shared) then moves one window, not the figure."""
XMLRPC_POLL = 0.010
XMLRPC_KILLS = 10
LOG_POLL = 0.001
"""How often supervisord's log is read: the resolution of its figures."""
CLIENT_KILLS = 3
TCP_MEMBERS = 100

SUPERVISOR_VENV = Path(__file__).parent / ".venv-supervisor"
SLEEP = ["sleep", "3600"]
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    supervisor_bin = supervisor_venv()
    figures: list[Figure] = []
    for n in SIZES:
        fleet_start, holder_cpu, members_cpu, fleet_restart, rates = anyio.run(
            _bound_sleepers, n, backend_options=_UVLOOP
        )
        with Supervisord(supervisor_bin, n) as sv:
            sv_start = sv.started_in
            sv_restart, sv_spawn = zip(
                *(sv.restart_seconds(f"s{(i * 37) % n}") for i in range(SV_KILLS[n])),
                strict=True,
            )
            figures += _side_by_side(
                f"start_{n}",
                f"start→running N={n}",
                fleet_start,
                sv_start,
                "s",
                target=Target(1.0) if n == BIG else None,
                ratio_target=Target(5, upper=False) if n == BIG else None,
            )
            figures.append(
                Figure(
                    f"fleet_start_holder_cpu_{n}",
                    "  holder CPU, all its threads",
                    holder_cpu * 1e3,
                    "ms",
                )
            )
            figures.append(
                Figure(
                    f"fleet_start_members_cpu_{n}",
                    "  members' CPU, spawn to running",
                    members_cpu * 1e3,
                    "ms",
                )
            )
            figures += _side_by_side(
                f"restart_p50_{n}",
                f"restart p50 N={n}",
                percentile(fleet_restart, 50) * 1e3,
                percentile(sv_restart, 50) * 1e3,
                "ms",
                target=Target(20),
                ratio_target=Target(50, upper=False),
            )
            figures += [
                Figure(
                    f"fleet_restart_max_{n}",
                    f"  fleet, max of {KILLS}",
                    max(fleet_restart) * 1e3,
                    "ms",
                ),
                Figure(
                    f"supervisord_respawn_p50_{n}",
                    f"  supervisord spawned, p50 of {len(sv_spawn)}",
                    percentile(sv_spawn, 50) * 1e3,
                    "ms",
                ),
            ]
            if n == SIZES[0]:
                polled = [sv.restart_seconds_polled(f"s{i + 50}") for i in range(XMLRPC_KILLS)]
                figures.append(
                    Figure(
                        "sv_restart_xmlrpc_p50",
                        f"  supervisord, XML-RPC poll {XMLRPC_POLL * 1e3:g}ms",
                        percentile(polled, 50) * 1e3,
                        "ms",
                    )
                )
            if n == BIG:
                figures += _bound_rates(rates)
                figures += _blocking_rates(n)
                figures += _detached(sv)
    figures += anyio.run(_tcp_start, backend_options=_UVLOOP)
    figures += _client_death()
    return figures


def _side_by_side(
    key: str,
    label: str,
    fleet: float,
    supervisord: float,
    unit: str,
    *,
    target: Target | None,
    ratio_target: Target | None,
) -> list[Figure]:
    """`ratio_target` is the issue's target over its own supervisord figure (start at
    N=1000: 1.0 s where supervisord took about 5 s; restart: 20 ms against 1.0 s), which
    holds on a machine slower or faster than the one those figures came from."""
    return [
        Figure(f"fleet_{key}", f"{label}: fleet", fleet, unit, target),
        Figure(f"supervisord_{key}", f"{label}: supervisord", supervisord, unit),
        Figure(f"ratio_{key}", "  supervisord / fleet", supervisord / fleet, "x", ratio_target),
    ]


# --- fleet, bound mode ------------------------------------------------------------------------


def _sleepers(n: int) -> dict[str, Any]:
    member = {"command": SLEEP, "ready": "none", "restart": "always"}
    return {"name": "bench", "members": {f"s{i}": member for i in range(n)}}


@dataclass(frozen=True)
class Costed:
    """Calls per second, and the CPU each call cost this process (the client) and the process
    that answered (a holder, or fleetd): where two processes share two cores, what a call
    costs each side says more than its rate, which spinning and other load distort."""

    per_second: float
    client_us: float
    server_us: float


NOT_MEASURED = Costed(0.0, 0.0, 0.0)


@dataclass
class _Rates:
    one_member: float = 0.0
    all_members: Costed = NOT_MEASURED


async def _bound_sleepers(n: int) -> tuple[float, float, float, list[float], _Rates]:
    """Start → all running, the CPU the holder spent on it (it was forked at the start: its
    counters began there) and the CPU the members spent on theirs (from the spawn: the
    child's steps before its program, the exec, the program's start); then SIGKILL members
    one at a time, watching status for a new pid."""
    rates = _Rates()
    started = time.perf_counter()
    async with Cluster(_sleepers(n), timeout=60) as cluster:
        await cluster.wait_running(timeout=60)
        start = time.perf_counter() - started
        assert cluster.holder_pid is not None
        holder_cpu = cpu_seconds(cluster.holder_pid)
        members_cpu = sum(_run_seconds(s.pid) for s in cluster.known.values() if s.pid)
        restarts = [await _fleet_restart(cluster, f"s{(i * 37) % n}") for i in range(KILLS)]
        if n == BIG:
            rates.one_member = await rate(lambda: cluster.status("s1"), STATUS_SECONDS)
            rates.all_members = await costed_rate(
                cluster.status, ALL_STATUS_SECONDS, cluster.holder_pid
            )
    return start, holder_cpu, members_cpu, restarts, rates


def _run_seconds(pid: int) -> float:
    """CPU time of a process to the nanosecond (/proc/PID/schedstat): a sleeping member's is
    below /proc/PID/stat's clock tick."""
    with open(f"/proc/{pid}/schedstat", "rb") as f:
        return int(f.read().split()[0]) / 1e9


async def _fleet_restart(cluster: Cluster, name: str) -> float:
    old = (await cluster.status(name)).pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    killed = time.perf_counter()
    while True:
        status = await cluster.status(name)
        if status.state == "running" and status.pid not in (None, old):
            return time.perf_counter() - killed
        if time.perf_counter() - killed > 10:
            raise TimeoutError(f"fleet did not restart {name} within 10 s: {status}")


async def rate(call: Any, seconds: float) -> float:
    """Sequential calls per second over `seconds` (the median of RATE_WINDOWS windows),
    after a short warm-up."""
    for _ in range(10):
        await call()
    rates = []
    for _ in range(RATE_WINDOWS):
        done = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / RATE_WINDOWS:
            await call()
            done += 1
        rates.append(done / elapsed)
    return statistics.median(rates)


async def costed_rate(call: Any, seconds: float, server: int) -> Costed:
    """As `rate`, with the CPU per call of this process and of `server`."""
    before = _own_cpu_seconds(), cpu_seconds(server)
    per_second = await rate(call, seconds)
    return _costed(per_second, seconds, before, server)


def _costed(per_second: float, seconds: float, before: tuple[float, float], server: int) -> Costed:
    """The CPU since `before` over the calls of about `seconds` at `per_second` (the warm-up
    calls are few, and counted with them)."""
    calls = per_second * seconds
    client = (_own_cpu_seconds() - before[0]) / calls * 1e6
    return Costed(per_second, client, (cpu_seconds(server) - before[1]) / calls * 1e6)


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cost_figures(key: str, costed: Costed, server: str) -> list[Figure]:
    return [
        Figure(f"{key}_client_cpu_us", "  client CPU per call", costed.client_us, "µs"),
        Figure(f"{key}_server_cpu_us", f"  {server} CPU per call", costed.server_us, "µs"),
    ]


def _bound_rates(rates: _Rates) -> list[Figure]:
    return [
        Figure(
            "bound_one_status_rps",
            "1-member status, bound async",
            rates.one_member,
            "req/s",
            Target(15_000, upper=False),
        ),
        Figure(
            "bound_all_status_rps",
            f"all-member status, bound async, N={BIG}",
            rates.all_members.per_second,
            "req/s",
            Target(1_000, upper=False),
        ),
        *cost_figures("bound_all_status", rates.all_members, "holder"),
    ]


async def _tcp_start() -> list[Figure]:
    member = {
        "command": ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
        "ready": "tcp",
        "start_timeout": 60,  # 100 interpreters starting at once on two cores
    }
    definitions = {"name": "web", "members": {f"w{i}": member for i in range(TCP_MEMBERS)}}
    started = time.perf_counter()
    async with Cluster(definitions, timeout=60) as cluster:
        await cluster.wait_running(timeout=60)
        seconds = time.perf_counter() - started
    return [
        Figure(
            "fleet_start_tcp_100",
            f"start→ready tcp N={TCP_MEMBERS}: fleet",
            seconds,
            "s",
        )
    ]


_CLIENT = textwrap.dedent(
    """
    import json, sys, time, fleetctl
    member = {"command": ["sleep", "3600"], "ready": "none"}
    with fleetctl.cluster({"name": "doomed", "members": {f"d{i}": member for i in range(%d)}}) as c:
        statuses = c.wait_running(timeout=60)
        print(json.dumps([s.pid for s in statuses.values()] + [c.holder_pid]), flush=True)
        time.sleep(3600)
    """
)


def _client_death() -> list[Figure]:
    """SIGKILL a process holding a bound cluster; time until its last member is gone (pidfds)."""
    gone, holder_gone = [], []
    for _ in range(CLIENT_KILLS):
        members, holder = _kill_client(TCP_MEMBERS)
        gone.append(members)
        holder_gone.append(holder)
    return [
        Figure(
            "bound_client_kill_ms",
            f"client kill→members gone N={TCP_MEMBERS}",
            statistics.median(gone) * 1e3,
            "ms",
            Target(100),
        ),
        Figure(
            "bound_client_kill_holder_ms",
            "  … → holder gone too",
            statistics.median(holder_gone) * 1e3,
            "ms",
        ),
    ]


def _kill_client(n: int) -> tuple[float, float]:
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT % n], stdout=subprocess.PIPE, start_new_session=True
    )
    pidfds: list[int] = []
    try:
        assert client.stdout is not None
        line = client.stdout.readline()
        if not line:
            raise RuntimeError("the bound client exited before its members ran")
        *members, holder = json.loads(line)
        pidfds = [os.pidfd_open(pid) for pid in [*members, holder]]
        os.kill(client.pid, signal.SIGKILL)
        killed = time.perf_counter()
        poller = select.poll()
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        left = set(pidfds)
        members_gone = holder_gone = 0.0
        while left:
            for fd, _ in poller.poll(10_000):
                poller.unregister(fd)
                left.discard(fd)
            if not left & set(pidfds[:-1]) and not members_gone:
                members_gone = time.perf_counter() - killed
            if pidfds[-1] not in left and not holder_gone:
                holder_gone = time.perf_counter() - killed
            if time.perf_counter() - killed > 10:
                raise TimeoutError(f"{len(left)} processes outlived the bound client by 10 s")
        return members_gone, holder_gone
    finally:
        for fd in pidfds:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        if client.poll() is None:
            client.kill()
        client.wait()


# --- fleet, detached under fleetd, beside supervisord at N = 1000 --------------------------------


def _detached(sv: "Supervisord") -> list[Figure]:
    with running_fleetd() as fleetd, tempfile.TemporaryDirectory(prefix="flb-") as tmp:
        toml = os.path.join(tmp, "fleet.toml")
        with open(toml, "w") as f:
            for i in range(BIG):
                f.write(f'[members.s{i}]\ncommand = ["sleep", "3600"]\nrestart = "always"\n')
        started = time.perf_counter()
        up = subprocess.run(
            [str(BIN / "fleetctl"), "--json", "up", "-f", toml, "--name", "bench", "--wait"],
            env=fleetd.env,
            capture_output=True,
            check=False,
        )
        up_seconds = time.perf_counter() - started
        holder = _holder_pid(up.stdout)
        try:
            if up.returncode != 0:
                raise RuntimeError(f"fleetctl up failed ({up.returncode}): {up.stderr.decode()}")
            return _detached_figures(fleetd, holder, up_seconds, sv)
        finally:
            subprocess.run(
                [str(BIN / "fleetctl"), "down", "bench"],
                env=fleetd.env,
                stdout=subprocess.DEVNULL,
                check=False,
            )
            if holder:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(holder, signal.SIGKILL)  # its members die with it (parent-death)


def _holder_pid(output: bytes) -> int | None:
    try:
        pid = json.loads(output).get("holder_pid")
    except ValueError:
        return None
    return pid if isinstance(pid, int) else None


def _detached_figures(
    fleetd: Fleetd, holder: int | None, up_seconds: float, sv: "Supervisord"
) -> list[Figure]:
    assert holder is not None
    figures = [
        Figure(
            "fleet_up_wait_1000",
            f"fleetctl up --wait N={BIG}",
            up_seconds,
            "s",
            Target(1.5),
        ),
        Figure(
            "ratio_up_wait_1000",
            "  supervisord / fleetctl up",
            sv.started_in / up_seconds,
            "x",
            Target(5, upper=False),
        ),
    ]
    figures += _cli_status(fleetd, sv)
    one, every = anyio.run(_library_rates, fleetd, backend_options=_UVLOOP)
    figures += [
        Figure(
            "detached_one_status_rps",
            "1-member status via fleetd",
            one,
            "req/s",
            Target(15_000, upper=False),
        ),
        Figure(
            "detached_all_status_rps",
            f"all-member status, fleetd, N={BIG}",
            every.per_second,
            "req/s",
            Target(1_000, upper=False),
        ),
        *cost_figures("detached_all_status", every, "fleetd"),
    ]
    fleet_pids = (fleetd.pid, holder)
    time.sleep(0.5)
    rss = sum(rss_mib(pid) for pid in fleet_pids)
    pss = sum(pss_mib(pid) for pid in (*fleet_pids, template_of(fleetd)))  # shares its pages
    sv_rss = rss_mib(sv.pid)
    before = sum(cpu_seconds(pid) for pid in fleet_pids), cpu_seconds(sv.pid)
    time.sleep(IDLE_SECONDS)
    after = sum(cpu_seconds(pid) for pid in fleet_pids), cpu_seconds(sv.pid)
    idle = [(b - a) / IDLE_SECONDS * 100 for a, b in zip(before, after, strict=True)]
    return [
        *figures,
        Figure(
            "fleet_idle_cpu_pct_1000",
            f"idle CPU N={BIG}: fleetd+holder",
            idle[0],
            "% core",
            Target(0.1),
        ),
        Figure(
            "supervisord_idle_cpu_pct_1000",
            f"idle CPU N={BIG}: supervisord",
            idle[1],
            "% core",
        ),
        Figure("fleet_rss_mib_1000", f"RSS N={BIG}: fleetd+holder", rss, "MiB", Target(50)),
        Figure("fleetd_rss_mib_1000", "  of which fleetd", rss_mib(fleetd.pid), "MiB"),
        Figure("fleet_pss_mib_1000", f"PSS N={BIG}: fleetd+template+holder", pss, "MiB"),
        Figure("python_uvloop_rss_mib", "  floor: python -c 'import uvloop'", _floor_rss(), "MiB"),
        Figure("supervisord_rss_mib_1000", f"RSS N={BIG}: supervisord", sv_rss, "MiB"),
        Figure("ratio_rss_1000", "  fleet / supervisord", rss / sv_rss, "x"),
    ]


def _floor_rss() -> float:
    """The RSS of an interpreter that has imported uvloop and nothing of ours: what each of
    fleetd and a holder costs before its first line of code."""
    code = "import uvloop; print(open('/proc/self/status').read())"
    status = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, check=True)
    line = next(x for x in status.stdout.decode().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _cli_status(fleetd: Fleetd, sv: "Supervisord") -> list[Figure]:
    """Whole-process wall, interleaved so that machine noise hits all alike."""
    commands = {
        "bare": [str(BIN / "python"), "-c", "pass"],
        "fleetctl": [str(BIN / "fleetctl"), "status"],
        "supervisorctl": [str(sv.bin / "supervisorctl"), "-c", sv.conf, "status"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for round_ in range(CLI_WARMUP + CLI_RUNS):
        for name, argv in commands.items():
            started = time.perf_counter()
            done = subprocess.run(argv, env=fleetd.env, stdout=subprocess.PIPE, check=False)
            elapsed = (time.perf_counter() - started) * 1e3
            if done.returncode != 0 or (name != "bare" and done.stdout.count(b"\n") < BIG):
                raise RuntimeError(f"{name} status failed ({done.returncode})")
            if round_ >= CLI_WARMUP:
                times[name].append(elapsed)
    bare, fleet, supervisorctl = (statistics.median(times[name]) for name in commands)
    return [
        Figure("python_pass_ms", "python -c pass (median)", bare, "ms"),
        Figure("fleetctl_status_ms", f"fleetctl status N={BIG} (median)", fleet, "ms"),
        Figure(
            "fleetctl_status_ratio", "  fleetctl status / python", fleet / bare, "x", Target(1.5)
        ),
        Figure("supervisorctl_status_ms", f"supervisorctl status N={BIG}", supervisorctl, "ms"),
        Figure(
            "supervisorctl_status_ratio",
            "  supervisorctl / python",
            supervisorctl / bare,
            "x",
        ),
        Figure("ratio_status_cli", "  supervisorctl / fleetctl status", supervisorctl / fleet, "x"),
    ]


def _blocking_rates(n: int) -> list[Figure]:
    """The same calls through the blocking face (`with fleetctl.cluster(...)`), which asks
    the holder over a blocking socket of its own."""
    with fleetctl.cluster(_sleepers(n), timeout=60) as cluster:
        cluster.wait_running(timeout=60)
        assert cluster.holder_pid is not None
        one = _blocking_rate(lambda: cluster.status("s1"), STATUS_SECONDS)
        before = _own_cpu_seconds(), cpu_seconds(cluster.holder_pid)
        every_rate = _blocking_rate(cluster.status, ALL_STATUS_SECONDS)
        every = _costed(every_rate, ALL_STATUS_SECONDS, before, cluster.holder_pid)
    return [
        Figure(
            "blocking_one_status_rps",
            "1-member status, bound blocking",
            one,
            "req/s",
            Target(15_000, upper=False),
        ),
        Figure(
            "blocking_all_status_rps",
            f"all-member status, bound blocking, N={n}",
            every.per_second,
            "req/s",
            Target(1_000, upper=False),
        ),
        *cost_figures("blocking_all_status", every, "holder"),
    ]


def _blocking_rate(call: Any, seconds: float) -> float:
    """As `rate`, blocking."""
    for _ in range(10):
        call()
    rates = []
    for _ in range(RATE_WINDOWS):
        done = 0
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds / RATE_WINDOWS:
            call()
            done += 1
        rates.append(done / elapsed)
    return statistics.median(rates)


async def _library_rates(fleetd: Fleetd) -> tuple[float, Costed]:
    async with Client(fleetd.socket_path) as client:
        one = await rate(lambda: client.member_status(["bench/s1"]), STATUS_SECONDS)
        every = await costed_rate(client.member_status, ALL_STATUS_SECONDS, fleetd.pid)
    return one, every


# --- supervisord ------------------------------------------------------------------------------


def supervisor_venv() -> Path:
    """bench/.venv-supervisor/bin, with PyPI's supervisor in it: created on first use."""
    bin_ = SUPERVISOR_VENV / "bin"
    if not (bin_ / "supervisord").exists():
        print(f"creating {SUPERVISOR_VENV} with supervisor…", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SUPERVISOR_VENV)], check=True)
        subprocess.run([str(bin_ / "pip"), "install", "--quiet", "supervisor"], check=True)
    return bin_


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path)


_SPAWNED = re.compile(rb"spawned: '([^']+)' with pid (\d+)")
_RUNNING = re.compile(rb"success: (\S+) entered RUNNING state")


class Supervisord:
    """supervisord with `n` sleepers in a temp dir, started on entry and waited for (by its log)
    until every program is RUNNING; shut down (SIGKILL of it and its children if need be) and
    the directory removed on exit."""

    def __init__(self, bin_: Path, n: int) -> None:
        self.bin, self.n = bin_, n
        self.root = tempfile.mkdtemp(dir=runtime_base(), prefix="svb-")  # its logs, as fleet's
        self.conf = os.path.join(self.root, "supervisord.conf")
        self.log = os.path.join(self.root, "supervisord.log")
        self.sock = os.path.join(self.root, "supervisor.sock")
        self.started_in = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._pids: dict[str, int] = {}

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def __enter__(self) -> "Supervisord":
        try:
            self._start()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        with open(self.conf, "w") as f:
            f.write(self._config())
        open(self.log, "wb").close()
        self._log_file = open(self.log, "rb")  # noqa: SIM115 (closed in _stop)
        started = time.perf_counter()
        self._process = subprocess.Popen(
            [str(self.bin / "supervisord"), "-c", self.conf],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        running: set[str] = set()
        self._follow_log(lambda: len(running) >= self.n, running, 120)
        self.started_in = time.perf_counter() - started
        processes: Any = self.rpc().supervisor.getAllProcessInfo()
        states = {p["statename"] for p in processes}
        if states != {"RUNNING"}:
            raise RuntimeError(f"supervisord reports states {states}")

    def _config(self) -> str:
        return self._head() + self._programs()

    def _head(self) -> str:
        head = f"""\
            [unix_http_server]
            file = {self.sock}

            [supervisord]
            nodaemon = true
            logfile = {self.log}
            pidfile = {self.root}/supervisord.pid
            childlogdir = {self.root}
            minfds = 16384
            minprocs = 2000

            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

            [supervisorctl]
            serverurl = unix://{self.sock}
            """
        return textwrap.dedent(head)

    def _programs(self) -> str:
        return "".join(sleeper_program(f"s{i}") for i in range(self.n))

    def _follow_log(self, done: Any, running: set[str], timeout: float) -> None:
        """Read new log lines (every LOG_POLL) until done(); record spawns and RUNNING states."""
        deadline = time.perf_counter() + timeout
        pending = b""
        while True:
            chunk = self._log_file.read()
            if not chunk and done():
                return
            if not chunk:
                if time.perf_counter() > deadline:
                    raise TimeoutError("supervisord did not get there in time")
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"supervisord exited: see {self.log}")
                time.sleep(LOG_POLL)
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if m := _SPAWNED.search(line):
                    self._pids[m[1].decode()] = int(m[2])
                elif m := _RUNNING.search(line):
                    running.add(m[1].decode())

    def restart_seconds(self, name: str) -> tuple[float, float]:
        """SIGKILL the program; seconds until its log says a new process entered RUNNING, and
        until it says a new one was spawned."""
        old = self._pids[name]
        running: set[str] = set()
        self._follow_log(lambda: True, running, 1)  # whatever it has logged so far
        running.clear()
        os.kill(old, signal.SIGKILL)
        killed = time.perf_counter()
        self._follow_log(lambda: self._pids[name] != old, running, 10)
        spawned = time.perf_counter() - killed
        self._follow_log(lambda: name in running, running, 10)
        return time.perf_counter() - killed, spawned

    def restart_seconds_polled(self, name: str) -> float:
        """The same, seen by polling getProcessInfo every XMLRPC_POLL (which wakes supervisord)."""
        proxy = self.rpc()
        first: Any = proxy.supervisor.getProcessInfo(name)
        old = first["pid"]
        os.kill(old, signal.SIGKILL)
        killed = time.perf_counter()
        while time.perf_counter() - killed < 10:
            info: Any = proxy.supervisor.getProcessInfo(name)
            if info["statename"] == "RUNNING" and info["pid"] not in (0, old):
                self._pids[name] = info["pid"]
                return time.perf_counter() - killed
            time.sleep(XMLRPC_POLL)
        raise TimeoutError(f"supervisord did not restart {name} within 10 s")

    def rpc(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy(
            "http://localhost/RPC2", transport=_UnixTransport(self.sock)
        )

    def _stop(self) -> None:
        try:
            if self._process is not None and self._process.poll() is None:
                _shutdown(self._process, self.rpc(), self._children())
        finally:
            if self._log_file is not None:
                self._log_file.close()
            shutil.rmtree(self.root, ignore_errors=True)

    def _children(self) -> list[int]:
        return list(_children_of(self.pid))


def sleeper_program(name: str) -> str:
    """A [program:] section supervising `sleep 3600` as fleet's sleepers are supervised."""
    program = """\

        [program:{name}]
        command = sleep 3600
        autostart = true
        autorestart = true
        startsecs = 0
        """
    return textwrap.dedent(program).format(name=name)


def _shutdown(
    process: subprocess.Popen[bytes], proxy: xmlrpc.client.ServerProxy, children: list[int]
) -> None:
    """supervisord's own shutdown (it stops every program); SIGKILL it and them if it will not."""
    try:
        proxy.supervisor.shutdown()
        process.wait(60)
    except (OSError, xmlrpc.client.Error, subprocess.TimeoutExpired):
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()


def _children_of(parent: int) -> Iterator[int]:
    """Pids whose parent is `parent`, by a /proc scan (no /proc/PID/task/TID/children here)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            yield int(entry.name)
