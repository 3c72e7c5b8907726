"""fleetd's memory of its clusters (fleetd.clusters.index) and the registry's waits and launches
over it, in-process: what one cluster's change costs the others, how names resolve as clusters
come, change and go, and how many holders start at once."""

import os
from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest

from fleetd.clusters import index as index_module
from fleetd.clusters.index import ClusterIndex, Held, MemberNames
from fleetd.clusters.records import HolderRecord, members_prefix
from fleetd.clusters.registry import HolderRegistry
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.store import KeyValue
from fleetd.store.sqlite import SQLiteStore
from protocol.clusters import MemberWait
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.errors import InvalidRequest, MemberFailed
from protocol.members import MemberState, MemberStatus, member_dir, member_statefile

STARTING, RUNNING = MemberState.STARTING, MemberState.RUNNING


def record(cluster: str, *members: str) -> HolderRecord:
    spec = ClusterSpec(
        name=cluster, members=[MemberSpec(name=m, command=["sleep", "60"]) for m in members]
    )
    return HolderRecord(spec=spec, dir=f"/nonexistent/c/{cluster}", log="", pid=1, state="live")


def held(cluster: str, *members: str) -> Held:
    """A live holder as fleetd follows it, its members starting (no process: the index does
    no I/O on a live holder)."""
    following = record(cluster, *members)
    specs = {m.name: m for m in following.spec.members}
    made = Held(cluster, following, -1, specs)
    for member in members:
        made.update(MemberStatus(name=member, state=STARTING))
    return made


def status(member: str, state: MemberState) -> MemberStatus:
    return MemberStatus(name=member, state=state)


def live(*clusters: Held) -> ClusterIndex:
    index = ClusterIndex()
    for cluster in clusters:
        index.add_live(cluster)
    return index


# --- waking waits ---------------------------------------------------------------------------


def test_a_change_in_one_cluster_wakes_only_the_waits_on_it() -> None:
    a, b = held("a", "m"), held("b", "m")
    index = live(a, b)
    with index.watching({"a"}) as on_a, index.watching({"b"}) as on_b:
        index.update(b, status("m", RUNNING))
        assert on_b.is_set() and not on_a.is_set()


def test_a_wait_on_several_clusters_wakes_at_a_change_of_any() -> None:
    a, b = held("a", "m"), held("b", "m")
    index = live(a, b)
    with index.watching({"a", "b"}) as changed:
        index.update(b, status("m", RUNNING))
        assert changed.is_set()


def test_a_cluster_exiting_or_collected_wakes_its_waits() -> None:
    a = held("a", "m")
    index = live(a)
    with index.watching({"a"}) as changed:
        index.remove_live(a)
        index.add_exited(msgspec.structs.replace(a.record, state="exited"))
        assert changed.is_set()
    with index.watching({"a"}) as changed:
        index.remove_exited("a")
        assert changed.is_set()


# --- the status of everything ---------------------------------------------------------------


def every(index: ClusterIndex) -> list[MemberStatus]:
    return msgspec.json.decode(index.every_status().members, type=list[MemberStatus])


def test_every_status_follows_each_change_in_cluster_order() -> None:
    a, b = held("a", "m", "n"), held("b", "m")
    index = live(a, b)
    assert [(s.cluster, s.name, s.state) for s in every(index)] == [
        ("a", "m", STARTING),
        ("a", "n", STARTING),
        ("b", "m", STARTING),
    ]
    index.update(b, status("m", RUNNING))
    assert [s.state for s in every(index)] == [STARTING, STARTING, RUNNING]


def test_every_status_reencodes_only_the_cluster_that_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clusters = [held(f"c{i}", "m", "n") for i in range(50)]
    index = live(*clusters)
    every(index)
    encoded: list[object] = []
    real = index_module._encode

    def counting(value: object) -> bytes:
        encoded.append(value)
        return real(value)

    monkeypatch.setattr(index_module, "_encode", counting)
    index.update(clusters[7], status("n", RUNNING))
    assert [s.state for s in every(index)].count(RUNNING) == 1
    assert len(encoded) == 1  # cluster c7's statuses, and no other's


def test_every_status_leaves_out_a_cluster_gone() -> None:
    a, b = held("a", "m"), held("b", "m")
    index = live(a, b)
    every(index)
    index.remove_live(a)
    assert [s.cluster for s in every(index)] == ["b"]


# --- names ------------------------------------------------------------------------------------


def test_a_member_first_seen_in_a_push_resolves() -> None:
    a = held("a", "m")
    index = live(a)
    index.update(a, status("late", STARTING))
    assert index.resolve("late") == ("a", "late")
    assert index.status_of("a/late").state == STARTING


