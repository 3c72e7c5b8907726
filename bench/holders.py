"""What a cluster costs now that holders fork from a warm template (fleetd.holder.template):
memory per extra holder, memory of fleetd + template + one big holder, and how long one
cluster takes to start, detached (`fleetctl up --wait`) and bound (`cluster()`).

Memory is PSS (proportional set size, /proc/PID/smaps_rollup): a page shared by k processes
counts 1/k in each, so the pages a holder still shares with its template (and the template
with fleetd, which forked it) count once among them all. The cost of k holders is the PSS of
fleetd, the template and the k holders, less what fleetd and the template had before any of
them. Every member is `sleep 3600`.
"""

import contextlib
import os
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import anyio

import fleetctl
from bench.harness import (
    BIN,
    Figure,
    Fleetd,
    Target,
    percentile,
    pss_mib,
    rss_mib,
    running_fleetd,
    template_of,
)
from fleetctl.sync import SyncClient
from protocol.definitions import ClusterSpec, cluster_from_dict

CLUSTERS = (10, 40)
BIG = 1000
SETTLE = 1.0
"""Seconds holders get to settle (their first writes done) before their memory is read."""
WARM_STEADY = 0.3
CLI_WARMUP, CLI_RUNS = 2, 10
BOUND_WARMUP, BOUND_RUNS = 2, 20
SLEEP = {"command": ["sleep", "3600"], "ready": "none"}
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    return [*_per_holder(), *_big_cluster(), *_up_wait(), *_bound_start()]


# --- memory ---------------------------------------------------------------------------------


def _per_holder() -> list[Figure]:
    figures = []
    with running_fleetd() as fleetd, SyncClient(fleetd.socket_path, timeout=60) as client:
        template = _warm(template_of(fleetd))
        figures.append(
            Figure("template_pss_mib", "PSS of the template alone", pss_mib(template), "MiB")
        )
        alone = pss_mib(fleetd.pid) + pss_mib(template)
        holders: list[int] = []
        with _downed(client, holders):
            for count in CLUSTERS:
                while len(holders) < count:
                    spec = cluster_from_dict({"members": {"a": SLEEP}}, name=f"c{len(holders)}")
                    holders.append(_up(client, spec))
                time.sleep(SETTLE)
                total = sum(pss_mib(pid) for pid in (fleetd.pid, template, *holders))
                figures.append(
                    Figure(
                        f"holder_pss_mib_{count}",
                        f"PSS per extra holder, {count} clusters",
                        (total - alone) / count,
                        "MiB",
                        Target(8),
                    )
                )
    return figures


def _big_cluster() -> list[Figure]:
    with running_fleetd() as fleetd, SyncClient(fleetd.socket_path, timeout=60) as client:
        template = _warm(template_of(fleetd))
        members = {f"s{i}": {**SLEEP, "restart": "always"} for i in range(BIG)}
        holders: list[int] = []
        with _downed(client, holders):
            spec = cluster_from_dict({"members": members}, name="big")
            holders.append(_up(client, spec))
            client.member_wait([f"big/s{i}" for i in range(BIG)], timeout=60)
            time.sleep(SETTLE)
            parts = {
                "fleetd": pss_mib(fleetd.pid),
                "template": pss_mib(template),
                "holder": pss_mib(holders[0]),
            }
    return [
        Figure(
            "fleet_template_pss_mib_1000",
            f"PSS N={BIG}: fleetd+template+holder",
            sum(parts.values()),
            "MiB",
            Target(55),
        ),
        *(
            Figure(f"{name}_pss_mib_1000", f"  of which {name}", mib, "MiB")
            for name, mib in parts.items()
        ),
    ]


def _warm(template: int) -> int:
    """`template` once it has imported the holder program: fleetd says READY=1 while its
    template still imports (the first fork waits for it), and what the imports add is the
    template's, not the holders' (read any earlier, they counted against the first holders).
    Warm is asleep with its memory unchanged for WARM_STEADY seconds."""
    deadline = time.monotonic() + 30
    last, steady_since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        rss = rss_mib(template)
        if rss != last or not _sleeping(template):
            last, steady_since = rss, time.monotonic()
        elif time.monotonic() - steady_since >= WARM_STEADY:
            return template
        time.sleep(0.02)
    raise RuntimeError(f"the template {template} did not settle within 30 s")


