"""`fleetctl logs --timestamps` and `fleetctl logs CLUSTER`: each line with when its member's
holder read it, from the sidecar of times beside each log (protocol.logtimes); a cluster's
members' lines interleaved in that order, after their names.

Real fleetd, holders and members for the commands; the holder's log files (LogFile and its
TimesFile) in a temp directory, read back by fleetctl's reader, for rotation and damage; and
hypothesis for the format and the line mapping.
"""

import datetime
import io
import os
import re
import struct
import subprocess
import time
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetctl.logs import LinePrinter, print_lines
from fleetd.core.dirs import PrivateDir
from fleetd.holder.members import LogFile
from protocol.clusters import LogPaths
from protocol.logtimes import RECORD, SIZE, LineTimes, header, valid_records
from tests.processes import FLEETCTL, Fleetd, wait_until
from tests.test_detached import client, ctl, definition, up
from tests.test_logs import Follower

STAMPED = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (.*)$")


def stamped(out: bytes) -> list[tuple[float, bytes]]:
    """(Unix time, text) of each line; fails on a line without a timestamp."""
    lines = []
    for line in out.splitlines():
        match = STAMPED.match(line)
        assert match is not None, line
        when = datetime.datetime.strptime(match[1].decode(), "%Y-%m-%dT%H:%M:%S.%f%z")
        lines.append((when.timestamp(), match[2]))
    return lines


def command(script: str) -> str:
    return f'command = ["sh", "-c", "{script}"]'


# --- --timestamps ------------------------------------------------------------------------------


def test_timestamps_are_on_every_line_in_order_and_when_it_was_printed(holders: Fleetd) -> None:
    before = time.time()
    ticks = "for i in 1 2 3 4 5; do echo line$i; sleep 0.02; done; exec sleep 60"
    up(holders, definition("t", m=command(ticks)), "--wait")
    wait_until(lambda: ctl(holders, "logs", "m")[1].count("\n") == 5)
    code, out, err = ctl(holders, "logs", "m", "--timestamps")
    assert code == 0, err
    lines = stamped(out.encode())
    assert [text for _, text in lines] == [b"line1", b"line2", b"line3", b"line4", b"line5"]
    times = [when for when, _ in lines]
    assert times == sorted(times) and len(set(times)) == 5  # 20 ms apart: each its own
    assert before - 0.001 <= times[0] and times[-1] <= time.time()


def test_timestamps_with_tail_and_stderr(holders: Fleetd) -> None:
    up(holders, definition("t", m=command("echo a >&2; echo b >&2; exec sleep 60")), "--wait")
    wait_until(lambda: ctl(holders, "logs", "m", "--stderr")[1] == "a\nb\n")
    code, out, _ = ctl(holders, "logs", "m", "--stderr", "-t", "--tail", "1")
    assert code == 0 and [text for _, text in stamped(out.encode())] == [b"b"]


def test_a_log_without_its_sidecar_is_stamped_with_its_modification_time(
    holders: Fleetd,
) -> None:
    """As an older holder's log: the lines, each with when the log was written last."""
    up(holders, definition("t", m=command("echo one; echo two; exec sleep 60")), "--wait")
    wait_until(lambda: ctl(holders, "logs", "m")[1] == "one\ntwo\n")
    with client(holders) as c:
        log_path = c.member_logs("m").stdout
    os.unlink(os.path.join(os.path.dirname(log_path), "stdout.times"))
    code, out, _ = ctl(holders, "logs", "m", "--timestamps")
    mtime = os.stat(log_path).st_mtime_ns // 1_000_000 / 1000
    assert code == 0
    assert [(round(w, 3), t) for w, t in stamped(out.encode())] == [
        (mtime, b"one"),
        (mtime, b"two"),
    ]


def test_follow_with_timestamps_stamps_what_comes_and_ends_when_the_member_leaves(
    holders: Fleetd,
) -> None:
    polite = "trap 'echo bye; exit 0' TERM; echo first; sleep 60 & wait"
    up(holders, definition("t", m=command(polite), s='command = ["sleep", "60"]'), "--wait")
    follower = Follower(holders, "m", "-t")
    try:
        follower.read_until(b"first\n", 5)
        assert ctl(holders, "stop", "m")[0] == 0
        code, out, err = follower.wait(5)
    finally:
        follower.close()
    assert (code, [text for _, text in stamped(out)], err) == (0, [b"first", b"bye"], b"")


