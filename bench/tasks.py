"""Task runs (fleetd.tasks), on SQLite and, where there is an etcd, on etcd: runs of trivial
tasks (`true` workers, the exit_code scorer) from submit to their last receipt, with 8 worker
slots and with 1; the dispatch latency from a task's enqueue to its worker's exec; worker
events appended durably from many workers; how long `fleetctl events --follow` takes to print
an appended event; how soon past its lease deadline a silent worker's task is requeued; and
10,000 queued tasks: fleetd's RSS and what `runs show` and `tasks list` cost then.

Workers are real processes, members of fleetd's tasks cluster, as in production.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio

from bench.harness import BIN, Figure, Fleetd, Target, percentile, rss_mib, running_fleetd
from fleetctl import Client
from fleetctl.sync import SyncClient
from protocol.runs import (
    Drain,
    EventEmit,
    EventList,
    RunCancel,
    RunShow,
    RunSubmit,
)

SLEEPER = ["sh", "-c", "exec sleep 600", "sleeper"]
"""A worker that runs until stopped (the task's flags are its arguments, unused)."""
E2E_TASKS = {8: 600, 1: 200}
"""Tasks per end-to-end run, by worker slots."""
LATENCY_RUNS = 100
EMITTERS, EMIT_SECONDS = 64, 3.0
EMIT_BATCH = 16
"""Events a worker reports in one request (event_emit's batch)."""
FOLLOW_EVENTS = 300
STALE_TASKS, STALE_LEASE = 20, 0.5
QUEUED = 10_000
CLI_RUNS = 30
_UVLOOP = {"use_uvloop": True}


def measure() -> list[Figure]:
    figures = _backend("sqlite", "")
    with _etcd() as url:
        if url:
            figures += _backend("etcd", url)
    figures += _queued()
    return figures


@contextmanager
def _etcd() -> Iterator[str]:
    """An etcd's address, or "" where there is none (no binary, no etcd extra)."""
    try:
        import aetcd  # noqa: F401
    except ImportError:
        yield ""
        return
    if shutil.which("etcd") is None:
        yield ""
        return
    from tests.etcd_server import EtcdServer

    directory = tempfile.mkdtemp(dir="/tmp", prefix="flb-etcd-")
    server = EtcdServer(directory)
    try:
        server.start()
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _backend(name: str, store: str) -> list[Figure]:
    figures: list[Figure] = []
    with running_fleetd(store=store) as fleetd, _tasks_cluster_downed(fleetd):
        for slots, target in ((8, 300), (1, 100)):
            rate, cpu = _end_to_end(fleetd, slots)
            figures.append(
                Figure(
                    f"{name}_trivial_tasks_{slots}_slots_per_s",
                    f"{name}: trivial tasks, submit → receipt, {slots} slot(s)",
                    rate,
                    "tasks/s",
                    Target(target, upper=False),
                )
            )
            figures.append(
                Figure(
                    f"{name}_fleetd_cpu_per_task_{slots}_ms",
                    "  fleetd CPU per task",
                    cpu * 1e3,
                    "ms",
                )
            )
        p50, p99, submitted = _dispatch_latency(fleetd)
        figures += [
            Figure(
                f"{name}_dispatch_p50_ms",
                f"{name}: enqueue → worker exec'd, p50",
                p50,
                "ms",
                Target(5),
            ),
            Figure(f"{name}_dispatch_p99_ms", "  p99", p99, "ms", Target(50)),
            Figure(f"{name}_submit_to_exec_p50_ms", "  from the submit sent, p50", submitted, "ms"),
        ]
        figures += [
            Figure(
                f"{name}_events_per_s",
                f"{name}: worker events appended durably, {EMITTERS} workers, "
                f"{EMIT_BATCH} a request",
                anyio.run(_events_rate, fleetd, EMIT_BATCH, backend_options=_UVLOOP),
                "events/s",
                Target(20_000, upper=False),
            ),
            Figure(
                f"{name}_events_single_per_s",
                "  one a request",
                anyio.run(_events_rate, fleetd, 1, backend_options=_UVLOOP),
                "events/s",
            ),
        ]
        lag = _follow_lag(fleetd)
        figures.append(
            Figure(
                f"{name}_follow_lag_p99_ms",
                f"{name}: events --follow lag, p99",
                lag,
                "ms",
                Target(20),
            )
        )
        stale = _stale_lag(fleetd)
        figures.append(
            Figure(
                f"{name}_stale_requeue_ms",
                f"{name}: stale → requeued past the lease deadline (max of {STALE_TASKS})",
                stale,
                "ms",
                Target(100),
            )
        )
    return figures


@contextmanager
def _tasks_cluster_downed(fleetd: Fleetd) -> Iterator[None]:
    """The holder of the workers' slots outlives fleetd, as every holder does: down it."""
    try:
        yield
    finally:
        with SyncClient(fleetd.socket_path) as client:
            client.cluster_down("fleetd.tasks")


# -- helpers ---------------------------------------------------------------------------------


def _run_text(tasks: list[dict[str, Any]], workers: list[dict[str, Any]]) -> str:
    return json.dumps({"name": "bench", "task_specs": tasks, "worker_specs": workers})


def _tasks(count: int, prefix: str = "t") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{n}", "name": "trivial", "instructions": "x"} for n in range(count)]


def _worker(command: list[str], slots: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "id": "w",
        "name": "worker",
        "host": {"kind": "local"},
        "command": command,
        "max_concurrent_tasks": slots,
        **fields,
    }


def _submit(client: SyncClient, text: str) -> str:
    return str(client.request(RunSubmit, text=text, format="json").run.id)


def _wait_ended(client: SyncClient, run: str, timeout: float = 300.0) -> None:
    """Polls the run's own summary: the run list would cost fleetd more with every run the
    bench has made, and load it while the next figure is measured."""
    deadline = time.monotonic() + timeout
    while _status(client, run) not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{run} did not end in {timeout}s")
        time.sleep(0.02)


def _status(client: SyncClient, run: str) -> str:
    return client.request(RunShow, run=run).summary.status


def _events_of(client: SyncClient, run: str) -> list[dict[str, Any]]:
    page = client.request(EventList, run=run, limit=1_000_000)
    return [json.loads(bytes(raw)) for raw in page.events]


# -- figures ---------------------------------------------------------------------------------


def _end_to_end(fleetd: Fleetd, slots: int) -> tuple[float, float]:
    """Tasks per second from submit to the run's end, and fleetd's CPU seconds per task."""
    from bench.harness import cpu_seconds

    count = E2E_TASKS[slots]
    text = _run_text(_tasks(count), [_worker(["true"], slots)])
    with SyncClient(fleetd.socket_path) as client:
        _wait_ended(client, _submit(client, _run_text(_tasks(slots), [_worker(["true"], slots)])))
        cpu = cpu_seconds(fleetd.pid)
        started = time.perf_counter()
        run = _submit(client, text)
        _wait_ended(client, run)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(fleetd.pid) - cpu
        detail = client.request(RunShow, run=run)
    if detail.summary.tasks != {"done": count}:
        raise RuntimeError(f"{run}: {detail.summary.tasks}")
    return count / elapsed, cpu / count


def _dispatch_latency(fleetd: Fleetd) -> tuple[float, float, float]:
    """Runs of one task, one after another: from its queued event to its worker's first
    instruction (bash's $EPOCHREALTIME, written where the bench reads it), p50 and p99; and
    the p50 from the submit's sending (what the submitter sees: it adds the run file's
    parsing, its id and its files)."""
    directory = tempfile.mkdtemp(dir="/tmp", prefix="flb-lat-")
    mark = os.path.join(directory, "t")
    worker = _worker(["bash", "-c", f'echo "$EPOCHREALTIME" > {mark}'])
    samples, submitted = [], []
    try:
        with SyncClient(fleetd.socket_path) as client:
            for n in range(LATENCY_RUNS):
                sent = time.time()
                run = _submit(client, _run_text(_tasks(1), [worker]))
                _wait_ended(client, run)
                queued = next(e for e in _events_of(client, run) if e["state"] == "queued")
                with open(mark) as file:
                    exec_at = float(file.read())
                if n >= 3:  # the first ones warm the holder up
                    samples.append((exec_at - _epoch(queued["timestamp"])) * 1e3)
                    submitted.append((exec_at - sent) * 1e3)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(samples), percentile(samples, 99), statistics.median(submitted)


async def _events_rate(fleetd: Fleetd, batch: int) -> float:
    """Heartbeats of EMITTERS running tasks' attempts, each from its own connection, back to
    back for EMIT_SECONDS, `batch` a request: events appended (durably: each answer comes after
    the commit)."""
    text = _run_text(_tasks(EMITTERS), [_worker(SLEEPER, EMITTERS)])
    async with Client(fleetd.socket_path) as control:
        run = str((await control.request(RunSubmit, text=text, format="json")).run.id)
        attempts = [f"{run}/t{n}/1" for n in range(EMITTERS)]
        await _all_running(control, run)
        counts = [0] * EMITTERS
        heartbeat = {"state": "heartbeat"}
        events: dict[str, Any] = (
            {"events": [heartbeat] * batch} if batch > 1 else {"event": heartbeat}
        )
        deadline = time.perf_counter() + EMIT_SECONDS

        async def emit(index: int) -> None:
            async with Client(fleetd.socket_path) as client:
                while time.perf_counter() < deadline:
                    await client.request(EventEmit, attempt_id=attempts[index], **events)
                    counts[index] += batch

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for index in range(EMITTERS):
                tg.start_soon(emit, index)
        elapsed = time.perf_counter() - started
        await control.request(RunCancel, run=run, timeout=60)
    return sum(counts) / elapsed


async def _all_running(client: Client, run: str) -> None:
    with anyio.fail_after(60):
        while True:
            detail = await client.request(RunShow, run=run)
            if detail.summary.tasks.get("running", 0) == EMITTERS:
                return
            await anyio.sleep(0.05)


def _follow_lag(fleetd: Fleetd) -> float:
    """p99 milliseconds from an event's emit to `fleetctl events --follow` printing it."""
    text = _run_text(_tasks(1), [_worker(SLEEPER)])
    with SyncClient(fleetd.socket_path) as client:
        run = _submit(client, text)
        while client.request(RunShow, run=run).summary.tasks.get("running", 0) != 1:
            time.sleep(0.02)
        follower = subprocess.Popen(
            [str(BIN / "fleetctl"), "events", "--run", run, "--follow"],
            env=fleetd.env,
            stdout=subprocess.PIPE,
        )
        assert follower.stdout is not None
        try:
            while json.loads(follower.stdout.readline())["state"] != "running":
                pass
            lags = []
            for _ in range(FOLLOW_EVENTS):
                sent = time.perf_counter()
                emitted = client.request(
                    EventEmit, attempt_id=f"{run}/t0/1", event={"state": "heartbeat"}
                )
                if not emitted.seq:
                    failed = [e for e in _events_of(client, run) if e["state"] == "failed"]
                    raise RuntimeError(f"heartbeat not appended: {emitted.message}; {failed}")
                follower.stdout.readline()
                lags.append((time.perf_counter() - sent) * 1e3)
        finally:
            follower.kill()
            follower.wait()
        client.request(RunCancel, run=run, timeout=60)
    return percentile(lags, 99)


def _stale_lag(fleetd: Fleetd) -> float:
    """Silent workers (they never heartbeat) with a short lease: how long after each one's
    lease deadline its task was requeued (its `queued` event after `stale`); the worst."""
    worker = _worker(SLEEPER, STALE_TASKS, lease_seconds=STALE_LEASE)
    tasks = [dict(t, retry_policy={"max_attempts": 1}) for t in _tasks(STALE_TASKS)]
    with SyncClient(fleetd.socket_path) as client:
        run = _submit(client, _run_text(tasks, [worker]))
        _wait_ended(client, run, timeout=120)
        found = _events_of(client, run)
    lags = []
    for event in found:
        if event["state"] == "leased":
            deadline = _epoch(event["lease_expires_at"])
            ended = next(
                e for e in found if e["task_id"] == event["task_id"] and e["state"] == "failed"
            )
            if ended["reason"] != "stale":
                raise RuntimeError(f"task {event['task_id']} failed otherwise: {ended['reason']}")
            lags.append((_epoch(ended["timestamp"]) - deadline) * 1e3)
    return max(lags)


def _queued() -> list[Figure]:
    """10,000 tasks queued (dispatch drained): fleetd's RSS, and the wall time of `fleetctl
    runs show` and `tasks list` against `python -c pass`."""
    text = _run_text(_tasks(QUEUED), [_worker(["true"])])
    with running_fleetd() as fleetd:
        with SyncClient(fleetd.socket_path) as client:
            client.request(Drain)
            before = rss_mib(fleetd.pid)
            run = _submit(client, text)
            rss = rss_mib(fleetd.pid)
        show, show_bare = _walls(fleetd, "runs", "show", run)
        listed, listed_bare = _walls(fleetd, "tasks", "list", "--run", run)
    return [
        Figure(
            "queued_10k_fleetd_rss_mib",
            f"{QUEUED:,} queued tasks: fleetd RSS",
            rss,
            "MiB",
            Target(100),
        ),
        Figure("queued_10k_fleetd_rss_before_mib", "  before the run", before, "MiB"),
        Figure(
            "queued_10k_runs_show_ratio",
            "  `fleetctl runs show` ÷ python -c pass",
            show / show_bare,
            "x",
            Target(1.5),
        ),
        Figure(
            "queued_10k_tasks_list_ratio",
            "  `fleetctl tasks list` ÷ python -c pass",
            listed / listed_bare,
            "x",
            Target(1.5),
        ),
        Figure("queued_10k_runs_show_ms", "  `fleetctl runs show` (median)", show, "ms"),
    ]


def _walls(fleetd: Fleetd, *argv: str) -> tuple[float, float]:
    """Median wall milliseconds of `fleetctl ARGV`, and of `python -c pass` run in turn with
    it (so that both see the same load as it drifts)."""
    commands = ([str(BIN / "fleetctl"), *argv], fleetd.env), ([sys.executable, "-c", "pass"], None)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(CLI_RUNS):
        for (command, env), taken in zip(commands, times, strict=True):
            started = time.perf_counter()
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
            taken.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _epoch(stamp: str) -> float:
    from protocol.tasks import epoch

    return epoch(stamp)
