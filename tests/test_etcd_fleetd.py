"""fleetd on etcd (`--store etcd://…`): one fleetd serves as on SQLite; several fleetd with
state directories of their own (as on separate hosts) sharing one etcd see one set of leases
and claims; a dead fleetd's leases come free once its presence expires; an etcd that stops
answering gives clear errors, and lease holders lose their leases at their own deadline."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count

import pytest

from fleetctl import SyncClient
from fleetd import presence
from fleetd.core.dirs import PrivateDir
from fleetd.state import ETCD_WATERMARK_FILE
from fleetd.store.watermark import Watermark
from protocol.errors import StoreUnavailable
from tests.etcd_server import EtcdCluster, EtcdServer, need_etcd
from tests.processes import FLEETCTL, Fleetd, fleetctl, run_fleetd, wait_gone, wait_until


@pytest.fixture
def etcd(tempdir: str) -> Iterator[EtcdServer]:
    need_etcd()
    with EtcdServer(tempdir) as server:
        yield server


def on_etcd(root: str, server: EtcdServer) -> Fleetd:
    os.makedirs(root, exist_ok=True)
    return Fleetd(root, extra_env={"FLEET_STORE": server.url}).start()


@pytest.fixture
def one(tempdir: str, etcd: EtcdServer) -> Iterator[Fleetd]:
    daemon = on_etcd(os.path.join(tempdir, "one"), etcd)
    yield daemon
    daemon.close()


@pytest.fixture
def two(tempdir: str, etcd: EtcdServer) -> Iterator[Fleetd]:
    daemon = on_etcd(os.path.join(tempdir, "two"), etcd)
    yield daemon
    daemon.close()


def cli(daemon: Fleetd, *args: str, content: bytes | None = None) -> tuple[int, dict[str, object]]:
    done = fleetctl(*args, env=daemon.env, input=content)
    return done.returncode, json.loads(done.stdout)


def lease(daemon: Fleetd, verb: str, name: str, *args: str) -> tuple[int, str]:
    code, answer = cli(daemon, "lease", verb, name, *args)
    return code, str(answer["outcome"])


def error_of(answer: dict[str, object]) -> str:
    return str(answer["error"]["message"])  # type: ignore[index]


def claim(daemon: Fleetd, verb: str, key: str, owner: str) -> tuple[int, dict[str, object]]:
    args = ["claims", verb, "--kind", "prompt_inbox", "--key", key, "--owner", owner]
    return cli(daemon, *args, content=b"do the thing\n" if verb == "acquire" else None)


# One fleetd ---------------------------------------------------------------------------------


def test_a_fleetd_on_etcd_grants_leases_with_increasing_tokens(one: Fleetd) -> None:
    first = cli(one, "lease", "acquire", "build", "--owner", "a", "--ttl", "30s")[1]
    cli(one, "lease", "release", "build", "--owner", "a")
    again = cli(one, "lease", "acquire", "build", "--owner", "b", "--ttl", "30s")[1]
    tokens = [answer["lease"]["token"] for answer in (first, again)]  # type: ignore[index]
    assert tokens[1] > tokens[0] > 0


def test_a_fleetd_on_etcd_delivers_and_withdraws_claims(one: Fleetd) -> None:
    code, answer = claim(one, "acquire", "k1", "agent")
    path = answer["claim"]["path"]  # type: ignore[index]
    with open(path, "rb") as delivered:
        assert code == 0 and delivered.read() == b"do the thing\n"
    assert claim(one, "release", "k1", "agent")[0] == 0
    wait_until(lambda: not os.path.exists(path))


def test_a_bad_store_address_is_refused_before_anything_starts(tempdir: str) -> None:
    env = {**os.environ, "FLEET_STATE_DIR": tempdir, "FLEET_SOCKET": f"{tempdir}/f.sock"}
    for address, says in [
        ("redis://127.0.0.1:6379", "give etcd://HOST:PORT"),
        ("etcd://127.0.0.1:notaport", "is not HOST:PORT"),
        ("etcd://user:secret@127.0.0.1:2379", "takes no user or password"),
    ]:
        done = run_fleetd(env, "--store", address)
        assert (done.returncode, done.stdout) == (78, ""), done.stderr
        assert done.stderr.startswith("fleetd: ") and says in done.stderr
    assert os.listdir(tempdir) == []


def test_an_etcd_that_does_not_answer_at_start_is_a_temporary_failure(tempdir: str) -> None:
    need_etcd()
    env = {**os.environ, "FLEET_STATE_DIR": tempdir, "FLEET_SOCKET": f"{tempdir}/f.sock"}
    done = run_fleetd(env, "--store", "etcd://127.0.0.1:1")
    assert done.returncode == 75  # EX_TEMPFAIL: systemd may try again
    assert "etcd at etcd://127.0.0.1:1/fleet does not answer" in done.stderr


# Two fleetds, one etcd -----------------------------------------------------------------------


def test_a_lease_acquired_through_one_fleetd_is_contested_through_another(
    one: Fleetd, two: Fleetd
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "30s") == (0, "acquired")
    wait_until(lambda: lease(two, "inspect", "build")[1] == "ok")
    assert lease(two, "acquire", "build", "--owner", "b", "--ttl", "30s") == (12, "contested")


def test_a_lease_is_renewed_and_released_only_through_the_fleetd_it_was_acquired_through(
    one: Fleetd, two: Fleetd
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "30s")[1] == "acquired"
    wait_until(lambda: lease(two, "inspect", "build")[1] == "ok")
    for verb in ("heartbeat", "release"):
        code, answer = cli(two, "lease", verb, "build", "--owner", "a")
        assert (code, answer["outcome"]) == (10, "not_owned")
        assert "held through another fleetd" in str(answer["message"])
    assert lease(one, "heartbeat", "build", "--owner", "a")[1] == "renewed"


def test_a_lease_released_through_one_fleetd_is_granted_through_another(
    one: Fleetd, two: Fleetd
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "30s")[1] == "acquired"
    assert lease(one, "release", "build", "--owner", "a")[1] == "released"
    wait_until(
        lambda: lease(two, "acquire", "build", "--owner", "b", "--ttl", "30s")[1] == "acquired"
    )
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "30s")[1] == "contested"


def test_a_lease_watch_through_one_fleetd_sees_grants_through_another(
    one: Fleetd, two: Fleetd
) -> None:
    with SyncClient(two.socket_path) as client:
        start = client.lease_watch("build")
        lease(one, "acquire", "build", "--owner", "a", "--ttl", "30s")
        answer = client.lease_watch("build", start.cursor, epoch=start.epoch, wait=10)
    assert [(e.type, e.lease.owner) for e in answer.events] == [("acquired", "a")]


def test_a_claim_acquired_through_one_fleetd_is_contested_through_another(
    one: Fleetd, two: Fleetd
) -> None:
    assert claim(one, "acquire", "k1", "agent-a")[0] == 0
    code, answer = claim(two, "acquire", "k1", "agent-b")
    assert (code, answer["outcome"]) == (12, "contested")


def test_a_claim_is_released_only_through_the_fleetd_that_holds_its_file(
    one: Fleetd, two: Fleetd
) -> None:
    code, answer = claim(one, "acquire", "k1", "agent")
    path = answer["claim"]["path"]  # type: ignore[index]
    code, answer = claim(two, "release", "k1", "agent")
    assert code == 1 and "release it there" in error_of(answer)
    assert os.path.exists(path)
    assert claim(one, "release", "k1", "agent")[0] == 0


def up_sleeper(daemon: Fleetd) -> int:
    """`up --wait` of a cluster named web, the same name on every fleetd; its member's pid."""
    path = os.path.join(daemon.root, "fleet.toml")
    with open(path, "w") as f:
        f.write('name = "web"\n[members.a]\ncommand = ["sleep", "300"]\n')
    assert cli(daemon, "--json", "up", "-f", path, "--wait")[0] == 0
    (member,) = cli(daemon, "--json", "status")[1]["members"]  # type: ignore[misc]
    return int(member["pid"])