def _sleeping(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def _up(client: SyncClient, spec: ClusterSpec) -> int:
    """Start a cluster; its holder's pid."""
    pid = client.cluster_up(spec).holder_pid
    if pid is None:
        raise RuntimeError(f"cluster {spec.name!r} started without a holder")
    return pid


@contextlib.contextmanager
def _downed(client: SyncClient, holders: list[int]) -> Iterator[None]:
    """Every cluster down at the end (a holder that will not go is killed: its members die
    with it)."""
    try:
        yield
    finally:
        for status in {s.cluster for s in client.member_status()}:
            with contextlib.suppress(fleetctl.FleetError):
                client.cluster_down(status)
        for pid in holders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- start-up -------------------------------------------------------------------------------


def _up_wait() -> list[Figure]:
    """`fleetctl up --wait` of a 1-member cluster against `python -c pass`, interleaved so that
    machine noise hits both alike, and the same through the library (fleetd's part: the CLI's
    own start-up left out); each cluster is taken down again, untimed."""
    with (
        running_fleetd() as fleetd,
        tempfile.TemporaryDirectory(prefix="flb-") as tmp,
        SyncClient(fleetd.socket_path, timeout=60) as client,
    ):
        toml = os.path.join(tmp, "fleet.toml")
        with open(toml, "w") as f:
            f.write('[members.a]\ncommand = ["sleep", "3600"]\n')
        fleetctl_bin = str(BIN / "fleetctl")
        times: dict[str, list[float]] = {"bare": [], "up": [], "library": []}
        for round_ in range(CLI_WARMUP + CLI_RUNS):
            bare = _wall([str(BIN / "python"), "-c", "pass"], fleetd)
            name = f"u{round_}"
            up = _wall([fleetctl_bin, "up", "-f", toml, "--name", name, "--wait"], fleetd)
            _wall([fleetctl_bin, "down", name], fleetd)
            spec = cluster_from_dict({"members": {"a": SLEEP}}, name=f"l{round_}")
            started = time.perf_counter()
            client.cluster_up(spec)
            client.member_wait([f"l{round_}/a"])
            library = (time.perf_counter() - started) * 1e3
            client.cluster_down(f"l{round_}")
            if round_ >= CLI_WARMUP:
                times["bare"].append(bare)
                times["up"].append(up)
                times["library"].append(library)
    bare, up, library = (statistics.median(times[name]) for name in ("bare", "up", "library"))
    return [
        Figure("up_wait_one_ms", "fleetctl up --wait, 1 member (median)", up, "ms"),
        Figure("up_wait_python_ms", "  python -c pass (median)", bare, "ms"),
        Figure("up_wait_one_ratio", "  up --wait / python", up / bare, "x", Target(3)),
        Figure("up_wait_library_ms", "  up + wait via the library (median)", library, "ms"),
    ]


def _wall(argv: list[str], fleetd: Fleetd) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=fleetd.env, capture_output=True, check=False)
    elapsed = (time.perf_counter() - started) * 1e3
    if done.returncode != 0:
        raise RuntimeError(f"{argv[1:]} failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed


def _bound_start() -> list[Figure]:
    """`cluster()` enter -> running for the second and later clusters of a process (the first
    starts the template); the blocking and the async form."""
    blocking = _bound_blocking()
    async_ = anyio.run(_bound_async, backend_options=_UVLOOP)
    return [
        Figure(
            "bound_second_start_ms", "bound enter→running, 2nd+ (p50)", blocking, "ms", Target(30)
        ),
        Figure("bound_second_start_async_ms", "  async form (p50)", async_, "ms", Target(30)),
    ]


def _definitions() -> dict[str, Any]:
    return {"members": {"a": SLEEP}}


def _bound_blocking() -> float:
    samples = []
    with fleetctl.cluster(_definitions(), name="first") as first:
        first.wait_running()
        for run in range(BOUND_WARMUP + BOUND_RUNS):
            started = time.perf_counter()
            with fleetctl.cluster(_definitions(), name=f"b{run}") as c:
                c.wait_running()
                if run >= BOUND_WARMUP:
                    samples.append((time.perf_counter() - started) * 1e3)
    return percentile(samples, 50)


async def _bound_async() -> float:
    samples = []
    async with fleetctl.cluster(_definitions(), name="first") as first:
        await first.wait_running()
        for run in range(BOUND_WARMUP + BOUND_RUNS):
            started = time.perf_counter()
            async with fleetctl.cluster(_definitions(), name=f"a{run}") as c:
                await c.wait_running()
                if run >= BOUND_WARMUP:
                    samples.append((time.perf_counter() - started) * 1e3)
    return percentile(samples, 50)