def test_an_exited_cluster_answers_for_its_members_until_collected() -> None:
    a = held("a", "m")
    index = live(a)
    index.remove_live(a)
    index.add_exited(msgspec.structs.replace(a.record, state="exited"))
    assert index.resolve("m") == ("a", "m")
    assert index.status_of("m").state == MemberState.ABSENT  # no state file on disk
    index.remove_exited("a")
    assert index.resolve("m") is None


def test_a_bare_name_in_two_clusters_is_ambiguous_until_one_goes() -> None:
    a, b = held("a", "web"), held("b", "web")
    index = live(a, b)
    with pytest.raises(InvalidRequest, match="a, b"):
        index.resolve("web")
    index.remove_live(b)
    assert index.resolve("web") == ("a", "web")


def test_a_cluster_up_again_answers_for_its_new_members_only() -> None:
    index = live(held("a", "old"))
    index.remove_live(index.live["a"])
    index.add_live(held("a", "new"))
    assert index.resolve("new") == ("a", "new")
    assert index.resolve("old") is None


def test_member_names_drop_a_cluster_and_keep_the_others() -> None:
    names = MemberNames()
    names.replace("one", ["web", "db"])
    names.replace("two", ["web"])
    names.drop("one")
    assert names.resolve("web") == ("two", "web")
    assert names.resolve("db") is None
    assert names.resolve("one/db") is None


# --- the registry's wait ----------------------------------------------------------------------


@pytest.fixture
def state(tempdir: str) -> Iterator[PrivateDir]:
    with PrivateDir.open(os.path.join(tempdir, "state")) as opened:
        yield opened


@pytest.fixture
async def registry(tempdir: str, state: PrivateDir) -> AsyncIterator[HolderRegistry]:
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        yield HolderRegistry(store, state)


ME = Peer(os.getpid(), os.getuid(), os.getgid())


async def test_a_wait_looks_again_only_when_its_own_cluster_changes(
    registry: HolderRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    a, b = held("a", "m"), held("b", "m")
    registry.index.add_live(a)
    registry.index.add_live(b)
    looks: list[str] = []
    status_in = registry.index.status_in

    def looking(cluster: str, member: str) -> MemberStatus:
        looks.append(cluster)
        return status_in(cluster, member)

    monkeypatch.setattr(registry.index, "status_in", looking)
    answers: list[list[MemberStatus]] = []

    async def wait_for_a() -> None:
        answer = await registry.wait(MemberWait(id=1, names=["a/m"], wait=10), ME)
        answers.append(answer.members)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait_for_a)
        await anyio.wait_all_tasks_blocked()
        for _ in range(100):
            registry.index.update(b, status("m", STARTING))
            await anyio.wait_all_tasks_blocked()
        assert looks == ["a"]
        registry.index.update(a, status("m", RUNNING))
    assert looks == ["a", "a"]
    assert [(s.cluster, s.state) for s in answers[0]] == [("a", RUNNING)]


def left_state_file(runtime_dir: str, last: MemberStatus) -> None:
    """The state file a holder leaves for its member as it exits."""
    os.makedirs(member_dir(runtime_dir, last.name))
    with open(member_statefile(runtime_dir, last.name), "wb") as f:
        f.write(msgspec.json.encode(last))


async def test_a_wait_whose_cluster_goes_down_meanwhile_fails_at_once(
    registry: HolderRegistry, tempdir: str
) -> None:
    """Its members' state files then say stopped: a wait for them to run is over."""
    import anyio

    a = held("a", "m")
    a.record = msgspec.structs.replace(a.record, dir=os.path.join(tempdir, "c", "a"))
    left_state_file(a.record.dir, status("m", RUNNING))
    registry.index.add_live(a)
    failed: list[MemberFailed] = []

    async def wait_for_a() -> None:
        try:
            await registry.wait(MemberWait(id=1, names=["a/m"], wait=10), ME)
        except MemberFailed as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(wait_for_a)
        await anyio.wait_all_tasks_blocked()
        registry.index.remove_live(a)
        registry.index.add_exited(msgspec.structs.replace(a.record, state="exited"))
    assert [exc.details for exc in failed] == [{"member": "a/m"}]


def test_a_member_of_a_cluster_collected_is_absent() -> None:
    index = ClusterIndex()
    index.add_exited(msgspec.structs.replace(record("a", "m"), state="exited"))
    assert index.resolve("a/m") == ("a", "m")
    index.remove_exited("a")
    assert index.status_in("a", "m").state == MemberState.ABSENT