def test_fleetds_on_one_etcd_keep_their_holders_apart(one: Fleetd, two: Fleetd) -> None:
    """Each fleetd's journal of holders is its own (pids are its host's): a cluster of the
    same name on each, and a restart of one, leave the other's alone."""
    ours, theirs = up_sleeper(one), up_sleeper(two)
    for daemon in (one, two):
        daemon.stop()
        daemon.start()
    assert [m["pid"] for m in cli(two, "--json", "status")[1]["members"]] == [theirs]  # type: ignore[attr-defined]
    assert [m["pid"] for m in cli(one, "--json", "status")[1]["members"]] == [ours]  # type: ignore[attr-defined]
    for daemon in (one, two):
        assert cli(daemon, "--json", "down", "web")[0] == 0


def test_a_cluster_of_more_members_than_one_etcd_transaction_takes_is_journaled(
    one: Fleetd,
) -> None:
    """etcd takes 128 operations per transaction; a cluster's journal has one per member."""
    path = os.path.join(one.root, "fleet.toml")
    tables = "".join(f'[members.m{n}]\ncommand = ["sleep", "300"]\n' for n in range(200))
    with open(path, "w") as f:
        f.write(f'name = "big"\n{tables}')
    try:
        assert cli(one, "--json", "up", "-f", path, "--wait")[0] == 0
        one.stop()
        one.start()
        members = cli(one, "--json", "status", "big")[1]["members"]
        assert len(members) == 200  # type: ignore[arg-type]
        assert {m["state"] for m in members} == {"running"}  # type: ignore[union-attr]
    finally:
        assert cli(one, "--json", "down", "big")[0] == 0


