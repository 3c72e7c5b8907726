"""The journal over fleetd's own resources: holders, members, sockets and logs of detached
clusters and leases listed as read-only entries with their owners, and gc over all of them
(exited clusters' leftovers, dead lease records, claims of members whose holder exited)."""

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import anyio
import msgspec
import pytest

from fleetctl import SyncClient
from fleetd.clusters.records import HolderRecord
from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.pidfiles import process_start_time
from fleetd.store.sqlite import SQLiteStore
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import member_pidfile
from tests.processes import Fleetd, fleetctl
from tests.test_claims import _check_golden, _normalise, claims
from tests.test_detached import definition

TALKER = 'command = ["sh", "-c", "echo hello; exec sleep 60"]'
"""A member that writes its stdout log at once, then idles."""

_HOLDER_OWNER = re.compile(r"pid:\d+:\d+")


def normalise(envelope: dict[str, Any], root: str) -> Any:
    """As the claims goldens, and a holder's owner (its pid and start time) a placeholder."""
    text = _HOLDER_OWNER.sub("pid:<pid>:<start>", json.dumps(envelope))
    return _normalise(json.loads(text), root)


def up_web(daemon: Fleetd) -> str:
    """Cluster `web` with one member `a`, running; its runtime directory."""
    path = os.path.join(daemon.root, "web.toml")
    with open(path, "w") as f:
        f.write(definition("web", a=TALKER))
    done = fleetctl("--json", "up", "-f", path, "--wait", env=daemon.env)
    assert done.returncode == 0, done.stdout + done.stderr
    runtime_dir: str = json.loads(done.stdout)["runtime_dir"]
    return runtime_dir


def down_web(daemon: Fleetd) -> None:
    assert fleetctl("down", "web", env=daemon.env).returncode == 0


def gc(daemon: Fleetd, *args: str) -> dict[str, Any]:
    done = fleetctl("--json", "gc", *args, env=daemon.env)
    assert done.returncode == 0, done.stdout + done.stderr
    envelope: dict[str, Any] = json.loads(done.stdout)
    return envelope


def items(envelope: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["kind"], c["key"]) for c in envelope["removed"]]


def listed(daemon: Fleetd) -> list[tuple[str, str, str]]:
    entries = claims(daemon.env, ["list"], None)[1]["claims"]
    return [(c["kind"], c["key"], c["state"]) for c in entries]


def member_state(daemon: Fleetd, name: str) -> str:
    done = fleetctl("--json", "status", name, env=daemon.env)
    state: str = json.loads(done.stdout)["members"][0]["state"]
    return state