# --- the holder's files, read back -------------------------------------------------------------


@pytest.fixture
def member_dir(tmp_path: object) -> Iterator[PrivateDir]:
    with PrivateDir.open(os.path.join(str(tmp_path), "m")) as directory:
        yield directory


def written(directory: PrivateDir, chunks: list[bytes], max_bytes: int = 1 << 20) -> None:
    """As a holder's pump writes them: each chunk a few ms after the one before."""
    log_file = LogFile(directory, "stdout.log", max_bytes)
    try:
        for chunk in chunks:
            log_file.write(chunk)
            time.sleep(0.003)
    finally:
        log_file.close()


def read_back(directory: PrivateDir, *, timestamps: bool = True) -> list[tuple[float, bytes]]:
    out = io.BytesIO()
    path = directory.join("stdout.log")
    paths = LogPaths(cluster="c", member="m", stdout=path, stderr=path + ".none")
    print_lines([paths], LinePrinter(out, timestamps=timestamps), streams=["stdout"])
    return stamped(out.getvalue())


def test_the_sidecar_is_rotated_with_its_log(member_dir: PrivateDir) -> None:
    lines = [b"%03d %s\n" % (i, b"x" * 40) for i in range(40)]
    written(member_dir, lines, max_bytes=1000)
    assert sorted(member_dir.names()) == [
        "stdout.log",
        "stdout.log.1",
        "stdout.times",
        "stdout.times.1",
    ]
    back = read_back(member_dir)
    with open(member_dir.join("stdout.log.1"), "rb") as f:
        rotated = f.read().count(b"\n")
    assert 0 < rotated < len(back)
    assert [text + b"\n" for _, text in back] == lines[-len(back) :]
    times = [when for when, _ in back]
    assert times == sorted(times)
    assert len(set(times)) > len(times) / 2  # chunks 3 ms apart: most their own millisecond


def test_a_sidecar_past_the_cap_rotates_its_log(member_dir: PrivateDir) -> None:
    """A byte a millisecond: the sidecar would grow 16 times faster than the log."""
    log_file = LogFile(member_dir, "stdout.log", max_bytes=4096)
    try:
        for _ in range(300):
            log_file.write(b".")
            time.sleep(0.0012)
    finally:
        log_file.close()
    assert os.path.getsize(member_dir.join("stdout.log.1")) < 300
    assert os.path.getsize(member_dir.join("stdout.times.1")) <= 2 * 4096


def test_a_log_is_printed_as_it_is_read_not_held_in_memory_first(member_dir: PrivateDir) -> None:
    log_file = LogFile(member_dir, "stdout.log", max_bytes=1 << 30)
    try:
        for _ in range(500):
            log_file.write(b"%099d\n" % 0 * 100)  # 5 MB of 100-byte lines
    finally:
        log_file.close()
    path = member_dir.join("stdout.log")
    paths = LogPaths(cluster="c", member="m", stdout=path, stderr=path + ".none")
    with open(os.devnull, "wb") as sink:
        tracemalloc.start()
        try:
            print_lines([paths], LinePrinter(sink, timestamps=True), streams=["stdout"])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 1_000_000, peak


def test_a_missing_sidecar_loses_no_line(member_dir: PrivateDir) -> None:
    written(member_dir, [b"a\n", b"b\nc", b"\n"])
    member_dir.unlink("stdout.times")
    assert [text for _, text in read_back(member_dir)] == [b"a", b"b", b"c"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: SIZE + SIZE // 2],  # cut mid-record
        lambda data: b"\xff" * len(data),  # garbage, header included
        lambda data: data[: 2 * SIZE] + RECORD.pack(0, 1) + data[3 * SIZE :],  # goes back
        lambda data: data[:SIZE] + os.urandom(len(data) - SIZE),
        lambda data: b"",
    ],
    ids=["cut", "garbage", "back", "random", "empty"],
)
def test_a_garbled_sidecar_loses_no_line_and_keeps_times_in_order(
    member_dir: PrivateDir, damage: object
) -> None:
    written(member_dir, [b"a\n", b"b\n", b"c\nd\n", b"e\n"])
    path = member_dir.join("stdout.times")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))  # type: ignore[operator]
    back = read_back(member_dir)
    assert [text for _, text in back] == [b"a", b"b", b"c", b"d", b"e"]
    assert [when for when, _ in back] == sorted(when for when, _ in back)