@pytest.mark.slow
def test_the_leases_of_a_killed_fleetd_come_free_once_its_presence_expires(
    one: Fleetd, two: Fleetd
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "300s")[1] == "acquired"
    assert one.process is not None
    one.process.kill()
    one.process.wait()
    killed = time.monotonic()
    assert lease(two, "acquire", "build", "--owner", "b", "--ttl", "30s")[1] == "contested"
    wait_until(
        lambda: lease(two, "acquire", "build", "--owner", "b", "--ttl", "30s")[1] == "acquired", 20
    )
    assert time.monotonic() - killed < presence.TTL + 3


def test_a_restarted_fleetd_takes_its_presence_and_its_leases_back(
    one: Fleetd, two: Fleetd
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "300s")[1] == "acquired"
    one.stop()
    one.start()
    assert "presence_taken_back" in one.log()
    assert lease(one, "heartbeat", "build", "--owner", "a")[1] == "renewed"
    assert lease(two, "acquire", "build", "--owner", "b", "--ttl", "30s")[1] == "contested"


# etcd gone ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_while_etcd_is_down_requests_fail_clearly_and_leases_lapse_at_their_deadline(
    one: Fleetd, etcd: EtcdServer
) -> None:
    assert lease(one, "acquire", "build", "--owner", "a", "--ttl", "300s")[1] == "acquired"
    etcd.stop(signal.SIGKILL)
    lost_at = time.monotonic() + presence.TTL
    code, answer = cli(one, "lease", "acquire", "other", "--owner", "a", "--ttl", "30s")
    assert (code, answer["outcome"]) == (14, "unavailable")
    assert "does not answer" in error_of(answer)
    assert lease(one, "heartbeat", "build", "--owner", "a")[1] == "renewed"  # within its deadline
    wait_until(lambda: lease(one, "heartbeat", "build", "--owner", "a")[1] == "not_owned", 20)
    assert time.monotonic() > lost_at - 1  # not before the presence could have lapsed
    etcd.start()
    wait_until(
        lambda: lease(one, "acquire", "build", "--owner", "b", "--ttl", "30s")[1] == "acquired", 20
    )
    assert one.process is not None and one.process.poll() is None