class HeldLauncher:
    """Stands for fleetd.clusters.launch.Launcher: each launch holds until released, and the
    most launches under way at once is kept."""

    def __init__(self) -> None:
        import anyio

        self.starting = 0
        self.most = 0
        self.released = anyio.Event()

    async def launch(self, spec: ClusterSpec, runtime_dir: str) -> Held:
        self.starting += 1
        self.most = max(self.most, self.starting)
        await self.released.wait()
        self.starting -= 1
        return held(spec.name, "m")


async def test_ups_beyond_the_launches_at_once_wait_their_turn(registry: HolderRegistry) -> None:
    import anyio

    from fleetd.clusters.registry import LAUNCHES_AT_ONCE
    from protocol.clusters import ClusterUp

    launcher = HeldLauncher()
    registry._launcher = launcher  # type: ignore[assignment]
    answered: list[str] = []

    async def up(name: str) -> None:
        spec = record(name, "m").spec
        answered.append((await registry.up(ClusterUp(id=1, spec=spec), ME)).cluster)

    async with anyio.create_task_group() as tasks:
        for i in range(LAUNCHES_AT_ONCE + 3):
            tasks.start_soon(up, f"c{i}")
        await anyio.wait_all_tasks_blocked()
        assert launcher.starting == LAUNCHES_AT_ONCE
        launcher.released.set()
    assert len(answered) == LAUNCHES_AT_ONCE + 3
    assert launcher.most == LAUNCHES_AT_ONCE


async def test_gc_collects_every_exited_cluster_at_once_and_reports_them_in_order(
    registry: HolderRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each collection returns only once every cluster's is under way: one after another,
    they would never finish."""
    import anyio

    from fleetd.journal import fleetd_entry
    from protocol.claims import ClaimInfo

    names = [f"c{i}" for i in range(5)]
    for name in reversed(names):
        registry.index.add_exited(msgspec.structs.replace(record(name, "m"), state="exited"))
    under_way: list[str] = []
    everyone = anyio.Event()

    async def collecting(name: str, dry_run: bool) -> list[ClaimInfo]:
        under_way.append(name)
        if len(under_way) == len(names):
            everyone.set()
        await everyone.wait()
        return [fleetd_entry("holder", name, "fleetd", held=False, revision=1)]

    monkeypatch.setattr(registry.journal, "_collect_exited", collecting)
    with anyio.fail_after(10):
        removed = await registry.journal.journal_collect(dry_run=True)
    assert [entry.key for entry in removed] == names


async def test_a_cluster_name_holds_no_lock_once_its_change_is_done(
    registry: HolderRegistry,
) -> None:
    """A daemon that has seen a million cluster names keeps nothing for each."""
    async with registry.index.lock("c1"):
        pass
    assert "c1" not in registry.index._locks


async def test_the_journal_keeps_nothing_of_a_cluster_once_its_writes_end(
    registry: HolderRegistry,
) -> None:
    registry.index.add_exited(msgspec.structs.replace(record("c1", "m"), state="exited"))
    await registry.journal.write("c1")
    await registry.journal.write("gone")  # nothing remembered: nothing to write
    assert registry.journal._writes == {}


async def test_inspecting_one_entry_finds_what_listing_all_shows(
    registry: HolderRegistry,
) -> None:
    for cluster in ("c1", "c2"):
        registry.index.add_live(held(cluster, "a", "b"))
        await registry.journal.write(cluster)
    listed = await registry.journal.journal_entries()
    assert len(listed) == 2 * (1 + 2 * 4)  # a holder; per member, member, socket, 2 logs
    for entry in listed:
        assert await registry.journal.journal_entry(entry.kind, entry.key) == entry
    assert await registry.journal.journal_entry("member", "c1:nope") is None
    assert await registry.journal.journal_entry("holder", "nope") is None


async def test_inspecting_one_entry_reads_only_its_own_cluster(
    registry: HolderRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`claims inspect` costs what it names, however many clusters are journaled."""
    for cluster in ("c1", "c2", "c3"):
        registry.index.add_live(held(cluster, "a"))
        await registry.journal.write(cluster)
    store = registry.journal.store
    ranged: list[str] = []
    range_all = store.range

    async def recording(prefix: str) -> list[KeyValue]:
        ranged.append(prefix)
        return await range_all(prefix)

    monkeypatch.setattr(store, "range", recording)
    entry = await registry.journal.journal_entry("socket", "c2:a")
    assert entry is not None
    assert ranged == [members_prefix("c2")]
