"""fleetd never loses or invents state: a store that was lost, replaced, rolled back or cannot
be read stops fleetd with one line (and touches nothing), `fleetd reset-state` is the way on,
and fencing tokens never repeat across any of it."""

import contextlib
import glob
import os
import shutil
import signal
import socket
import sqlite3
import struct
import zlib
from collections.abc import Iterator

import pytest

from fleetctl import SyncClient
from fleetd.core.dirs import PrivateDir
from fleetd.store.watermark import (
    SLOT_SIZE,
    Continuity,
    Mark,
    StoreIdentity,
    Watermark,
    check_continuity,
    decode_slot,
    encode_slot,
    latest,
)
from protocol.errors import StateLost
from tests.processes import Fleetd, run_fleetd

EX_DATAERR, EX_TEMPFAIL = 65, 75


def _store(daemon: Fleetd, suffix: str = "") -> str:
    return os.path.join(daemon.state_dir, "fleet.db" + suffix)


def _write_some(daemon: Fleetd, *names: str) -> int:
    """Leases `names` and a claim of file `kept`; the highest token given."""
    tokens = []
    with SyncClient(daemon.socket_path) as client:
        for name in names:
            lease = client.lease_acquire(name, "agent", ttl=600).lease
            assert lease is not None
            tokens.append(lease.token)
        client.claim_acquire("file", "kept", "agent", b"delivered\n")
    return max(tokens)


def _refused(daemon: Fleetd) -> tuple[int, str]:
    result = run_fleetd(daemon.env)
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(daemon.socket_path)  # nobody listens
    return result.returncode, result.stderr


def _one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleetd: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def stopped(tempdir: str) -> Iterator[Fleetd]:
    """A fleetd that granted leases a..c and delivered a claim, then stopped cleanly."""
    daemon = Fleetd(tempdir).start()
    try:
        _write_some(daemon, "a", "b", "c")
        daemon.stop()
        yield daemon
    finally:
        daemon.close()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- the decision, without I/O -------------------------------------------------------------------


def test_continuity_decisions() -> None:
    mark = Mark.at(store_id=7, revision=10)
    paths = {"store": "db", "watermark": "wm"}

    assert check_continuity(None, None, **paths) is Continuity.ADOPT
    assert check_continuity(None, StoreIdentity(7, 3, False), **paths) is Continuity.ADOPT
    assert check_continuity(mark, StoreIdentity(7, 10, True), **paths) is Continuity.OK
    assert check_continuity(mark, StoreIdentity(7, 11, True), **paths) is Continuity.OK
    for found, why in [
        (None, "was lost"),
        (StoreIdentity(8, 10, True), "was replaced"),
        (StoreIdentity(7, 9, True), "rolled back"),
    ]:
        with pytest.raises(StateLost, match=why):
            check_continuity(mark, found, **paths)
    with pytest.raises(StateLost, match="wm is missing"):
        check_continuity(None, StoreIdentity(7, 3, True), **paths)


def test_a_store_that_crashed_between_its_commit_and_the_mark_is_sound() -> None:
    """The mark is written while the commit runs: a crash leaves the store at the floor (the
    commit lost, never answered) or at the revision, and both go on."""
    mark = Mark(store_id=7, revision=12, floor=10)
    paths = {"store": "db", "watermark": "wm"}

    assert check_continuity(mark, StoreIdentity(7, 10, True), **paths) is Continuity.OK
    assert check_continuity(mark, StoreIdentity(7, 12, True), **paths) is Continuity.OK
    with pytest.raises(StateLost, match="rolled back"):
        check_continuity(mark, StoreIdentity(7, 9, True), **paths)


def test_a_torn_watermark_slot_falls_back_to_the_other() -> None:
    older, newer = encode_slot(Mark(1, 5, 4), 1), encode_slot(Mark(1, 6, 5), 2)
    assert latest(older + newer) == (Mark(1, 6, 5), 2)
    torn = newer[:20] + b"\xff" * 44
    assert decode_slot(torn) is None
    assert latest(older + torn) == (Mark(1, 5, 4), 1)
    assert latest(b"\0" * 128) is None


def test_a_watermark_from_before_floors_reads_with_its_revision_as_floor() -> None:
    body = struct.pack("<8sqQQ", b"FLEETWM1", 1, 5, 3)
    slot = (body + struct.pack("<I", zlib.crc32(body))).ljust(64, b"\0")
    assert decode_slot(slot) == (Mark(1, 5, 5), 3)
    assert latest(slot + encode_slot(Mark(1, 7, 5), 4)) == (Mark(1, 7, 5), 4)


