"""The adoption planner in-process: every kind of journaled holder against every kind of thing
start-up can find of it, then hypothesis over whole journals. The real processes (a holder
that outlived fleetd, one fleetd died launching, one that died meanwhile) are in
test_detached.py."""

import os

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetd.clusters.adoption import AdoptionPlan, Found, identify, plan_adoption
from fleetd.clusters.index import Held
from fleetd.clusters.records import HolderRecord, HolderState, cluster_of
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import HOLDER_PIDFILE

PID, START = 4242, 777
OTHER = (5151, 888)


def record(
    state: HolderState, pid: int = PID, start_time: int = START, name: str = "web"
) -> HolderRecord:
    spec = ClusterSpec(name=name, members=[MemberSpec(name="a", command=["true"])])
    return HolderRecord(
        spec=spec, dir=f"/run/fleet/c/{name}", log="", pid=pid, start_time=start_time, state=state
    )


RUNS = {PID: START}
RECYCLED = {PID: START + 1}
"""The journaled pid runs, but started later: another process."""

CASES: list[tuple[str, HolderRecord, Found, str, HolderRecord]] = [
    # why, the journal's record, what start-up found, the verdict, the record it is taken with
    (
        "live, its pidfile agrees, it runs",
        record("live"),
        Found((PID, START), RUNS),
        "adopt",
        record("live"),
    ),
    ("live, it is gone", record("live"), Found((PID, START), {}), "end", record("live")),
    (
        "live, its pid recycled",
        record("live"),
        Found((PID, START), RECYCLED),
        "end",
        record("live"),
    ),
    ("live, no pidfile", record("live"), Found(None, RUNS), "end", record("live")),
    ("live, the pidfile names another", record("live"), Found(OTHER, RUNS), "end", record("live")),
    (
        "starting with its pid, not serving yet",
        record("starting"),
        Found(None, RUNS),
        "adopt",
        record("starting"),
    ),
    (
        "starting with its pid, the journal wins over a pidfile",
        record("starting"),
        Found(OTHER, {**RUNS, OTHER[0]: OTHER[1]}),
        "adopt",
        record("starting"),
    ),
    (
        "starting with its pid, the gate saw fleetd die",
        record("starting"),
        Found(None, {}),
        "end",
        record("starting"),
    ),
    (
        "starting with its pid, recycled",
        record("starting"),
        Found(None, RECYCLED),
        "end",
        record("starting"),
    ),
    (
        "starting, no pid: its pidfile names it, it runs",
        record("starting", 0, 0),
        Found((PID, START), RUNS),
        "adopt",
        record("starting"),
    ),
    (
        "starting, no pid: its pidfile names one gone (whose cgroup is to end)",
        record("starting", 0, 0),
        Found((PID, START), {}),
        "end",
        record("starting"),
    ),
    (
        "starting, no pid, no pidfile: its gate never opened",
        record("starting", 0, 0),
        Found(None, {}),
        "end",
        record("starting", 0, 0),
    ),
    (
        "exited: known until gc, whatever runs",
        record("exited"),
        Found((PID, START), RUNS),
        "exited",
        record("exited"),
    ),
]


@pytest.mark.parametrize(
    ("journaled", "found", "verdict", "taken"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_holder_is_adopted_ended_or_kept_exited(
    journaled: HolderRecord, found: Found, verdict: str, taken: HolderRecord
) -> None:
    plan = plan_adoption([journaled], {"web": found}, [])
    expected = AdoptionPlan(**{verdict: (taken,)})
    assert plan == expected


def test_a_holder_start_up_found_nothing_of_is_ended() -> None:
    assert plan_adoption([record("live")], {}, []) == AdoptionPlan(end=(record("live"),))


def test_member_records_no_holder_record_owns_are_dropped() -> None:
    records = [record("live"), record("exited", name="old")]
    keys = ["members/web/a", "members/old/a", "members/orphan/a", "members/orphan/b"]
    plan = plan_adoption(records, {"web": Found((PID, START), RUNS)}, keys)
    assert plan.drop == ("members/orphan/a", "members/orphan/b")


# --- whole journals -----------------------------------------------------------------------

pids = st.sampled_from([0, PID, OTHER[0]])
starts = st.sampled_from([0, START, OTHER[1]])
identities = st.tuples(pids, starts)


@st.composite
def journals(draw: st.DrawFn) -> tuple[list[HolderRecord], dict[str, Found], list[str]]:
    names = draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=6))
    records, found = [], {}
    for name in names:
        state = draw(st.sampled_from(["starting", "live", "exited"]))
        pid, start = draw(identities)
        records.append(record(state, pid, start, name=name))
        if draw(st.booleans()):
            pidfile = draw(st.none() | identities.filter(lambda i: i[0] != 0))
            running = draw(st.dictionaries(pids.filter(bool), starts))
            found[name] = Found(pidfile, running)
    keys = draw(st.lists(st.sampled_from([f"members/{n}/m" for n in "abcdefgh"]), unique=True))
    return records, found, keys


