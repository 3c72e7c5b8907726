"""The crash campaign's short form (`make chaos` runs the long one), and what it found.

The campaign (tests/chaos.py) runs as a real process, as `make chaos` runs it: 10 fleetd
SIGKILLs under the mixed workload, every invariant checked after each restart, and every
holder, member and temp dir it started gone when it exits (the leak scan checks that too).
Its seed is in its summary: `python -m tests.chaos --kills 10 --seed S` replays a failure's
schedule (thread timing aside).
"""

import json
import os
import subprocess
import sys
from typing import Any

import anyio
import msgspec
import pytest

from fleetctl.sync import SyncClient
from fleetd.clusters.index import Held
from fleetd.clusters.records import HolderRecord
from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.core.pidfiles import process_start_time
from fleetd.store.sqlite import SQLiteStore
from protocol.clusters import MemberList, MemberStatusRequest
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import MemberState, MemberStatus, member_statefile
from tests.processes import Fleetd

SHORT_KILLS = 10


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_short_crash_campaign_violates_no_invariant(tempdir: str) -> None:
    """The short form of `make chaos`."""
    tally_path = os.path.join(tempdir, "chaos.json")
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--kills", str(SHORT_KILLS), "--json", tally_path],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(tally_path) as f:
        tally = json.load(f)
    assert tally["violations"] == []
    assert tally["kills"] == SHORT_KILLS and tally["restarts"] >= 1
    assert tally["invariants_checked"] > 100, tally["checks"]
    acknowledged = tally["acknowledged"]
    for op in ("lease_acquire", "lease_release", "claim_acquire", "claim_release", "cluster_up"):
        assert acknowledged.get(op, 0) > 0, acknowledged


# -- what the campaign found ----------------------------------------------------------------


def test_a_reacquired_claim_shows_the_revision_its_acquire_answered(fleetd: Fleetd) -> None:
    """A claim's revision is the store revision that granted it: a fencing token, strictly
    increasing per key, never reused. Acquired, released and acquired again, a claim must show
    the second grant's revision, as its acquire answered."""
    with SyncClient(fleetd.socket_path) as client:
        first = client.claim_acquire("file", "k", "agent", b"one").claim
        client.claim_release("file", "k", "agent")
        second = client.claim_acquire("file", "k", "agent", b"two").claim
        assert first is not None and second is not None
        assert second.revision > first.revision  # as the acquire answers it
        shown = client.claim_inspect("file", "k").claim
        listed = [c.revision for c in client.claim_list("file").claims if c.key == "k"]
    assert shown is not None
    assert (shown.revision, listed) == (second.revision, [second.revision])


class _SlowStore:
    """A store whose transactions wait for `go`: time stands still while fleetd journals."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.writing = anyio.Event()
        self.go = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def txn(self, *args: Any, **kwargs: Any) -> Any:
        self.writing.set()
        await self.go.wait()
        return await self.store.txn(*args, **kwargs)


def test_status_drops_an_exited_holders_members_at_once(tempdir: str) -> None:
    """A holder that exited is no longer live: from then on `status` (every member) must not
    list its members as running, and `status C/NAME` must read the member as stopped, as it
    does once the exit is journaled. The journal write in between is the window."""
    runtime_dir = os.path.join(tempdir, "c", "web")
    os.makedirs(os.path.join(runtime_dir, "a"))
    with subprocess.Popen(["sleep", "60"]) as holder:  # stands in for the holder
        running = MemberStatus(name="a", state=MemberState.RUNNING, pid=holder.pid, running=True)
        with open(member_statefile(runtime_dir, "a"), "wb") as f:  # as the holder keeps it
            f.write(msgspec.json.encode(running))
        spec = ClusterSpec(name="web", members=[MemberSpec(name="a", command=["sleep", "60"])])
        record = HolderRecord(
            spec=spec,
            dir=runtime_dir,
            log=os.path.join(runtime_dir, "holder.log"),
            pid=holder.pid,
            start_time=process_start_time(holder.pid) or 0,
            state="live",
        )
        held = Held("web", record, os.pidfd_open(holder.pid), {"a": spec.members[0]})
        held.update(running)
        every, one = anyio.run(_statuses_while_an_exit_is_journaled, tempdir, held, holder)
    assert [s for s in every if s.running] == []
    assert one.state == MemberState.STOPPED


async def _statuses_while_an_exit_is_journaled(
    tempdir: str, held: Held, holder: subprocess.Popen[bytes]
) -> tuple[list[MemberStatus], MemberStatus]:
    peer = Peer(os.getpid(), os.getuid(), os.getgid())
    async with SQLiteStore.open(os.path.join(tempdir, "fleet.db")) as sqlite:
        store = _SlowStore(sqlite)
        with PrivateDir.open(tempdir) as state, PrivateDir.open(tempdir) as runtime:
            registry = HolderRegistry(store, state)  # type: ignore[arg-type]
            async with anyio.create_task_group() as tasks:
                await tasks.start(registry.serve, runtime)
                registry.follower.take(held)

                def every_member() -> list[MemberStatus]:
                    answer = registry.status(MemberStatusRequest(id=1), peer)
                    return msgspec.json.decode(msgspec.json.encode(answer), type=MemberList).members

                assert [s.name for s in every_member() if s.running] == ["a"]  # a client polls
                holder.kill()  # fleetd sees it exit on its pidfd, then journals it
                with anyio.fail_after(5):
                    await store.writing.wait()
                every = every_member()
                one = registry.status(MemberStatusRequest(id=2, names=["web/a"]), peer)
                store.go.set()
                tasks.cancel_scope.cancel()
    assert isinstance(one, MemberList)
    return every, one.members[0]