def test_coord_run_kills_its_child_once_etcd_is_gone_past_the_deadline(
    one: Fleetd, etcd: EtcdServer, tempdir: str
) -> None:
    marker = os.path.join(tempdir, "started")
    child = (
        "import os, time\n"
        f"with open({marker!r} + '.tmp', 'w') as f: f.write(str(os.getpid()))\n"
        f"os.rename({marker!r} + '.tmp', {marker!r}); time.sleep(120)"
    )
    run = subprocess.Popen(
        [*FLEETCTL, "coord-run", "--agent", "a", "--lease", "job", "--ttl", "3s", "--",
         sys.executable, "-c", child],
        env=one.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: os.path.exists(marker))
        with open(marker) as f:
            child_pid = int(f.read())
        etcd.stop(signal.SIGKILL)
        _, stderr = run.communicate(timeout=presence.TTL + 15)
        assert run.returncode != 0 and "lost" in stderr, stderr
        assert wait_gone(child_pid, 5)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


# Continuity --------------------------------------------------------------------------------


def token_of(daemon: Fleetd, name: str) -> int:
    answer = cli(daemon, "lease", "acquire", name, "--owner", "a", "--ttl", "30s")[1]
    return int(answer["lease"]["token"])  # type: ignore[index]


def refusal(daemon: Fleetd) -> tuple[int, str]:
    done = run_fleetd(daemon.env)
    return done.returncode, done.stderr


