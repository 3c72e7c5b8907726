"""Many clusters under one fleetd: 200 clusters of 5 `sleep` members brought up, asked and
brought down, beside supervisord with 200 groups of 5 programs in the same run.

fleet is driven through the async Client, one connection per cluster (as 200 scripts or test
fixtures would each have their own), every cluster at once: that measures fleetd and its
holders, not 200 interpreter starts, whose cost the CLI figures of `members` give (`fleetctl
up --wait`, `fleetctl status`). A cluster's `up` is what `fleetctl up --wait` asks: cluster_up,
then member_wait on its members.

supervisord reads one configuration of 200 [group:] sections: its `up` is its start until every
program entered RUNNING (read from its log, as bench.members does), its status of everything is
getAllProcessInfo over XML-RPC, its `down` stopAllProcesses.

Last, fleetd's registry alone, in-process (no holder, no client): the CPU that 200 waits cost
while 1,000 pushes come in, and the status of everyone asked with a cluster changing between
asks, which the figures through sockets hide behind holder starts and client decoding.

Targets are the issue's (12), for a 2-core machine.
"""

import glob
import os
import shutil
import signal
import tempfile
import time
import xmlrpc.client
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from bench.harness import Figure, Fleetd, Target, cpu_seconds, running_fleetd
from bench.members import (
    NOT_MEASURED,
    Costed,
    Supervisord,
    cost_figures,
    costed_rate,
    rate,
    sleeper_program,
    supervisor_venv,
)
from fleetctl import Client
from fleetd.clusters.index import Held
from fleetd.clusters.records import HolderRecord
from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.store.sqlite import SQLiteStore
from protocol.clusters import MemberStatusRequest, MemberWait
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import MemberState, MemberStatus

CLUSTERS = 200
MEMBERS = 5
STATUS_SECONDS = 2.0
UP_TIMEOUT = 120.0
"""Seconds every cluster gets to run, each counted from its own up: on a machine without the
holder template, 200 interpreters start at once."""
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    fleet = _fleet()
    with GroupedSupervisord(supervisor_venv(), CLUSTERS, MEMBERS) as sv:
        sv_status = _supervisord_status_rate(sv)
        sv_down = _supervisord_down(sv)
        sv_up = sv.started_in
    scale = f"{CLUSTERS}x{MEMBERS}"
    return [
        Figure("fleet_clusters_up_s", f"all up {scale}: fleet", fleet.up, "s", Target(10)),
        Figure("supervisord_clusters_up_s", f"all up {scale}: supervisord", sv_up, "s"),
        Figure("ratio_clusters_up", "  supervisord / fleet", sv_up / fleet.up, "x"),
        Figure("fleetd_cpu_clusters_up_s", "  fleetd CPU during fleet's up", fleet.up_cpu, "s"),
        Figure(
            "fleet_clusters_all_status_rps",
            f"all-status {scale}: fleet",
            fleet.all_status.per_second,
            "req/s",
            Target(1_000, upper=False),
        ),
        *cost_figures("fleet_clusters_all_status", fleet.all_status, "fleetd"),
        Figure(
            "supervisord_clusters_all_status_rps",
            f"all-status {scale}: supervisord",
            sv_status,
            "req/s",
        ),
        Figure(
            "ratio_clusters_all_status",
            "  fleet / supervisord",
            fleet.all_status.per_second / sv_status,
            "x",
        ),
        Figure(
            "fleet_clusters_one_status_rps",
            f"1-member status among {CLUSTERS} clusters",
            fleet.one_status,
            "req/s",
        ),
        Figure("fleet_clusters_down_s", f"all down {scale}: fleet", fleet.down, "s"),
        Figure("supervisord_clusters_down_s", f"all down {scale}: supervisord", sv_down, "s"),
        Figure("ratio_clusters_down", "  supervisord / fleet", sv_down / fleet.down, "x"),
        *anyio.run(_registry_alone, backend_options=_UVLOOP),
    ]


# --- fleet --------------------------------------------------------------------------------


@dataclass
class _FleetFigures:
    up: float = 0.0
    up_cpu: float = 0.0
    all_status: Costed = NOT_MEASURED
    one_status: float = 0.0
    down: float = 0.0


def _spec(cluster: str) -> ClusterSpec:
    members = [
        MemberSpec(name=f"m{i}", command=["sleep", "3600"], restart="always")
        for i in range(MEMBERS)
    ]
    return ClusterSpec(name=cluster, members=members)


def _fleet() -> _FleetFigures:
    with running_fleetd() as fleetd:
        try:
            return anyio.run(_fleet_figures, fleetd, backend_options=_UVLOOP)
        finally:
            _kill_left(fleetd)  # detached holders outlive fleetd: a failed run must not leak


async def _fleet_figures(fleetd: Fleetd) -> _FleetFigures:
    figures = _FleetFigures()
    names = [f"c{i}" for i in range(CLUSTERS)]
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(Client(fleetd.socket_path, timeout=UP_TIMEOUT))
            for _ in names
        ]
        cpu = cpu_seconds(fleetd.pid)
        started = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for client, name in zip(clients, names, strict=True):
                tasks.start_soon(_up, client, name)
        figures.up = time.perf_counter() - started
        figures.up_cpu = cpu_seconds(fleetd.pid) - cpu
        every = await clients[0].member_status()
        running = [s for s in every if s.state == MemberState.RUNNING]
        if len(running) != CLUSTERS * MEMBERS:
            raise RuntimeError(f"{len(running)} members run, not {CLUSTERS * MEMBERS}")
        figures.all_status = await costed_rate(clients[0].member_status, STATUS_SECONDS, fleetd.pid)
        one = [f"c{CLUSTERS // 2}/m{MEMBERS - 1}"]
        figures.one_status = await rate(lambda: clients[0].member_status(one), STATUS_SECONDS)
        started = time.perf_counter()
        async with anyio.create_task_group() as tasks:
            for client, name in zip(clients, names, strict=True):
                tasks.start_soon(client.cluster_down, name)
        figures.down = time.perf_counter() - started
        if left := await clients[0].member_status():
            raise RuntimeError(f"{len(left)} members still live after every down")
    return figures