def lease_of_a_process_that_exits(daemon: Fleetd, name: str, ttl: float, release: bool) -> int:
    """A lease bound to a short-lived process: acquired (and released, if asked), then the
    process exits. Its token."""
    code = (
        "from fleetctl import SyncClient\n"
        f"with SyncClient({daemon.socket_path!r}) as c:\n"
        f"    print(c.lease_acquire({name!r}, 'agent-1', {ttl}).lease.token)\n"
        f"    if {release}: c.lease_release({name!r}, 'agent-1')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    return int(done.stdout)


def inbox_claim(daemon: Fleetd, key: str, owner: str) -> str:
    args = ["acquire", "--kind", "prompt_inbox", "--key", key, "--owner", owner]
    code, envelope = claims(daemon.env, args, b"do X\n")
    assert code == 0, envelope
    path: str = envelope["claim"]["path"]
    return path


# -- the journal view ---------------------------------------------------------------------------


def test_list_shows_holder_member_socket_log_and_lease_entries_with_owners(
    holders: Fleetd,
) -> None:
    up_web(holders)
    inbox_claim(holders, "t1", "web:a")
    with SyncClient(holders.socket_path) as client:
        client.lease_acquire("lead", "agent-1", ttl=600)
    code, envelope = claims(holders.env, ["list"], None)
    assert code == 0
    _check_golden("list_journal", {"exit": code, "envelope": normalise(envelope, holders.root)})
    code, mine = claims(holders.env, ["list", "--owner", "web:a"], None)
    assert [(c["kind"], c["key"]) for c in mine["claims"]] == [
        ("prompt_inbox", "t1"),
        ("socket", "web:a"),
        ("log", "web:a:stdout"),
        ("log", "web:a:stderr"),
    ]


def test_inspect_a_lease_by_its_name(fleetd: Fleetd) -> None:
    with SyncClient(fleetd.socket_path) as client:
        lease = client.lease_acquire("build/main", "agent-1", ttl=600).lease
    code, envelope = claims(fleetd.env, ["inspect", "--kind", "lease", "--key", "build/main"], None)
    assert lease is not None and envelope["claim"]["revision"] == lease.token
    _check_golden("inspect_lease", {"exit": code, "envelope": normalise(envelope, fleetd.root)})
    assert claims(fleetd.env, ["inspect", "--kind", "holder", "--key", "nope"], None)[0] == 11


def test_acquire_and_release_of_fleetd_kinds_are_refused(fleetd: Fleetd) -> None:
    for kind in ("holder", "member", "socket", "log", "lease"):
        acquire = ["acquire", "--kind", kind, "--key", "web", "--owner", "a"]
        code, envelope = claims(fleetd.env, acquire, b"x")
        assert code == 1 and f"kind {kind!r} is fleetd's own: use fleetctl" in str(envelope)
        if kind == "lease":
            _check_golden("error_fleetd_kind", {"exit": code, "envelope": envelope})
        code, envelope = claims(fleetd.env, ["release", *acquire[1:]], None)
        assert code == 1 and envelope["error"]["code"] == "invalid_request"
    assert listed(fleetd) == []


# -- gc -----------------------------------------------------------------------------------------


def test_gc_after_down_removes_the_runtime_dir_and_reports_each_item(holders: Fleetd) -> None:
    runtime_dir = up_web(holders)
    down_web(holders)
    assert member_state(holders, "web/a") == "stopped"
    envelope = gc(holders)
    _check_golden("gc_exited_cluster", {"exit": 0, "envelope": normalise(envelope, holders.root)})
    assert items(envelope) == [("holder", "web"), ("member", "web:a"), ("log", "web:a:stdout")]
    assert not os.path.exists(runtime_dir)
    assert not os.path.exists(os.path.join(holders.state_dir, "clusters", "web"))
    assert member_state(holders, "web/a") == "absent"
    assert fleetctl("down", "web", env=holders.env).returncode == 11


def test_gc_never_touches_a_live_cluster(holders: Fleetd) -> None:
    runtime_dir = up_web(holders)
    inbox = inbox_claim(holders, "t1", "web:a")
    with SyncClient(holders.socket_path) as client:
        before = client.member_status(["web/a"])[0]
    entries = listed(holders)
    envelope = gc(holders)
    assert (envelope["removed"], envelope["kept"]) == ([], len(entries))
    assert listed(holders) == entries
    assert sorted(os.listdir(runtime_dir)) == sorted(
        ["a", "a.sock", "cluster.json", "holder.log", "holder.pid", "notify"]
    )
    assert os.path.exists(inbox)
    with SyncClient(holders.socket_path) as client:
        assert client.member_status(["web/a"])[0] == before


def test_gc_dry_run_reports_and_removes_nothing(holders: Fleetd) -> None:
    runtime_dir = up_web(holders)
    down_web(holders)
    entries, files = listed(holders), sorted(os.listdir(runtime_dir))
    envelope = gc(holders, "--dry-run")
    assert envelope["dry_run"] is True
    assert items(envelope) == [("holder", "web"), ("member", "web:a"), ("log", "web:a:stdout")]
    assert (listed(holders), sorted(os.listdir(runtime_dir))) == (entries, files)
    assert member_state(holders, "web/a") == "stopped"


def test_gc_twice_the_second_removes_nothing(holders: Fleetd) -> None:
    up_web(holders)
    down_web(holders)
    first = gc(holders)
    second = gc(holders)
    assert first["removed"] and second["removed"] == []
    assert second["kept"] == first["kept"] == len(listed(holders))


def test_inbox_claim_of_a_member_whose_holder_exited_is_collected(holders: Fleetd) -> None:
    up_web(holders)
    qualified, bare = inbox_claim(holders, "t1", "web:a"), inbox_claim(holders, "t2", "a")
    assert gc(holders)["removed"] == []
    down_web(holders)
    envelope = gc(holders)
    assert items(envelope)[:2] == [("prompt_inbox", "t1"), ("prompt_inbox", "t2")]
    assert not os.path.exists(qualified) and not os.path.exists(bare)
    assert claims(holders.env, ["inspect", "--kind", "prompt_inbox", "--key", "t1"], None)[0] == 11


@pytest.mark.parametrize("state", ["released", "expired"])
def test_gc_removes_a_dead_lease_record_and_tokens_keep_increasing(
    fleetd: Fleetd, state: str
) -> None:
    released = state == "released"
    first = lease_of_a_process_that_exits(fleetd, "build/main", 600 if released else 0.1, released)
    inspect = ["inspect", "--kind", "lease", "--key", "build/main"]
    deadline = time.monotonic() + 10
    while claims(fleetd.env, inspect, None)[1]["claim"]["detail"] != state:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    envelope = gc(fleetd)
    assert [(c["kind"], c["key"], c["detail"]) for c in envelope["removed"]] == [
        ("lease", "build/main", state)
    ]
    assert claims(fleetd.env, inspect, None)[0] == 11
    fleetd.stop()  # the deletion was the store's last write: a restart must not forget it
    fleetd.start()
    with SyncClient(fleetd.socket_path) as client:
        second = client.lease_acquire("build/main", "agent-2", ttl=600).lease
    assert second is not None and second.token > first


def test_gc_keeps_a_held_lease_within_its_ttl_though_its_process_died(fleetd: Fleetd) -> None:
    lease_of_a_process_that_exits(fleetd, "build/main", 600, release=False)
    assert gc(fleetd)["removed"] == []
    code, envelope = claims(fleetd.env, ["inspect", "--kind", "lease", "--key", "build/main"], None)
    assert (code, envelope["claim"]["state"]) == (0, "held")


def _own_pidfile(path: str) -> None:
    """A pidfile naming this very process: alive, by pid and start time."""
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {process_start_time(os.getpid())}\n")


async def test_gc_keeps_an_exited_holder_while_a_pidfile_names_a_live_process(
    tempdir: str,
) -> None:
    runtime_dir = os.path.join(tempdir, "c", "ghost")
    pidfile = member_pidfile(runtime_dir, "m")
    _own_pidfile(pidfile)
    spec = ClusterSpec(name="ghost", members=[MemberSpec(name="m", command=["true"])])
    record = HolderRecord(spec=spec, dir=runtime_dir, log="", state="exited")
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        await store.put("holders/ghost", msgspec.json.encode(record))
        with (
            PrivateDir.open(os.path.join(tempdir, "state")) as state,
            PrivateDir.open(tempdir) as runtime,
        ):
            registry = HolderRegistry(store, state)
            async with anyio.create_task_group() as tasks:
                await tasks.start(registry.serve, runtime)
                assert await registry.journal.journal_collect(dry_run=False) == []
                assert os.listdir(runtime_dir) == ["m"]
                os.unlink(pidfile)
                removed = await registry.journal.journal_collect(dry_run=False)
                assert [(c.kind, c.key) for c in removed] == [
                    ("holder", "ghost"),
                    ("member", "ghost:m"),
                ]
                assert os.listdir(os.path.dirname(runtime_dir)) == []
                assert await store.get("holders/ghost") is None
                tasks.cancel_scope.cancel()


def test_a_live_holder_and_its_members_are_journaled_in_one_transaction(holders: Fleetd) -> None:
    """A crash between two writes would leave a live holder whose members the journal does not
    name: the holder's record and its members' share the revision of one transaction."""
    up_web(holders)
    entries = claims(holders.env, ["list"], None)[1]["claims"]
    revisions = {(c["kind"], c["key"]): c["revision"] for c in entries if "web" in c["key"]}
    assert ("holder", "web") in revisions and ("member", "web:a") in revisions
    assert len(set(revisions.values())) == 1, revisions
    down_web(holders)
