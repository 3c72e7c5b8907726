"""Task runs under a real fleetd: runs submitted, tasks dispatched to worker slots (members of
the run's cluster, real processes), followed through their events to receipts.

Workers are tests/task_worker.py: each does what its task's instructions (a JSON plan) say.
"""

import contextlib
import hashlib
import hmac
import http.server
import itertools
import json
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleetctl.sync import SyncClient
from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.store.sqlite import SQLiteStore
from fleetd.tasks import records
from fleetd.tasks.service import CLUSTER, TaskService
from protocol.claims import ClaimListRequest
from protocol.errors import Absent, InvalidRequest, StoreFull, Unsupported
from protocol.outcomes import Outcome
from protocol.runs import (
    Drain,
    EventEmit,
    EventList,
    ReceiptListRequest,
    ReceiptScore,
    RunCancel,
    RunDetail,
    RunListRequest,
    RunShow,
    RunSubmit,
    TaskListRequest,
    TaskView,
)
from protocol.tables import tasks_table
from tests.etcd_server import EtcdServer, need_etcd
from tests.processes import (
    Fleetd,
    fill_disk,
    kill_holders,
    running_fleetd,
    wait_gone,
    wait_until,
)
from tests.processes import fleetctl as run_fleetctl

WORKER = [sys.executable, os.path.join(os.path.dirname(__file__), "task_worker.py")]
ME = Peer(os.getpid(), os.getuid(), os.getgid())


@pytest.fixture
def daemon(holders: Fleetd) -> Fleetd:
    """fleetd, whose holders (its task workers' too) are gone at the end."""
    return holders


@pytest.fixture(params=["sqlite", "etcd"])
def on_either(request: pytest.FixtureRequest, tempdir: str) -> Iterator[Fleetd]:
    """fleetd on SQLite, then on a real etcd."""
    with contextlib.ExitStack() as stack:
        env = {}
        if request.param == "etcd":
            need_etcd()
            etcd = stack.enter_context(EtcdServer(tempdir))
            env["FLEET_STORE"] = etcd.url
        root = os.path.join(tempdir, "d")
        os.mkdir(root)
        fleetd = stack.enter_context(running_fleetd(root, **env))
        try:
            yield fleetd
        finally:
            kill_holders(fleetd)


def worker(wid: str = "w1", slots: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "id": wid,
        "name": f"worker {wid}",
        "host": {"kind": "local"},
        "command": WORKER,
        "max_concurrent_tasks": slots,
        **fields,
    }