def reset(daemon: Fleetd, *args: str) -> str:
    done = run_fleetd(daemon.env, "reset-state", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wipe(server: EtcdServer) -> None:
    server.stop()
    shutil.rmtree(server.data_dir)
    server.start()


def test_a_fleetd_refuses_an_etcd_that_was_wiped_until_reset_above_its_tokens(
    one: Fleetd, etcd: EtcdServer
) -> None:
    before = token_of(one, "build")
    one.stop()
    wipe(etcd)
    code, stderr = refusal(one)
    assert code == 65 and "holds no fleet store" in stderr and "was wiped" in stderr
    assert "started store" in reset(one)
    one.start()
    assert token_of(one, "build") > before


def test_a_fleetd_refuses_another_store_until_told_to_join_it(
    one: Fleetd, etcd: EtcdServer, tempdir: str
) -> None:
    token_of(one, "build")
    one.stop()
    wipe(etcd)
    other = on_etcd(os.path.join(tempdir, "other"), etcd)  # makes a store of its own there
    other.close()
    code, stderr = refusal(one)
    assert code == 65 and "it is another store" in stderr
    assert "kept store" in reset(one, "--keep-store")
    one.start()


def test_a_fleetd_refuses_an_etcd_behind_the_revision_it_saw(one: Fleetd, etcd: EtcdServer) -> None:
    token_of(one, "build")
    one.stop()
    with PrivateDir.open(one.state_dir) as state:  # as if etcd came back from an old snapshot
        watermark = Watermark(state, ETCD_WATERMARK_FILE)
        mark = watermark.read()
        assert mark is not None
        watermark.open()
        watermark.advance(mark.revision + 1000, mark.revision + 1000)
        watermark.close()
    code, stderr = refusal(one)
    assert code == 65 and "was rolled back" in stderr
    assert "moved store" in reset(one, "--keep-store")
    one.start()
    assert token_of(one, "other") > mark.revision + 1000


# gRPC's fork handlers --------------------------------------------------------------------------

SPAWNS = """
import anyio, sys
from fleetd.store.etcd import EtcdStore  # gRPC's fork handlers off, as fleetd on etcd has them

async def main():
    crashed = 0
    async with EtcdStore.open(sys.argv[2]) as store:  # gRPC's threads busy meanwhile
        for n in range(int(sys.argv[1])):
            process = await anyio.open_process(["true"])
            await store.put(f"spawn/{n}", b"v")
            crashed += await process.wait() < 0
    print(crashed)

anyio.run(main, backend_options={"use_uvloop": True})
"""


def test_children_spawned_under_uvloop_with_grpc_loaded_do_not_crash(etcd: EtcdServer) -> None:
    """With gRPC's fork handlers on, about 2% of children spawned under uvloop died of SIGSEGV
    before their exec (../shared/ETCD-NOTES.md; not reproducible on demand here): fleetd on
    etcd execs holders this way when its template is gone. A guard that they stay off."""
    done = subprocess.run(
        [sys.executable, "-c", SPAWNS, "300", etcd.url],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, ["0"]), done.stderr


# Two fleetds on a three-member etcd cluster -------------------------------------------------


@dataclass
class Workload:
    """A client of one fleetd acquiring a new lease and a new claim per round, keeping what
    was acknowledged (tokens in the order given) and the errors it met."""

    daemon: Fleetd
    tag: str
    tokens: list[int] = field(default_factory=list)
    claims: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with SyncClient(self.daemon.socket_path, timeout=15) as client:
            for n in count():
                if self.stop.is_set():
                    return
                try:
                    lease = client.lease_acquire(f"{self.tag}-{n}", self.tag, 60)
                    assert lease.lease is not None
                    self.tokens.append(lease.lease.token)
                    key = f"{self.tag}-{n}"
                    client.claim_acquire("prompt_inbox", key, self.tag, b"work\n")
                    self.claims.append(key)
                except StoreUnavailable as exc:
                    self.errors.append(exc.message)
                    time.sleep(0.05)

    def acknowledged(self) -> int:
        return len(self.tokens) + len(self.claims)


@pytest.mark.slow
def test_two_fleetds_keep_working_through_a_leader_kill_and_resume_after_quorum_returns(
    tempdir: str,
) -> None:
    need_etcd()
    with EtcdCluster(tempdir) as cluster, contextlib.ExitStack() as daemons:
        leader = cluster.leader()
        store = cluster.url_starting_at(leader)  # both on the member that will die
        loads = [
            Workload(daemons.enter_context(on_cluster(tempdir, name, store)), name)
            for name in ("one", "two")
        ]
        threads = [threading.Thread(target=load.run) for load in loads]
        try:
            for thread in threads:
                thread.start()
            more_acknowledged(loads, 20)
            leader.stop(signal.SIGKILL)  # with quorum: work goes on
            more_acknowledged(loads, 20)
            second = cluster.running()[0]
            second.stop(signal.SIGKILL)  # no quorum: clear errors
            wait_until(lambda: all(load.errors for load in loads), 20)
            second.start()
            more_acknowledged(loads, 20, timeout=30)
        finally:
            for load in loads:
                load.stop.set()
            for thread in threads:
                thread.join(30)
        for load in loads:
            assert load.tokens == sorted(set(load.tokens))  # never backwards, never repeated
            assert all("etcd" in error for error in load.errors), load.errors
        for load, other in zip(loads, reversed(loads), strict=True):  # none acknowledged lost
            with SyncClient(other.daemon.socket_path) as client:
                for key in load.claims:
                    assert client.claim_inspect("prompt_inbox", key).outcome == "ok"


@contextlib.contextmanager
def on_cluster(tempdir: str, name: str, store: str) -> Iterator[Fleetd]:
    root = os.path.join(tempdir, name)
    os.makedirs(root)
    daemon = Fleetd(root, extra_env={"FLEET_STORE": store}).start()
    try:
        yield daemon
    finally:
        daemon.close()


def more_acknowledged(loads: list[Workload], count: int, timeout: float = 20.0) -> None:
    targets = [load.acknowledged() + count for load in loads]
    pairs = list(zip(loads, targets, strict=True))
    wait_until(lambda: all(load.acknowledged() >= target for load, target in pairs), timeout)