@given(journals())
def test_every_record_has_exactly_one_fate_and_only_a_running_process_is_adopted(
    journal: tuple[list[HolderRecord], dict[str, Found], list[str]],
) -> None:
    records, found, keys = journal
    plan = plan_adoption(records, found, keys)
    fates = [*plan.adopt, *plan.end, *plan.exited]
    assert sorted(r.spec.name for r in fates) == sorted(r.spec.name for r in records)
    for adopted in plan.adopt:
        seen = found[adopted.spec.name]
        assert adopted.pid and seen.running[adopted.pid] == adopted.start_time
        assert adopted.state != "exited"
    assert all(r.state == "exited" for r in plan.exited)
    assert all(r.state != "exited" for r in plan.end)
    names = {r.spec.name for r in records}
    assert set(plan.drop) == {k for k in keys if cluster_of(k) not in names}


@given(journals())
def test_adoption_keeps_the_journal_order(
    journal: tuple[list[HolderRecord], dict[str, Found], list[str]],
) -> None:
    """Adopted clusters enter the index, and so every member's status, in journal order."""
    records, found, keys = journal
    order = [r.spec.name for r in records]
    adopted = [r.spec.name for r in plan_adoption(records, found, keys).adopt]
    assert adopted == [name for name in order if name in adopted]


def test_identify_fills_a_starting_record_from_the_pidfile_only() -> None:
    assert identify(record("starting", 0, 0), (PID, START)) == record("starting")
    assert identify(record("live"), (PID, START + 1)) is None


# --- carried out: every holder at once ------------------------------------------------------


class GatheringFollower:
    """Stands for fleetd.clusters.follow.Follower: each follow returns only once every holder
    is being followed, so adoptions made one after another would never finish."""

    def __init__(self, holders: int) -> None:
        import anyio

        from fleetd.clusters.index import ClusterIndex

        self.index = ClusterIndex()
        self.holders = holders
        self.followed: list[str] = []
        self.everyone = anyio.Event()

    async def follow(self, held: Held) -> None:
        self.followed.append(held.name)
        if len(self.followed) == self.holders:
            self.everyone.set()
        await self.everyone.wait()
        os.close(held.pidfd)


def live_here(tempdir: str, name: str) -> HolderRecord:
    """A live record naming this very process, its pidfile written as a holder writes it."""
    from fleetd.core.pidfiles import pidfile_text, process_start_time

    runtime_dir = os.path.join(tempdir, "c", name)
    os.makedirs(runtime_dir)
    with open(os.path.join(runtime_dir, HOLDER_PIDFILE), "wb") as f:
        f.write(pidfile_text(os.getpid()))
    pid = os.getpid()
    live = record("live", pid=pid, start_time=process_start_time(pid) or 0, name=name)
    return msgspec.structs.replace(live, dir=runtime_dir)


async def test_holders_are_adopted_all_at_once(tempdir: str) -> None:
    import anyio

    from fleetd.clusters.adoption import adopt
    from fleetd.clusters.records import encode, holder_key
    from fleetd.store.sqlite import SQLiteStore

    names = [f"c{i}" for i in range(5)]
    follower = GatheringFollower(len(names))
    async with SQLiteStore.open(os.path.join(tempdir, "store.db")) as store:
        for name in names:
            await store.put(holder_key(name), encode(live_here(tempdir, name)))
        with anyio.fail_after(10):
            await adopt(store, follower)  # type: ignore[arg-type]
    assert sorted(follower.followed) == names