async def _up(client: Client, name: str) -> None:
    await client.cluster_up(_spec(name))
    await client.member_wait([f"{name}/m{i}" for i in range(MEMBERS)], timeout=UP_TIMEOUT)


def _kill_left(fleetd: Fleetd) -> None:
    """SIGKILL every holder of this fleetd still running, found by its pidfile in c/CLUSTER/
    (its members die with it: parent-death signal)."""
    for pidfile in glob.glob(os.path.join(fleetd.runtime, "c", "*", "holder.pid")):
        try:
            with open(pidfile, "rb") as f:
                pid, start_time = map(int, f.read().split())
            if _start_time(pid) == start_time:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue  # it exited meanwhile


def _start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: a recycled pid is never taken for the holder."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


# --- supervisord --------------------------------------------------------------------------


class GroupedSupervisord(Supervisord):
    """supervisord with `clusters` groups of `members` sleepers, c<i>m<j> in group c<i>."""

    def __init__(self, bin_: Path, clusters: int, members: int) -> None:
        super().__init__(bin_, clusters * members)
        self.clusters, self.members = clusters, members

    def _programs(self) -> str:
        text = ""
        for c in range(self.clusters):
            programs = [f"c{c}m{m}" for m in range(self.members)]
            text += "".join(sleeper_program(name) for name in programs)
            text += f"\n[group:c{c}]\nprograms = {','.join(programs)}\n"
        return text


def _supervisord_status_rate(sv: Supervisord) -> float:
    proxy = sv.rpc()
    every: Any = proxy.supervisor.getAllProcessInfo()
    if len(every) != sv.n:
        raise RuntimeError(f"supervisord reports {len(every)} programs, not {sv.n}")
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < STATUS_SECONDS:
        proxy.supervisor.getAllProcessInfo()
        done += 1
    return done / elapsed


def _supervisord_down(sv: Supervisord) -> float:
    """stopAllProcesses, which answers once every program has stopped."""
    proxy: xmlrpc.client.ServerProxy = sv.rpc()
    started = time.perf_counter()
    proxy.supervisor.stopAllProcesses()
    seconds = time.perf_counter() - started
    every: Any = proxy.supervisor.getAllProcessInfo()
    states = {p["statename"] for p in every}
    if states != {"STOPPED"}:
        raise RuntimeError(f"supervisord reports states {states} after stopAllProcesses")
    return seconds


# --- fleetd's registry alone, in-process ----------------------------------------------------


def _held(cluster: str) -> Held:
    """A live holder as fleetd follows it, its members starting; no process behind it."""
    spec = _spec(cluster)
    record = HolderRecord(spec=spec, dir=f"/nonexistent/c/{cluster}", log="", pid=1, state="live")
    held = Held(cluster, record, -1, {m.name: m for m in spec.members})
    for member in spec.members:
        held.update(MemberStatus(name=member.name, state=MemberState.STARTING))
    return held


async def _registry_alone() -> list[Figure]:
    """What the holders' pushes cost fleetd itself, with nothing else on the machine's mind:
    a member_wait on each cluster's members while every member is pushed running (in reads of
    10, as holders batch them), then the status of everyone asked with a cluster changing
    between asks: each push cost O(clusters) until names, wakes and encodings were kept per
    cluster (fleetd.clusters.index)."""
    root = tempfile.mkdtemp(dir="/tmp", prefix="flb-")
    try:
        async with SQLiteStore.open(os.path.join(root, "store.db")) as store:
            with PrivateDir.open(os.path.join(root, "state")) as state:
                registry = HolderRegistry(store, state)
                helds = [_held(f"c{i}") for i in range(CLUSTERS)]
                for held in helds:
                    registry.index.add_live(held)
                return [await _waits_answered(registry, helds), _every_status_rate(registry)]
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _waits_answered(registry: HolderRegistry, helds: list[Held]) -> Figure:
    me = Peer(os.getpid(), os.getuid(), os.getgid())
    pushes = [(held, f"m{i}") for i in range(MEMBERS) for held in helds]
    started = time.process_time()
    async with anyio.create_task_group() as tasks:
        for held in helds:
            names = [f"{held.name}/m{i}" for i in range(MEMBERS)]
            tasks.start_soon(registry.wait, MemberWait(id=1, names=names, wait=60), me)
        await anyio.wait_all_tasks_blocked()
        for n, (held, member) in enumerate(pushes, 1):
            registry.index.update(held, MemberStatus(name=member, state=MemberState.RUNNING))
            if n % 10 == 0:
                await anyio.lowlevel.checkpoint()
    return Figure(
        "fleetd_cpu_waits_pushes_ms",
        f"in-process: {CLUSTERS} waits, {len(pushes)} pushes",
        (time.process_time() - started) * 1e3,
        "ms",
    )


def _every_status_rate(registry: HolderRegistry) -> Figure:
    me = Peer(os.getpid(), os.getuid(), os.getgid())
    helds = list(registry.index.live.values())
    asked = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < 1.0:
        held = helds[asked % len(helds)]
        registry.index.update(held, MemberStatus(name="m0", state=MemberState.RUNNING))
        registry.status(MemberStatusRequest(id=1), me)
        asked += 1
    return Figure(
        "fleetd_every_status_changing_rps",
        "  status of everyone, 1 change between",
        asked / elapsed,
        "req/s",
    )