def _tear_newest_slot(path: str) -> None:
    """What a crash in the middle of the last write leaves: its slot garbled."""
    with open(path, "r+b") as f:
        data = f.read(2 * SLOT_SIZE)
        slots = [decode_slot(data[i * SLOT_SIZE : (i + 1) * SLOT_SIZE]) for i in (0, 1)]
        newest = max((0, 1), key=lambda i: slots[i][1] if slots[i] else -1)  # type: ignore[index]
        f.seek(newest * SLOT_SIZE + 20)
        f.write(b"\xff" * (SLOT_SIZE - 20))


@pytest.mark.parametrize(
    ("writes", "left"),
    [
        ([("note", 5)], Mark(1, 100, 0)),
        ([("note", 5), ("note", 6)], Mark(1, 100, 0)),
        ([("note", 5), ("advance", 200)], Mark(1, 100, 0)),
        ([("note", 5), ("advance", 200), ("note", 7)], Mark(1, 200, 5)),
        ([("note", 5), ("sync", 0), ("note", 7)], Mark(1, 100, 5)),
    ],
)
def test_a_write_torn_by_a_crash_leaves_the_last_flushed_mark(
    tempdir: str, writes: list[tuple[str, int]], left: Mark
) -> None:
    """Notes and advances go beside the last flushed mark, never over it."""
    with PrivateDir.open(tempdir) as state:
        watermark = Watermark(state, "wm")
        watermark.create(Mark.at(1, 0))
        watermark.advance(0, 100)
        for write, revision in writes:
            if write == "note":
                watermark.note(revision)
            elif write == "advance":
                assert watermark.mark is not None
                watermark.advance(watermark.mark.floor, revision)
            else:
                watermark.sync()
        watermark.close()
        _tear_newest_slot(state.join("wm"))
        assert Watermark(state, "wm").read() == left


def test_a_note_moves_the_floor_and_keeps_the_revision(tempdir: str) -> None:
    with PrivateDir.open(tempdir) as state:
        watermark = Watermark(state, "wm")
        watermark.create(Mark.at(1, 0))
        watermark.advance(0, 100)
        watermark.note(42)
        assert Watermark(state, "wm").read() == watermark.mark == Mark(1, 100, 42)
        watermark.close()


# -- a lost store is refused -------------------------------------------------------------------


def test_a_deleted_store_is_refused_and_its_delivered_files_are_kept(stopped: Fleetd) -> None:
    for path in glob.glob(_store(stopped, "*")):
        os.unlink(path)
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR
    assert "the store was lost" in _one_line(stderr) and "fleetd reset-state" in stderr
    assert os.path.exists(os.path.join(stopped.state_dir, "files", "kept"))
    assert not os.path.exists(_store(stopped)), "nothing was created in its place"


def test_an_emptied_store_is_refused(stopped: Fleetd) -> None:
    open(_store(stopped), "w").close()
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "missing or empty" in _one_line(stderr)