def test_a_sidecar_cut_short_while_it_is_written_leaves_the_log_going(
    member_dir: PrivateDir,
) -> None:
    """`: > stdout.times` by hand, as one empties a log: no SIGBUS, the lines still there."""
    log_file = LogFile(member_dir, "stdout.log")
    try:
        log_file.write(b"before\n")
        os.truncate(member_dir.join("stdout.times"), 0)
        time.sleep(0.002)
        log_file.write(b"after\n")
    finally:
        log_file.close()
    assert [text for _, text in read_back(member_dir)] == [b"before", b"after"]


def test_a_new_holder_goes_on_with_the_times_of_a_log_it_appends_to(
    member_dir: PrivateDir,
) -> None:
    written(member_dir, [b"first\n"])
    time.sleep(0.01)
    written(member_dir, [b"second\n"])
    (first, _), (second, _) = read_back(member_dir)
    assert second - first >= 0.009


# --- logs CLUSTER ------------------------------------------------------------------------------

TURNS = 3


def in_turns(me: str, other: str, *, first: bool, fd: int = 1) -> str:
    """A member that prints `ME1`, `ME2`... alternately with `other`: each waits for the
    other's file of the turn before printing, and leaves its own 100 ms after printing
    (the holder has read the line by then)."""
    wait = f"while [ ! -e {other}$i ]; do sleep 0.01; done"
    say = f"echo {me}$i >&{fd}; sleep 0.1; touch {me}$i"
    turn = f"{say}; {wait}" if first else f"{wait}; {say}"
    return command(f"for i in $(seq {TURNS}); do {turn}; done; exec sleep 60")


PAIR = definition(
    "pair",
    web=in_turns("web", "worker", first=True),
    worker=in_turns("worker", "web", first=False, fd=2),
)
EXPECTED = [
    f"{name:<6} | {name}{turn}" for turn in range(1, TURNS + 1) for name in ("web", "worker")
]


def test_logs_of_a_cluster_interleaves_its_members_in_the_order_they_printed(
    holders: Fleetd,
) -> None:
    up(holders, PAIR, "--wait")
    wait_until(lambda: os.path.exists(os.path.join(holders.root, f"worker{TURNS}")), timeout=20)
    code, out, err = ctl(holders, "logs", "pair")
    assert (code, out.splitlines(), err) == (0, EXPECTED, "")
    code, out, _ = ctl(holders, "logs", "pair", "--timestamps", "--tail", "1")
    assert code == 0
    assert [line.split(" ", 1)[0] for line in out.splitlines()] == ["web", "worker"]
    assert [line.endswith(f"{TURNS}") for line in out.splitlines()] == [True, True]


