"""A holder's runtime directory as fleetd reads it: what is missing is normal and quiet, what
cannot be read is said (with what it costs), and what might name a live process is kept."""

import os

import msgspec
from structlog.testing import capture_logs

from fleetd.clusters.records import HolderRecord
from fleetd.clusters.rundirs import current_specs, holder_pidfile, still_running
from fleetd.core.pidfiles import pidfile_text
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import CLUSTER_FILE, HOLDER_PIDFILE, member_pidfile

SPEC = ClusterSpec(name="web", members=[MemberSpec(name="a", command=["true"])])


def exited_holder(tempdir: str) -> HolderRecord:
    runtime_dir = os.path.join(tempdir, "c", "web")
    os.makedirs(runtime_dir, mode=0o700)
    return HolderRecord(spec=SPEC, dir=runtime_dir, log="", state="exited")


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def test_a_missing_pidfile_is_quiet_a_mangled_one_is_said(tempdir: str) -> None:
    record = exited_holder(tempdir)
    with capture_logs() as logs:
        assert holder_pidfile(record) is None
    assert logs == []
    write(os.path.join(record.dir, HOLDER_PIDFILE), b"not a pidfile\n")
    with capture_logs() as logs:
        assert holder_pidfile(record) is None
    assert [entry["event"] for entry in logs] == ["pidfile_unreadable"]


def test_a_pidfile_naming_this_process_is_read(tempdir: str) -> None:
    record = exited_holder(tempdir)
    write(os.path.join(record.dir, HOLDER_PIDFILE), pidfile_text(os.getpid()))
    found = holder_pidfile(record)
    assert found is not None and found[0] == os.getpid()
    assert still_running(record)


def test_the_current_definition_adds_members_and_an_unreadable_one_is_said(tempdir: str) -> None:
    record = exited_holder(tempdir)
    with capture_logs() as logs:
        assert list(current_specs(record)) == ["a"]  # the holder never wrote one: quiet
    assert logs == []
    grown = ClusterSpec(name="web", members=[*SPEC.members, MemberSpec(name="b", command=["x"])])
    write(os.path.join(record.dir, CLUSTER_FILE), msgspec.json.encode(grown))
    assert list(current_specs(record)) == ["a", "b"]
    write(os.path.join(record.dir, CLUSTER_FILE), b"{torn")
    with capture_logs() as logs:
        assert list(current_specs(record)) == ["a"]
    assert [(e["event"], e["cluster"]) for e in logs] == [("cluster_file_unreadable", "web")]


def test_a_member_directory_fleetd_cannot_open_counts_as_running(tempdir: str) -> None:
    """gc must never remove a live process's files: one it cannot look into may be one."""
    record = exited_holder(tempdir)
    member = os.path.dirname(member_pidfile(record.dir, "a"))
    os.mkdir(member, mode=0o700)
    write(os.path.join(record.dir, "holder.log"), b"")  # a file beside it: passed over
    assert not still_running(record)
    os.chmod(member, 0o770)  # group-writable: refused as unsafe
    with capture_logs() as logs:
        assert still_running(record)
    assert [e["event"] for e in logs] == ["member_dir_unreadable"]