def task(tid: str, plan: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return {"id": tid, "name": f"task {tid}", "instructions": json.dumps(plan or {}), **fields}


def submit(daemon: Fleetd, tasks: list[dict[str, Any]], workers: list[dict[str, Any]]) -> str:
    text = json.dumps({"name": "test run", "task_specs": tasks, "worker_specs": workers})
    with SyncClient(daemon.socket_path) as client:
        result = client.request(RunSubmit, text=text, format="json", source="run.json")
    assert result.outcome is Outcome.ACQUIRED
    return str(result.run.id)


def task_members(daemon: Fleetd) -> list[str]:
    """The members of the workers' cluster."""
    with SyncClient(daemon.socket_path) as client:
        return [s.name for s in client.member_status() if s.cluster == "fleetd.tasks"]


def show(daemon: Fleetd, run: str) -> RunDetail:
    with SyncClient(daemon.socket_path) as client:
        return client.request(RunShow, run=run)


def views(daemon: Fleetd, run: str) -> list[TaskView]:
    """The run's tasks, every page."""
    found: list[TaskView] = []
    after = ""
    with SyncClient(daemon.socket_path) as client:
        while True:
            page = client.request(TaskListRequest, run=run, after=after)
            found += page.tasks
            if not page.next:
                return found
            after = page.next


def wait_run(daemon: Fleetd, run: str, timeout: float = 20.0) -> RunDetail:
    """The run once it ended."""
    deadline = time.monotonic() + timeout
    while True:
        detail = show(daemon, run)
        if detail.summary.status in ("completed", "failed", "cancelled"):
            return detail
        assert time.monotonic() < deadline, (detail.summary, daemon.log()[-3000:])
        time.sleep(0.05)


def wait_task(daemon: Fleetd, run: str, tid: str, state: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = {t.entry.task_id: t for t in views(daemon, run)}
        if found[tid].state == state:
            return found[tid]
        assert time.monotonic() < deadline, (found[tid], daemon.log()[-3000:])
        time.sleep(0.02)


def events(daemon: Fleetd, run: str, after: int = 0) -> list[dict[str, Any]]:
    with SyncClient(daemon.socket_path) as client:
        page = client.request(EventList, run=run, after={run: after}, limit=100000)
    return [json.loads(bytes(raw)) for raw in page.events]


def receipts(daemon: Fleetd, run: str) -> dict[str, Any]:
    with SyncClient(daemon.socket_path) as client:
        found = client.request(ReceiptListRequest, run=run).receipts
    return {r.task_id: r for r in found}


def marks(path: str) -> list[list[str]]:
    """What task_worker's `mark` wrote: one [task, attempt, pid, cwd] per start."""
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [line.split() for line in file]


def wait_marked(path: str, count: int, timeout: float = 20.0) -> list[list[str]]:
    deadline = time.monotonic() + timeout
    while len(found := marks(path)) < count:
        assert time.monotonic() < deadline, found
        time.sleep(0.02)
    return found


# -- a run completes ------------------------------------------------------------------------


def test_a_run_of_twenty_tasks_over_four_workers_completes_with_a_receipt_each(
    on_either: Fleetd,
) -> None:
    daemon = on_either
    mark = os.path.join(daemon.root, "marks")
    tasks = [task(f"t{n}", {"mark": mark, "sleep": 0.05}) for n in range(20)]
    workers = [worker(f"w{n}") for n in range(4)]
    run = submit(daemon, tasks, workers)
    detail = wait_run(daemon, run)
    assert detail.summary.status == "completed"
    assert detail.summary.tasks == {"done": 20}
    found = receipts(daemon, run)
    assert sorted(found) == sorted(f"t{n}" for n in range(20))
    assert {r.result for r in found.values()} == {"pass"}
    assert {r.worker_id for r in found.values()} == {"w0", "w1", "w2", "w3"}


def test_at_most_max_concurrent_tasks_run_on_a_worker_at_once(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    tasks = [task(f"t{n}", {"mark": mark, "sleep": 1.5}) for n in range(4)]
    run = submit(daemon, tasks, [worker(slots=2)])
    wait_marked(mark, 2)
    time.sleep(0.5)
    assert len(marks(mark)) == 2
    assert wait_run(daemon, run).summary.tasks == {"done": 4}


def test_a_workers_slots_are_members_of_the_tasks_cluster_and_stay_once_it_ended(
    daemon: Fleetd,
) -> None:
    run = submit(daemon, [task("t1"), task("t2")], [worker(slots=2)])
    wait_run(daemon, run)
    with SyncClient(daemon.socket_path) as client:
        slots = {m.name: m for m in client.member_status(["fleetd.tasks"])}
    assert sorted(slots) == [f"{run}.w1.1", f"{run}.w1.2"]
    assert {m.state for m in slots.values()} == {"stopped"}
    assert {m.exit_code for m in slots.values()} == {0}


def test_a_worker_is_given_its_task_by_flags_and_runs_in_its_workspace(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    space = os.path.join(daemon.root, "space")
    os.mkdir(space)
    run = submit(daemon, [task("t1", {"mark": mark}, workspace=space)], [worker()])
    wait_run(daemon, run)
    ((tid, attempt, _, cwd),) = marks(mark)
    assert (tid, attempt, cwd) == ("t1", f"{run}/t1/1", space)


def test_a_workers_instructions_are_beside_the_control_socket_until_its_run_ends(
    daemon: Fleetd,
) -> None:
    mark = os.path.join(daemon.root, "marks")
    plan = {"mark": mark, "sleep": 30}
    run = submit(daemon, [task("t", plan)], [worker()])
    wait_marked(mark, 1)
    with open(os.path.join(daemon.root, "tasks", run, "t.md")) as file:
        assert json.loads(file.read()) == plan
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)
    wait_run(daemon, run)
    wait_until(lambda: not os.path.exists(os.path.join(daemon.root, "tasks", run)))


def test_instructions_are_not_written_through_a_link(daemon: Fleetd) -> None:
    elsewhere = os.path.join(daemon.root, "elsewhere")
    os.mkdir(elsewhere)
    os.symlink(elsewhere, os.path.join(daemon.root, "tasks"))
    run = submit(daemon, [task("t", retry_policy={"max_attempts": 1})], [worker()])
    assert wait_run(daemon, run).summary.status == "failed"
    (view,) = views(daemon, run)
    assert "symbolic link" in view.error, view.error
    assert os.listdir(elsewhere) == []


def test_instructions_of_runs_no_longer_running_are_removed_at_start_up(daemon: Fleetd) -> None:
    left = os.path.join(daemon.root, "tasks", "run-99")
    os.makedirs(left)
    with open(os.path.join(left, "t.md"), "w") as file:
        file.write("{}")
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    daemon.start()
    assert not os.path.exists(left)


def test_higher_priority_tasks_are_dispatched_first_then_older_ones(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    tasks = [
        task("low", {"mark": mark}),
        task("high", {"mark": mark}, priority=5),
        task("low2", {"mark": mark}),
        task("mid", {"mark": mark}, priority=1),
    ]
    run = submit(daemon, tasks, [worker()])
    wait_run(daemon, run)
    assert [m[0] for m in marks(mark)] == ["high", "mid", "low", "low2"]


def test_tasks_go_only_to_workers_with_their_capabilities_and_labels(daemon: Fleetd) -> None:
    tasks = [
        task("gpu", capabilities=["gpu"]),
        task("eu", labels={"region": "eu"}),
        task("any"),
    ]
    workers = [worker("plain"), worker("big", capabilities=["gpu"], labels={"region": "eu"})]
    run = submit(daemon, tasks, workers)
    wait_run(daemon, run)
    found = receipts(daemon, run)
    assert found["gpu"].worker_id == "big"
    assert found["eu"].worker_id == "big"


def test_a_task_no_worker_can_take_is_refused_at_submit(daemon: Fleetd) -> None:
    with pytest.raises(InvalidRequest, match="no worker has its capabilities"):
        submit(daemon, [task("t", capabilities=["gpu"])], [worker()])


@pytest.mark.parametrize(
    "host", [{"kind": "ssh", "host": "example.org"}, {"kind": "docker", "image": "alpine"}]
)
def test_workers_on_other_hosts_are_refused_as_unsupported(
    daemon: Fleetd, host: dict[str, str]
) -> None:
    with pytest.raises(Unsupported, match="not supported yet"):
        submit(daemon, [task("t")], [worker(host=host)])


# -- failures and retries -------------------------------------------------------------------


def test_a_failed_attempt_is_retried_after_the_backoff_until_its_attempts_run_out(
    on_either: Fleetd,
) -> None:
    daemon = on_either
    mark = os.path.join(daemon.root, "marks")
    policy = {"max_attempts": 3, "initial_backoff_seconds": 0.3, "backoff_multiplier": 2}
    run = submit(daemon, [task("t", {"mark": mark, "exit": 3}, retry_policy=policy)], [worker()])
    detail = wait_run(daemon, run)
    assert detail.summary.status == "failed"
    (view,) = views(daemon, run)
    assert (view.state, view.entry.attempts, view.result) == ("failed", 3, "fail")
    found = events(daemon, run)
    starts = [e["timestamp"] for e in found if e["state"] == "starting"]
    failed = [e for e in found if e["state"] == "failed"]
    assert [e.get("recoverable", False) for e in failed] == [True, True, False]
    assert all(e["reason"] == "exited with code 3" for e in failed)
    gaps = [_seconds(b) - _seconds(a) for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, gaps
    assert receipts(daemon, run)["t"].result == "fail"


def test_a_worker_killed_mid_task_is_seen_and_its_task_retried(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    policy = {"initial_backoff_seconds": 0.2}
    run = submit(daemon, [task("t", {"mark": mark, "sleep": 30}, retry_policy=policy)], [worker()])
    ((_, _, pid, _),) = wait_marked(mark, 1)
    os.kill(int(pid), signal.SIGKILL)
    second = wait_marked(mark, 2)
    assert second[1][1] == f"{run}/t/2"
    reasons = [e["reason"] for e in events(daemon, run) if e["state"] == "failed"]
    assert reasons == ["killed by signal 9"]
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)


def test_a_worker_that_stops_heartbeating_is_declared_stale_and_its_task_requeued(
    daemon: Fleetd,
) -> None:
    mark = os.path.join(daemon.root, "marks")
    silent = worker(lease_seconds=1.0, command=["sh", "-c", f"echo $$ >> {mark}; exec sleep 30"])
    policy = {"max_attempts": 2, "initial_backoff_seconds": 0.1}
    run = submit(daemon, [task("t", retry_policy=policy)], [silent])
    wait_run(daemon, run)
    (view,) = views(daemon, run)
    assert (view.state, view.entry.attempts) == ("failed", 2)
    found = events(daemon, run)
    stale = [e for e in found if e["state"] == "stale"]
    assert len(stale) == 2
    assert all("last_heartbeat_at" in e for e in stale)
    assert [e.get("recoverable", False) for e in found if e["state"] == "failed"] == [True, False]
    with open(mark) as pids:
        for pid in pids.read().split():
            assert wait_gone(int(pid), 5)  # each stale worker was stopped


def test_a_worker_that_heartbeats_outlives_its_lease(daemon: Fleetd) -> None:
    plan = {"sleep": 4.0, "heartbeat": 0.1}
    run = submit(daemon, [task("t", plan)], [worker(lease_seconds=2.0)])
    detail = wait_run(daemon, run)
    assert views(daemon, run)[0].entry.attempts == 1
    assert detail.summary.status == "completed"


def test_a_task_past_its_timeout_is_stopped_and_receipted_timeout(daemon: Fleetd) -> None:
    policy = {"max_attempts": 1}
    run = submit(
        daemon,
        [task("t", {"sleep": 30, "heartbeat": 0.1}, timeout_seconds=0.5, retry_policy=policy)],
        [worker()],
    )
    started = time.monotonic()
    wait_run(daemon, run)
    assert time.monotonic() - started < 10
    assert views(daemon, run)[0].result == "timeout"
    assert receipts(daemon, run)["t"].result == "timeout"


def test_a_fail_result_line_fails_the_attempt(daemon: Fleetd) -> None:
    plan = {"result": {"kind": "fail", "summary": "tests red"}}
    run = submit(daemon, [task("t", plan, retry_policy={"max_attempts": 1})], [worker()])
    wait_run(daemon, run)
    assert views(daemon, run)[0].error == "reported fail: tests red"


def test_a_success_result_line_is_kept_in_the_receipt(daemon: Fleetd) -> None:
    plan = {"result": {"kind": "fork", "summary": "forked", "branch": "b1", "rev": "abc"}}
    run = submit(daemon, [task("t", plan)], [worker()])
    wait_run(daemon, run)
    outcome = receipts(daemon, run)["t"].outcome
    assert (outcome.kind, outcome.branch, outcome.rev) == ("fork", "b1", "abc")


REGEX = {"kind": "regex_match", "path": "out.txt"}
JSON_PATH = {"kind": "json_path", "path": "r.json", "expression": "$.tests.passed"}


# -- scorers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scorer", "write", "result"),
    [
        ({"kind": "file_exists", "path": "out.txt"}, {"out.txt": "x"}, "pass"),
        ({"kind": "file_exists", "path": "out.txt"}, {}, "fail"),
        (
            {"kind": "regex_match", "path": "out.txt", "pattern": "^ok [0-9]+$"},
            {"out.txt": "a\nok 12\n"},
            "pass",
        ),
        ({"kind": "regex_match", "path": "out.txt", "pattern": "^ok$"}, {"out.txt": "no"}, "fail"),
        (
            {"kind": "json_path", "path": "r.json", "expression": "$.tests.passed"},
            {"r.json": '{"tests": {"passed": true}}'},
            "pass",
        ),
        (
            {"kind": "json_path", "path": "r.json", "expression": "$.tests.passed"},
            {"r.json": '{"tests": {"passed": false}}'},
            "fail",
        ),
    ],
)
def test_a_scorer_gives_the_receipt_its_result(
    daemon: Fleetd, scorer: dict[str, str], write: dict[str, str], result: str
) -> None:
    run = submit(daemon, [task("t", {"write": write}, scorer=scorer)], [worker()])
    wait_run(daemon, run)
    assert receipts(daemon, run)["t"].result == result


def test_a_scorer_does_not_follow_a_link_out_of_the_workspace(daemon: Fleetd) -> None:
    space = os.path.join(daemon.root, "space")
    os.mkdir(space)
    secret = os.path.join(daemon.root, "secret")
    with open(secret, "w") as file:
        file.write("ok")
    os.symlink(secret, os.path.join(space, "out.txt"))
    scorer = {"kind": "regex_match", "path": "out.txt", "pattern": "ok"}
    run = submit(daemon, [task("t", workspace=space, scorer=scorer)], [worker()])
    wait_run(daemon, run)
    assert receipts(daemon, run)["t"].result == "fail"


def test_a_manual_scorer_leaves_the_receipt_pending_until_scored(on_either: Fleetd) -> None:
    daemon = on_either
    run = submit(daemon, [task("t", scorer={"kind": "manual"})], [worker()])
    wait_task(daemon, run, "t", "scoring")
    assert receipts(daemon, run)["t"].pending
    assert show(daemon, run).summary.status == "running"
    with SyncClient(daemon.socket_path) as client:
        scored = client.request(ReceiptScore, task="t", result="pass", notes="looks right")
        again = client.request(ReceiptScore, task=f"{run}/t", result="pass")
    assert scored.outcome is Outcome.OK
    assert again.outcome is Outcome.ALREADY_ACQUIRED
    receipt = receipts(daemon, run)["t"]
    assert (receipt.result, receipt.pending, receipt.score.notes) == ("pass", False, "looks right")
    assert wait_run(daemon, run).summary.status == "completed"


# -- events ---------------------------------------------------------------------------------


def test_events_are_numbered_without_gaps_in_each_run(on_either: Fleetd) -> None:
    daemon = on_either
    runs = [
        submit(
            daemon,
            [task(f"t{n}", {"heartbeat": 0.01, "sleep": 0.1}) for n in range(5)],
            [worker(slots=3)],
        )
        for _ in range(2)
    ]
    for run in runs:
        wait_run(daemon, run)
        seqs = [e["seq"] for e in events(daemon, run)]
        assert seqs == list(range(1, len(seqs) + 1))
        assert {e["run_id"] for e in events(daemon, run)} == {run}


def test_events_resume_after_a_seq(daemon: Fleetd) -> None:
    run = submit(daemon, [task(f"t{n}") for n in range(3)], [worker()])
    wait_run(daemon, run)
    every = events(daemon, run)
    assert events(daemon, run, after=4) == every[4:]


def test_a_follower_gets_each_new_event_as_it_is_appended(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t", {"sleep": 0.3})], [worker()])
    seen: list[dict[str, Any]] = []
    cursor: dict[str, int] = {}
    deadline = time.monotonic() + 20
    with SyncClient(daemon.socket_path) as client:
        while not any(e["state"] == "completed" for e in seen):
            page = client.request(EventList, run=run, after=cursor, wait=5.0, timeout=10.0)
            for raw in page.events:
                event = json.loads(bytes(raw))
                cursor[run] = event["seq"]
                seen.append(event)
            assert time.monotonic() < deadline
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))


def test_a_worker_reports_its_events_under_its_attempt(daemon: Fleetd) -> None:
    emitted = [
        {"state": "model_wait", "model": "m1"},
        {"state": "running_tool", "tool": "bash", "call_id": "c1"},
        {"state": "artifact", "kind": "coverage.xml", "path": "cov.xml", "size_bytes": 10},
    ]
    run = submit(daemon, [task("t", {"emit": emitted})], [worker()])
    wait_run(daemon, run)
    found = [
        e for e in events(daemon, run) if e["state"] in ("model_wait", "running_tool", "artifact")
    ]
    assert [e["state"] for e in found] == ["model_wait", "running_tool", "artifact"]
    assert found[1]["tool"] == "bash"
    (artifact,) = receipts(daemon, run)["t"].artifacts
    assert (artifact.kind, artifact.path) == ("coverage.xml", "cov.xml")


def test_a_result_reported_twice_is_counted_once(daemon: Fleetd) -> None:
    emitted = [{"state": "completed", "summary": "one"}, {"state": "completed", "summary": "two"}]
    run = submit(daemon, [task("t", {"emit": emitted})], [worker()])
    wait_run(daemon, run)
    completed = [e for e in events(daemon, run) if e["state"] == "completed"]
    summaries = [e.get("summary") for e in completed]
    assert summaries == ["one", "one"]  # the worker's own report, then its exit's


def test_an_event_under_an_attempt_that_is_not_the_tasks_own_is_not_owned(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t")], [worker()])
    wait_run(daemon, run)
    with SyncClient(daemon.socket_path) as client:
        result = client.request(EventEmit, attempt_id=f"{run}/t/1", event={"state": "heartbeat"})
        with pytest.raises(InvalidRequest, match="attempt id"):
            client.request(EventEmit, attempt_id="nonsense", event={"state": "heartbeat"})
        with pytest.raises(Absent):
            client.request(EventEmit, attempt_id="run-99/t/1", event={"state": "heartbeat"})
    assert result.outcome is Outcome.NOT_OWNED


def test_a_worker_cannot_report_a_state_that_is_fleetds_to_report(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t", {"sleep": 30})], [worker()])
    wait_task(daemon, run, "t", "running")
    with SyncClient(daemon.socket_path) as client:
        with pytest.raises(InvalidRequest, match="fleetd's to report"):
            client.request(EventEmit, attempt_id=f"{run}/t/1", event={"state": "stale"})
        with pytest.raises(InvalidRequest, match="invalid event"):
            client.request(EventEmit, attempt_id=f"{run}/t/1", event={"state": "running_tool"})
        client.request(RunCancel, run=run)


def test_a_batch_of_events_is_appended_in_order_with_consecutive_seqs(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t", {"sleep": 30})], [worker()])
    wait_task(daemon, run, "t", "running")
    batch = [{"state": "model_wait", "model": "m"}, {"state": "heartbeat"}, {"state": "heartbeat"}]
    with SyncClient(daemon.socket_path) as client:
        result = client.request(EventEmit, attempt_id=f"{run}/t/1", events=batch)
        client.request(RunCancel, run=run)
    found = {e["seq"]: e["state"] for e in events(daemon, run)}
    seqs = range(result.seq - 2, result.seq + 1)
    assert (result.outcome, [found[seq] for seq in seqs]) == (
        Outcome.OK,
        ["model_wait", "heartbeat", "heartbeat"],
    )


def test_one_invalid_event_refuses_its_whole_batch(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t", {"sleep": 30})], [worker()])
    wait_task(daemon, run, "t", "running")
    batch = [{"state": "heartbeat"}, {"state": "running_tool"}]
    with SyncClient(daemon.socket_path) as client:
        with pytest.raises(InvalidRequest, match="invalid event"):
            client.request(EventEmit, attempt_id=f"{run}/t/1", events=batch)
        client.request(RunCancel, run=run)
    assert "heartbeat" not in [e["state"] for e in events(daemon, run)]


def test_a_result_reported_twice_in_one_batch_is_counted_once(daemon: Fleetd) -> None:
    run = submit(daemon, [task("t", {"sleep": 30})], [worker()])
    wait_task(daemon, run, "t", "running")
    batch = [{"state": "completed", "summary": "one"}, {"state": "completed", "summary": "two"}]
    with SyncClient(daemon.socket_path) as client:
        result = client.request(EventEmit, attempt_id=f"{run}/t/1", events=batch)
        client.request(RunCancel, run=run)
    completed = [e.get("summary") for e in events(daemon, run) if e["state"] == "completed"]
    assert (result.outcome, completed) == (Outcome.ALREADY_ACQUIRED, ["one"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "an event or a batch"),
        ({"event": {"state": "heartbeat"}, "events": [{"state": "heartbeat"}]}, "not both"),
        ({"events": [{"state": "heartbeat"}] * 1001}, "at most 1000"),
    ],
)
def test_an_emit_gives_one_event_or_a_batch_of_at_most_1000(
    daemon: Fleetd, fields: dict[str, Any], message: str
) -> None:
    with SyncClient(daemon.socket_path) as client, pytest.raises(InvalidRequest, match=message):
        client.request(EventEmit, attempt_id="run-1/t/1", **fields)


def test_a_runs_worker_slots_are_journaled_as_members_of_the_tasks_cluster(
    daemon: Fleetd,
) -> None:
    run = submit(daemon, [task(f"t{n}") for n in range(3)], [worker(slots=3)])
    wait_run(daemon, run)
    wanted = {f"fleetd.tasks:{run}.w1.{n}" for n in (1, 2, 3)}
    with SyncClient(daemon.socket_path) as client:
        for _ in range(100):
            keys = {c.key for c in client.request(ClaimListRequest, kind="member").claims}
            if wanted <= keys:
                break
            time.sleep(0.05)
    assert wanted <= keys


# -- cancel, drain, restart -----------------------------------------------------------------


def test_cancel_stops_the_workers_and_cancels_every_task(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    run = submit(
        daemon, [task(f"t{n}", {"mark": mark, "sleep": 30}) for n in range(4)], [worker(slots=2)]
    )
    running = wait_marked(mark, 2)
    with SyncClient(daemon.socket_path) as client:
        result = client.request(RunCancel, run=run)
        again = client.request(RunCancel, run=run)
    assert result.outcome is Outcome.RELEASED
    assert again.outcome is Outcome.ALREADY_RELEASED
    for _, _, pid, _ in running:
        assert wait_gone(int(pid), 5)
    detail = show(daemon, run)
    assert detail.summary.status == "cancelled"
    assert {t.state for t in views(daemon, run)} == {"cancelled"}
    assert len(marks(mark)) == 2


def test_drain_waits_for_the_tasks_in_flight_and_dispatches_no_more(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    run = submit(
        daemon, [task(f"t{n}", {"mark": mark, "sleep": 0.5}) for n in range(3)], [worker()]
    )
    wait_marked(mark, 1)
    with SyncClient(daemon.socket_path) as client:
        started = time.monotonic()
        drained = client.request(Drain, wait=10.0, timeout=15.0)
        waited = time.monotonic() - started
        time.sleep(0.5)
        assert len(marks(mark)) == 1
        client.request(Drain, resume=True)
    assert (drained.draining, drained.in_flight) == (True, 0)
    assert waited > 0.2
    assert wait_run(daemon, run).summary.tasks == {"done": 3}


def test_a_run_goes_on_after_fleetd_is_killed_mid_run(on_either: Fleetd) -> None:
    daemon = on_either
    mark = os.path.join(daemon.root, "marks")
    tasks = [task(f"t{n}", {"mark": mark, "sleep": 1.0}) for n in range(4)]
    run = submit(daemon, tasks, [worker(slots=2)])
    running = wait_marked(mark, 2)
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    daemon.start()
    detail = wait_run(daemon, run)
    assert detail.summary.status == "completed"
    assert detail.summary.tasks == {"done": 4}
    attempts = {t.entry.task_id: t.entry.attempts for t in views(daemon, run)}
    # the workers that ran through the kill were followed again, not started again; a task
    # leased at the moment of the kill may have had its worker not started yet: retried
    failures = [e.get("reason") for e in events(daemon, run) if e["state"] == "failed"]
    assert {attempts[tid] for tid, *_ in running} == {1}, (attempts, running, failures)


def test_a_worker_that_died_while_fleetd_was_down_is_retried(daemon: Fleetd) -> None:
    mark = os.path.join(daemon.root, "marks")
    run = submit(
        daemon,
        [task("t", {"mark": mark, "sleep": 30}, retry_policy={"initial_backoff_seconds": 0.1})],
        [worker()],
    )
    ((_, _, pid, _),) = wait_marked(mark, 1)
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    os.kill(int(pid), signal.SIGKILL)
    wait_gone(int(pid), 5)
    daemon.start()
    second = wait_marked(mark, 2)
    assert second[1][1] == f"{run}/t/2"
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)


def test_a_run_on_a_full_disk_loses_no_event_and_ends_once_space_returns(
    on_small_disk: Fleetd,
) -> None:
    daemon = on_small_disk
    mark = os.path.join(daemon.root, "marks")
    tasks = [task(f"t{n}", {"mark": mark, "sleep": 0.3}) for n in range(3)]
    run = submit(daemon, tasks, [worker()])
    wait_marked(mark, 1)
    filler = fill_disk(daemon.state_dir)
    wait_marked(mark, 3)  # the tasks go on: their files were written at submit
    time.sleep(0.5)
    assert show(daemon, run).summary.status == "running"  # until its end is durable
    assert "events_write_postponed" in daemon.log()
    os.unlink(filler)
    assert wait_run(daemon, run).summary.tasks == {"done": 3}
    assert "events_written_late" in daemon.log()
    assert daemon.process is not None
    daemon.process.kill()  # what memory held is in the store: a restart finds it all
    daemon.process.wait()
    daemon.start()
    assert wait_run(daemon, run).summary.tasks == {"done": 3}
    found = events(daemon, run)
    assert [e["seq"] for e in found] == list(range(1, len(found) + 1))
    assert sorted(e["task_id"] for e in found if e["state"] == "completed") == [
        "t0",
        "t1",
        "t2",
    ]
    assert sorted(receipts(daemon, run)) == ["t0", "t1", "t2"]


def test_a_worker_whose_lease_a_crash_kept_from_the_store_is_stopped_and_its_attempt_counted(
    daemon: Fleetd,
) -> None:
    """A worker starts before its lease is durable: fleetd killed in between leaves a worker
    running for a task the store says is queued."""
    mark = os.path.join(daemon.root, "marks")
    run = submit(daemon, [task("t", {"mark": mark, "sleep": 30})], [worker()])
    ((_, _, pid, _),) = wait_marked(mark, 1)
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    key = f"runs/task/{run}/t"
    with contextlib.closing(sqlite3.connect(os.path.join(daemon.state_dir, "fleet.db"))) as db:
        (value,) = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        unleased = {
            k: v
            for k, v in json.loads(value).items()
            if k in ("task_id", "priority", "enqueued_at")
        }
        db.execute("UPDATE kv SET value = ? WHERE key = ?", (json.dumps(unleased), key))
        db.commit()
    daemon.start()
    wait_gone(int(pid), 10)
    second = wait_marked(mark, 2)
    assert second[1][1] == f"{run}/t/2"
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)


def test_a_worker_of_a_run_a_crash_kept_from_the_store_is_removed_at_start_up(
    daemon: Fleetd,
) -> None:
    """A small run's first workers start while its submit is written: fleetd killed in
    between leaves a worker of a run the store does not have."""
    mark = os.path.join(daemon.root, "marks")
    run = submit(daemon, [task("t", {"mark": mark, "sleep": 30})], [worker()])
    ((_, _, pid, _),) = wait_marked(mark, 1)
    assert f"{run}.w1.1" in task_members(daemon)
    assert daemon.process is not None
    daemon.process.kill()
    daemon.process.wait()
    with contextlib.closing(sqlite3.connect(os.path.join(daemon.state_dir, "fleet.db"))) as db:
        db.execute("DELETE FROM kv WHERE key LIKE 'runs/%' AND key LIKE ?", (f"%/{run}%",))
        db.commit()
    daemon.start()
    wait_gone(int(pid), 10)
    with SyncClient(daemon.socket_path) as client, pytest.raises(Absent):
        client.request(RunShow, run=run)
    assert f"{run}.w1.1" not in task_members(daemon)
    assert "task_stray_worker_removed" in daemon.log()


@pytest.mark.anyio
async def test_a_run_whose_submit_is_not_written_is_refused_and_the_worker_it_started_stopped(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its first workers start while the submit's write is on its way: a write that fails
    takes the run back (a full disk, here a store told to refuse it)."""
    text = json.dumps(
        {"name": "r", "task_specs": [task("t", {"sleep": 30})], "worker_specs": [worker()]}
    )
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        with (
            PrivateDir.open(os.path.join(tempdir, "state")) as state,
            PrivateDir.open(os.path.join(tempdir, "run")) as runtime,
        ):
            registry = HolderRegistry(store, state)
            service = TaskService(
                store, registry, state, runtime, os.path.join(tempdir, "fleet.sock")
            )
            async with anyio.create_task_group() as tg:
                await tg.start(registry.serve, runtime)
                await tg.start(service.serve)
                txn = store.txn

                async def refusing_submits(compares: Any, success: Any = (), *rest: Any) -> Any:
                    if any(getattr(op, "key", "").startswith(records.SPECS) for op in success):
                        raise StoreFull("the store's disk is full; nothing was written")
                    return await txn(compares, success, *rest)

                monkeypatch.setattr(store, "txn", refusing_submits)
                try:
                    with pytest.raises(StoreFull):
                        await service.submit(RunSubmit(id=1, text=text, format="json"), ME)
                    (slot,) = registry.index.live[CLUSTER].statuses.values()
                    assert slot.started_at is not None and not slot.running
                    assert service.runs == {}
                    assert not await anyio.Path(tempdir, "run", "tasks", "run-1").exists()
                    monkeypatch.undo()
                    again = await service.submit(RunSubmit(id=2, text=text, format="json"), ME)
                    assert again.run.id == "run-2" and again.run.status in ("queued", "running")
                finally:  # its holder (a process of its own) goes, whatever failed
                    with anyio.CancelScope(shield=True):
                        await registry.bring_down(CLUSTER)
                    tg.cancel_scope.cancel()


def test_runs_are_listed_newest_first_a_new_one_at_the_top(daemon: Fleetd) -> None:
    def listed() -> list[str]:
        with SyncClient(daemon.socket_path) as client:
            return [summary.id for summary in client.request(RunListRequest).runs]

    first = submit(daemon, [task("a")], [worker()])
    second = submit(daemon, [task("a")], [worker()])
    assert listed() == [second, first]
    third = submit(daemon, [task("a")], [worker()])
    assert listed() == [third, second, first]


def test_tasks_list_shows_each_tasks_state_and_attempt(daemon: Fleetd) -> None:
    run = submit(daemon, [task("a", {"sleep": 30}), task("b")], [worker()])
    wait_task(daemon, run, "a", "running")
    with SyncClient(daemon.socket_path) as client:
        listed = {t.entry.task_id: t for t in client.request(TaskListRequest, run=run).tasks}
        client.request(RunCancel, run=run)
    assert listed["a"].attempt_id == f"{run}/a/1"
    assert listed["a"].entry.lease_deadline
    assert listed["b"].state == "queued"


def _seconds(stamp: str) -> float:
    from protocol.tasks import epoch

    return epoch(stamp)


# -- alerts ---------------------------------------------------------------------------------


class Hook(http.server.BaseHTTPRequestHandler):
    received: "queue.Queue[tuple[dict[str, str], bytes]]"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.put((dict(self.headers), body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, "queue.Queue[tuple[dict[str, str], bytes]]"]]:
    """A local webhook receiver: its URL and what it received."""
    received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
    handler = type("Handler", (Hook,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


def test_an_alert_after_n_attempts_is_posted_signed_and_recorded_as_escalated(
    daemon: Fleetd, hook: tuple[str, "queue.Queue[tuple[dict[str, str], bytes]]"]
) -> None:
    url, received = hook
    policy = {
        "channels": [{"kind": "webhook", "url": url, "secret": "s3cret"}],
        "after_attempts": 2,
    }
    retry = {"max_attempts": 3, "initial_backoff_seconds": 0.1}
    run = submit(
        daemon, [task("t", {"exit": 3}, retry_policy=retry, alert_policy=policy)], [worker()]
    )
    headers, body = received.get(timeout=20)
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Fleet-Signature-256"], expected)
    alert = json.loads(body)
    assert (alert["run_id"], alert["task_id"], alert["reason"], alert["attempts"]) == (
        run,
        "t",
        "attempts",
        2,
    )
    assert "exited with code 3" in alert["summary"]
    wait_run(daemon, run)
    deadline = time.monotonic() + 10
    while not (escalated := [e for e in events(daemon, run) if e["state"] == "escalated"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert escalated[0]["channel"] == "webhook"
    assert escalated[0]["alert_id"] == alert["alert_id"]
    assert received.empty()  # once, not at every attempt


def test_an_alert_fires_once_a_task_has_been_stale_for_its_minutes(
    daemon: Fleetd, hook: tuple[str, "queue.Queue[tuple[dict[str, str], bytes]]"]
) -> None:
    url, received = hook
    policy = {"channels": [{"kind": "webhook", "url": url}], "after_minutes_stale": 0.01}
    silent = worker(lease_seconds=0.5, command=["sh", "-c", "exec sleep 30", "silent"])
    run = submit(daemon, [task("t", alert_policy=policy)], [silent])
    _, body = received.get(timeout=20)
    assert json.loads(body)["reason"] == "stale"
    with SyncClient(daemon.socket_path) as client:
        client.request(RunCancel, run=run)


def test_tasks_are_listed_a_page_at_a_time_and_by_state(daemon: Fleetd) -> None:
    run = submit(daemon, [task(f"t{n}", {"sleep": 30}) for n in range(7)], [worker(slots=2)])
    wait_task(daemon, run, "t1", "running")
    with SyncClient(daemon.socket_path) as client:
        first = client.request(TaskListRequest, run=run, limit=3)
        second = client.request(TaskListRequest, run=run, limit=3, after=first.next)
        third = client.request(TaskListRequest, run=run, limit=3, after=second.next)
        busy = client.request(TaskListRequest, run=run, states=["leased", "running"])
        every = client.request(TaskListRequest, limit=4)
        rest = client.request(TaskListRequest, after=every.next)
        with pytest.raises(InvalidRequest, match="a page holds"):
            client.request(TaskListRequest, limit=0)
        client.request(RunCancel, run=run)
    pages = [[t.entry.task_id for t in page.tasks] for page in (first, second, third)]
    assert pages == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]
    assert (first.next, second.next, third.next) == ("t2", "t5", "")
    assert [t.entry.task_id for t in busy.tasks] == ["t0", "t1"]
    assert every.next == f"{run}/t3"
    assert len(every.tasks) + len(rest.tasks) == 7


def test_a_run_of_thousands_of_tasks_is_shown_and_listed_whole(daemon: Fleetd) -> None:
    """More tasks than one answer's frame holds (1 MiB): the list comes in pages."""
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    run = submit(daemon, [task(f"task-{n:05d}") for n in range(4000)], [worker()])
    shown = run_fleetctl("--json", "runs", "show", run, env=daemon.env)
    listed = run_fleetctl("--json", "tasks", "list", "--run", run, env=daemon.env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["summary"]["tasks"] == {"queued": 4000}
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["tasks"]) == 4000


def test_a_page_of_tasks_ends_before_it_outgrows_a_frame(daemon: Fleetd) -> None:
    """2,400 tasks of long names: their views would be over a megabyte in one page."""
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    tasks = [{**task(f"t{n}"), "name": "n" * 300} for n in range(2400)]
    run = submit(daemon, tasks, [worker()])
    with SyncClient(daemon.socket_path) as client:
        first = client.request(TaskListRequest, run=run, limit=5000)
        rest = client.request(TaskListRequest, run=run, limit=5000, after=first.next)
    assert 0 < len(first.tasks) < 2400
    assert first.next == first.tasks[-1].entry.task_id
    assert len(first.tasks) + len(rest.tasks) == 2400
    assert rest.next == ""
    listed = run_fleetctl("tasks", "list", "--run", run, env=daemon.env)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 2401


def ended_and_queued(daemon: Fleetd) -> tuple[str, str]:
    """A run that ended (a task passed, one failed), then one of five tasks queued while
    dispatch is drained: the listings' runs."""
    ended = submit(daemon, [task("ok"), task("bad", {"exit": 3})], [worker()])
    wait_run(daemon, ended)
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    queued = submit(daemon, [task(f"t{n}") for n in range(5)], [worker()])
    return ended, queued


def test_a_page_of_cells_holds_what_the_table_prints_of_each_view(daemon: Fleetd) -> None:
    _, queued = ended_and_queued(daemon)
    with SyncClient(daemon.socket_path) as client:
        every = client.request(TaskListRequest).tasks
        first = client.request(TaskListRequest, cells=True, limit=4)
        rest = client.request(TaskListRequest, cells=True, after=first.next)
    cells = [a + b for a, b in zip(first.cells, rest.cells, strict=True)]
    assert first.next == f"{queued}/t1"
    assert cells == cells_of_views(every)


def test_a_table_is_every_task_asked_for_as_its_cells_make_it(daemon: Fleetd) -> None:
    ended, queued = ended_and_queued(daemon)
    asked: list[dict[str, Any]] = [
        {},
        {"run": queued},
        {"run": ended, "states": ["failed"]},
        {"after": f"{queued}/t1"},
        {"run": queued, "after": "t3"},
    ]
    with SyncClient(daemon.socket_path) as client:
        for fields in asked:
            every = client.request(TaskListRequest, **fields).tasks
            for _ in range(2):  # made, then kept
                answer = client.request(TaskListRequest, table=True, **fields)
                assert answer.table == tasks_table(cells_of_views(every)), fields
                assert (answer.cells, answer.next) == ([], "")


def test_a_runs_table_is_made_again_once_its_tasks_change(daemon: Fleetd) -> None:
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    run = submit(daemon, [task("a"), task("b")], [worker()])
    with SyncClient(daemon.socket_path) as client:
        before = client.request(TaskListRequest, run=run, table=True).table
        client.request(RunCancel, run=run)
        after = client.request(TaskListRequest, run=run, table=True).table
    assert before.count(" queued ") == 2
    assert after.count(" cancelled ") == 2


def test_a_table_that_outgrows_one_answer_comes_as_pages_of_cells(daemon: Fleetd) -> None:
    """12,000 tasks of the longest ids, over three runs (a run file must fit a frame): their
    table would be over a megabyte."""
    with SyncClient(daemon.socket_path) as client:
        client.request(Drain)
    for part in range(3):
        submit(daemon, [task(f"{part}-{n:05d}-{'x' * 55}") for n in range(4000)], [worker()])
    with SyncClient(daemon.socket_path) as client:
        first = client.request(TaskListRequest, table=True, limit=5000)
    assert first.table == ""
    assert len(first.cells[0]) == 5000 and first.next
    listed = run_fleetctl("tasks", "list", env=daemon.env)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 12_001


def cells_of_views(tasks: list[TaskView]) -> list[list[str]]:
    """protocol.runs.TaskList's cells, as its docstring defines them from the views."""
    return [
        [t.entry.run_id for t in tasks],
        [t.entry.task_id for t in tasks],
        [t.state for t in tasks],
        [str(t.entry.attempts) for t in tasks],
        [t.worker_id or "-" for t in tasks],
        [t.result or "-" for t in tasks],
        [t.error or (f"retry after {t.not_before}" if t.not_before else "") for t in tasks],
    ]


def test_a_run_file_larger_than_a_frame_is_refused_clearly(daemon: Fleetd) -> None:
    path = os.path.join(daemon.root, "big.json")
    tasks = [task(f"t{n}", description="x" * 2000) for n in range(600)]
    with open(path, "w") as file:
        json.dump({"name": "big", "task_specs": tasks, "worker_specs": [worker()]}, file)
    done = run_fleetctl("runs", "submit", path, env=daemon.env)
    assert done.returncode == 2
    assert "bytes; fleetd takes run files of up to 1 MiB" in done.stderr