def test_a_lost_wal_after_sigkill_is_refused_as_rolled_back(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        _write_some(daemon, "a", "b")
        daemon.stop()  # checkpoints: the store file holds these
        daemon.start()
        _write_some(daemon, "c", "d")
        daemon.signal(signal.SIGKILL)
        daemon.wait()
    finally:
        daemon.close()
    os.unlink(_store(daemon, "-wal"))
    code, stderr = _refused(daemon)
    assert code == EX_DATAERR and "rolled back" in _one_line(stderr)


def test_another_store_put_in_its_place_is_refused(stopped: Fleetd, tempdir: str) -> None:
    other = Fleetd(os.path.join(tempdir, "other"))
    os.mkdir(other.root)
    other.start().close()
    shutil.copy(_store(other), _store(stopped))
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "it was replaced" in _one_line(stderr)


def test_a_deleted_watermark_is_refused(stopped: Fleetd) -> None:
    os.unlink(os.path.join(stopped.state_dir, "fleet.watermark"))
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "fleet.watermark is missing" in _one_line(stderr)


def test_a_store_from_before_watermarks_is_adopted(stopped: Fleetd) -> None:
    os.unlink(os.path.join(stopped.state_dir, "fleet.watermark"))
    with contextlib.closing(sqlite3.connect(_store(stopped))) as db, db:
        db.execute("UPDATE meta SET value = 0 WHERE name = 'watermarked'")
    stopped.start()
    with SyncClient(stopped.socket_path) as client:
        assert client.lease_inspect("a").lease is not None
    stopped.stop()
    assert os.path.exists(os.path.join(stopped.state_dir, "fleet.watermark"))


# -- reset-state -------------------------------------------------------------------------------


def test_reset_state_archives_everything_and_tokens_keep_growing(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        highest = _write_some(daemon, "a", "b", "c")
        daemon.stop()
        for path in glob.glob(_store(daemon, "*")):
            os.unlink(path)
        reset = run_fleetd(daemon.env, "reset-state")
        assert reset.returncode == 0, reset.stderr
        assert "archived" in reset.stdout and "continue above" in reset.stdout
        (archive,) = glob.glob(os.path.join(daemon.state_dir, "archive", "*"))
        assert _read(os.path.join(archive, "files", "kept")) == b"delivered\n"
        daemon.start()
        assert _write_some(daemon, "a") > highest
    finally:
        daemon.close()


def test_reset_state_keep_store_goes_on_above_the_watermark(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        highest = _write_some(daemon, "a", "b", "c")
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        os.unlink(_store(daemon, "-wal"))
        reset = run_fleetd(daemon.env, "reset-state", "--keep-store")
        assert reset.returncode == 0, reset.stderr
        assert "kept the store" in reset.stdout
        daemon.start()
        assert _write_some(daemon, "d") > highest
    finally:
        daemon.close()


def test_reset_state_refuses_while_fleetd_runs(fleetd: Fleetd) -> None:
    refused = run_fleetd(fleetd.env, "reset-state")
    assert refused.returncode == EX_TEMPFAIL
    assert "another fleetd" in _one_line(refused.stderr)


# -- files no record explains ------------------------------------------------------------------


def test_a_delivered_file_no_record_explains_is_quarantined_not_deleted(stopped: Fleetd) -> None:
    stray = os.path.join(stopped.state_dir, "inbox", "bob", "t1")
    os.makedirs(os.path.dirname(stray))
    with open(stray, "wb") as f:
        f.write(b"only copy\n")
    stopped.start().stop()
    assert not os.path.exists(stray)
    (moved,) = glob.glob(os.path.join(stopped.state_dir, "quarantine", "*", "inbox", "bob", "t1"))
    assert _read(moved) == b"only copy\n"
    assert "claim_file_quarantined" in stopped.log()
    assert os.path.exists(os.path.join(stopped.state_dir, "files", "kept"))


# -- unreadable stores: one line, never a traceback ---------------------------------------------


def test_a_garbled_header_is_one_line(stopped: Fleetd) -> None:
    with open(_store(stopped), "r+b") as f:
        f.write(b"this is not SQLite" * 6)
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "cannot open" in _one_line(stderr)


def test_a_store_cut_in_half_is_one_line(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        with SyncClient(daemon.socket_path) as client:
            for n in range(300):
                client.lease_acquire(f"lease-{n:04}-" + "x" * 100, "agent", ttl=600)
    finally:
        daemon.close()
    size = os.path.getsize(_store(daemon))
    assert size > 8 * 4096
    os.truncate(_store(daemon), size // 2)
    code, stderr = _refused(daemon)
    assert code == EX_DATAERR and "fleet.db" in _one_line(stderr)


def test_a_directory_in_place_of_the_store_is_one_line(stopped: Fleetd) -> None:
    for path in glob.glob(_store(stopped, "*")):
        os.unlink(path)
    os.mkdir(_store(stopped))
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "is not a file" in _one_line(stderr)


def test_a_damaged_watermark_is_one_line(stopped: Fleetd) -> None:
    with open(os.path.join(stopped.state_dir, "fleet.watermark"), "r+b") as f:
        f.write(b"\xff" * 128)
    code, stderr = _refused(stopped)
    assert code == EX_DATAERR and "is damaged" in _one_line(stderr)


def test_reset_state_without_a_watermark_goes_by_the_store(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        highest = _write_some(daemon, "a", "b", "c")
        daemon.signal(signal.SIGKILL)  # the WAL holds these: the store must be read whole
        daemon.wait()
        os.unlink(os.path.join(daemon.state_dir, "fleet.watermark"))
        reset = run_fleetd(daemon.env, "reset-state")
        assert reset.returncode == 0, reset.stderr
        daemon.start()
        assert _write_some(daemon, "d") > highest
    finally:
        daemon.close()


def test_reset_state_cannot_keep_a_store_it_cannot_read(stopped: Fleetd) -> None:
    with open(_store(stopped), "r+b") as f:
        f.write(b"this is not SQLite" * 6)
    refused = run_fleetd(stopped.env, "reset-state", "--keep-store")
    assert refused.returncode == EX_DATAERR
    assert "without --keep-store" in _one_line(refused.stderr)