def test_logs_of_a_cluster_of_more_members_than_a_shells_open_file_limit_allows(
    holders: Fleetd,
) -> None:
    """Every member's logs are open at once: fleetctl raises its soft limit (32 here, 1,024
    in a shell) to the hard one."""
    talk = command("echo out $FLEET_MEMBER; echo err $FLEET_MEMBER >&2; exec sleep 60")
    names = [f"m{i}" for i in range(20)]
    up(holders, definition("crowd", **dict.fromkeys(names, talk)), "--wait")
    wait_until(lambda: len(ctl(holders, "logs", "crowd")[1].splitlines()) == 2 * len(names))
    limited = ["sh", "-c", 'ulimit -Sn 32 && exec "$@"', "sh", *FLEETCTL, "logs", "crowd"]
    done = subprocess.run(limited, env=holders.env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 * len(names)


def test_a_member_name_means_the_member_even_where_a_cluster_has_it(holders: Fleetd) -> None:
    up(holders, definition("pair", pair=command("echo me; exec sleep 60")), "--wait")
    wait_until(lambda: ctl(holders, "logs", "pair")[1] == "me\n")  # no prefix: the member


@pytest.fixture
def pair_follower(holders: Fleetd) -> Iterator[Follower]:
    """`fleetctl logs -f pair`, killed at the end if it runs."""
    up(holders, PAIR, "--wait")
    follower = Follower(holders, "pair")
    try:
        yield follower
    finally:
        follower.close()


def test_follow_of_a_cluster_shows_every_member_and_ends_at_down(
    holders: Fleetd, pair_follower: Follower
) -> None:
    follower = pair_follower
    marker = f"worker | worker{TURNS}\n".encode()
    assert follower.read_until(marker, 20).decode().splitlines() == EXPECTED
    assert ctl(holders, "down", "pair")[0] == 0
    code, out, err = follower.wait(5)
    assert (code, out.decode().splitlines(), err) == (0, EXPECTED, b"")


def test_follow_of_a_cluster_follows_a_member_added_meanwhile(holders: Fleetd) -> None:
    up(holders, definition("grow", a=command("echo $FLEET_MEMBER here; exec sleep 60")), "--wait")
    follower = Follower(holders, "grow")
    try:
        follower.read_until(b"a | a here\n", 10)
        assert ctl(holders, "add", "b", "--sibling", "a")[0] == 0
        follower.read_until(b"b | b here\n", 10)
        assert ctl(holders, "down", "grow")[0] == 0
        assert follower.wait(5) == (0, b"a | a here\nb | b here\n", b"")
    finally:
        follower.close()


def test_logs_of_a_cluster_that_is_down_prints_what_its_members_wrote(holders: Fleetd) -> None:
    up(holders, PAIR, "--wait")
    wait_until(lambda: os.path.exists(os.path.join(holders.root, f"worker{TURNS}")), timeout=20)
    assert ctl(holders, "down", "pair")[0] == 0
    for args in (["pair"], ["pair", "-f"]):
        code, out, _ = ctl(holders, "logs", *args)
        assert (code, out.splitlines()) == (0, EXPECTED)


# --- the format and the mapping ----------------------------------------------------------------

chunkings = st.lists(
    st.tuples(
        st.binary(min_size=1, max_size=20).map(lambda b: b.replace(b"\r", b"\n")),
        st.integers(0, 3_000_000),
    ),
    min_size=1,
    max_size=30,
)


def sidecar_of(chunks: list[tuple[bytes, int]], inode: int) -> tuple[bytes, list[int]]:
    """The sidecar a holder writes for these chunks (each read `gap` ns after the one before,
    one record per millisecond), and the time each byte was read."""
    now, last, offset = 1_700_000_000_000_000_000, 0, 0
    data, byte_times = bytearray(header(inode)), []
    for chunk, gap in chunks:
        now += gap
        if now // 1_000_000 != last // 1_000_000:
            data += RECORD.pack(offset, now)
            last = now
        byte_times += [last] * len(chunk)
        offset += len(chunk)
    return bytes(data) + b"\0" * SIZE * 3, byte_times  # room reserved, unused


def lines_of(chunks: list[tuple[bytes, int]], records: list[tuple[int, int]], rechunk: int) -> list:
    lines = LineTimes()
    lines.add(records)
    text = b"".join(chunk for chunk, _ in chunks)
    found = []
    for begin in range(0, len(text), rechunk):
        found += lines.feed(text[begin : begin + rechunk], fallback=7)
    return found + lines.end()


@given(chunkings, st.integers(1, 50))
def test_every_line_gets_the_time_its_last_byte_was_read(
    chunks: list[tuple[bytes, int]], rechunk: int
) -> None:
    sidecar, byte_times = sidecar_of(chunks, inode=42)
    records = valid_records(sidecar[SIZE:])
    found = lines_of(chunks, records, rechunk)
    text = b"".join(chunk for chunk, _ in chunks)
    assert b"".join(line for _, line in found) == text
    ends = []
    for line in found:
        ends.append((ends[-1] if ends else 0) + len(line[1]))
    assert [when for when, _ in found] == [byte_times[end - 1] for end in ends]


@given(chunkings, st.binary(max_size=80), st.integers(0, 200), st.integers(1, 50))
def test_any_sidecar_bytes_date_every_line_in_order(
    chunks: list[tuple[bytes, int]], garbage: bytes, at: int, rechunk: int
) -> None:
    sidecar, _ = sidecar_of(chunks, inode=42)
    garbled = sidecar[SIZE : SIZE + at] + garbage + sidecar[SIZE + at :]
    found = lines_of(chunks, valid_records(garbled), rechunk)
    assert b"".join(line for _, line in found) == b"".join(chunk for chunk, _ in chunks)
    times = [when for when, _ in found]
    assert times == sorted(times) and all(when > 0 for when in times)


def test_the_record_layout_is_little_endian_offset_then_nanoseconds() -> None:
    assert RECORD.pack(1, 2) == struct.pack("<QQ", 1, 2) and SIZE == 16
    assert header(5) == b"fleettm1" + struct.pack("<Q", 5)
