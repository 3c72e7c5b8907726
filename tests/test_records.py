"""The records of detached clusters and the writes built from them, in-process."""

import msgspec

from fleetd.clusters.records import HolderRecord, cluster_writes, decode_holder
from fleetd.store import Delete, Put
from protocol.definitions import ClusterSpec, MemberSpec

SPEC = ClusterSpec(name="web", members=[MemberSpec(name="a", command=["true"])])
LIVE = HolderRecord(spec=SPEC, dir="/run/fleet/c/web", log="", pid=7, start_time=9, state="live")
EXITED = msgspec.structs.replace(LIVE, state="exited")


def keys(operations: list[Put | Delete]) -> list[tuple[str, str]]:
    return [(type(op).__name__, op.key) for op in operations]


def test_a_live_holder_and_its_members_are_one_transaction() -> None:
    stored = {"members/web/a": b"{}", "members/web/gone": b"{}"}
    operations = cluster_writes(LIVE, {"b", "a"}, stored)
    assert keys(operations) == [
        ("Put", "holders/web"),
        ("Delete", "members/web/gone"),
        ("Put", "members/web/a"),
        ("Put", "members/web/b"),
    ]
    put = operations[0]
    assert isinstance(put, Put) and decode_holder(put.value) == LIVE


def test_an_exited_holder_keeps_its_record_and_loses_its_members() -> None:
    operations = cluster_writes(EXITED, {"a"}, {"members/web/a": b"{}"})
    assert keys(operations) == [("Put", "holders/web"), ("Delete", "members/web/a")]


def test_a_member_record_the_store_holds_as_it_should_be_is_not_written_again() -> None:
    first = cluster_writes(LIVE, {"a"}, {})
    stored = {op.key: op.value for op in first if isinstance(op, Put) and op.key != "holders/web"}
    operations = cluster_writes(LIVE, {"a", "b"}, stored)
    assert keys(operations) == [("Put", "holders/web"), ("Put", "members/web/b")]
