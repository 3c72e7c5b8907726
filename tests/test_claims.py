"""The claims journal: pure decisions, the service over a real store (full disk, crash
reconciliation), and `fleetctl claims` as scripts run it, pinned by golden envelopes."""

import contextlib
import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from fleetctl import SyncClient
from fleetd import claims as claims_module
from fleetd import delivery
from fleetd.claims import (
    ClaimService,
    Delivered,
    StoredClaim,
    decide_acquire,
    decide_release,
    record_key,
    relative_path,
)
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Peer
from fleetd.delivery import STAGING, deliver
from fleetd.state import STORE_FILE
from fleetd.store import Put
from fleetd.store.sqlite import SQLiteStore
from protocol.claims import (
    MAX_CONTENT,
    ClaimAcquire,
    ClaimInspect,
    ClaimListRequest,
    ClaimRelease,
)
from protocol.errors import FleetError, InvalidRequest, StoreFull, UnsafePath
from protocol.outcomes import Outcome
from tests.processes import FLEETCTL, Fleetd, mount_tmpfs, running_fleetd

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "claims")
UPDATE = os.environ.get("FLEET_UPDATE_GOLDEN") == "1"
PEER = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


# -- decisions ----------------------------------------------------------------------------------


def _record(owner: str = "a", state: Any = "held", sha256: str = "x") -> StoredClaim:
    return StoredClaim(owner=owner, state=state, path="/p", sha256=sha256, size=1, acquired_at=1)


def test_acquire_decisions() -> None:
    assert decide_acquire(None, "a", "x") is Outcome.ACQUIRED
    assert decide_acquire(_record(state="released"), "b", "y") is Outcome.ACQUIRED
    assert decide_acquire(_record(), "a", "x") is Outcome.ALREADY_ACQUIRED
    assert decide_acquire(_record(), "a", "y") is Outcome.CONTESTED
    assert decide_acquire(_record(), "b", "x") is Outcome.CONTESTED


def test_release_decisions() -> None:
    assert decide_release(None, "a") is Outcome.ABSENT
    assert decide_release(_record(), "b") is Outcome.NOT_OWNED
    assert decide_release(_record(state="released"), "b") is Outcome.NOT_OWNED
    assert decide_release(_record(), "a") is Outcome.RELEASED
    assert decide_release(_record(state="released"), "a") is Outcome.ALREADY_RELEASED


# -- the service over a real store --------------------------------------------------------------


@asynccontextmanager
async def service(root: str, max_bytes: int | None = None) -> AsyncIterator[ClaimService]:
    with PrivateDir.open(os.path.join(root, "state")) as state:
        async with SQLiteStore.open(os.path.join(root, "store.db")) as store:
            claims = ClaimService(store, state, max_bytes=max_bytes)
            async with anyio.create_task_group() as tasks:
                await tasks.start(claims.serve)
                yield claims
                tasks.cancel_scope.cancel()


def _files(root: str) -> list[str]:
    found = []
    for directory, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(directory, n), root) for n in names]
    return sorted(found)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _placed(state: str) -> list[str]:
    """The files under the state directory but for the staging ones."""
    return [f for f in _files(state) if not f.startswith(STAGING)]


def _staged_contents(state: str) -> list[bytes]:
    """What the staging files hold, but for the empty ones (spares for stagings to come)."""
    staging = os.path.join(state, STAGING)
    contents = [_read(os.path.join(staging, name)) for name in os.listdir(staging)]
    return sorted(content for content in contents if content)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _acquire(key: str, content: bytes, owner: str = "alice", kind: str = "prompt_inbox") -> Any:
    return ClaimAcquire(id=1, kind=kind, key=key, owner=owner, content=content)


def _release(key: str, owner: str = "alice", kind: str = "prompt_inbox") -> Any:
    return ClaimRelease(id=1, kind=kind, key=key, owner=owner)


async def test_acquire_delivers_the_file_and_release_removes_it(tempdir: str) -> None:
    async with service(tempdir) as claims:
        result = await claims.acquire(_acquire("p1", b"hello\n"), PEER)
        assert result.outcome is Outcome.ACQUIRED and result.claim is not None
        path = os.path.join(tempdir, "state", "inbox", "alice", "p1")
        assert result.claim.path == path
        assert _read(path) == b"hello\n"
        assert result.claim.sha256 == hashlib.sha256(b"hello\n").hexdigest()
        assert _staged_contents(claims.state.path) == []
        again = await claims.acquire(_acquire("p1", b"hello\n"), PEER)
        assert (again.outcome, again.claim) == (Outcome.ALREADY_ACQUIRED, result.claim)
        released = await claims.release(
            ClaimRelease(id=2, kind="prompt_inbox", key="p1", owner="alice"), PEER
        )
        assert released.outcome is Outcome.RELEASED
        assert _read(path) is None


@pytest.mark.parametrize(
    ("key", "content", "message"),
    [
        ("k", b"", "empty content"),
        ("k", b"\xff\xfe", "binary content refused"),
        ("k", b"a\0b", "binary content refused"),
        ("k", b"x" * 65, "over the maximum of 64"),
        ("a/b", b"x", "'/' and '..' are refused"),
        ("..", b"x", "'/' and '..' are refused"),
        ("a..b", b"x", "'/' and '..' are refused"),
        ("a\0b", b"x", "NUL byte"),
        ("", b"x", "invalid key"),
    ],
)
async def test_bad_input_is_refused_and_nothing_is_written(
    tempdir: str, key: str, content: bytes, message: str
) -> None:
    async with service(tempdir, max_bytes=64) as claims:
        before = claims._store.revision
        with pytest.raises(InvalidRequest, match=message):
            await claims.acquire(_acquire(key, content), PEER)
        assert claims._store.revision == before
        assert _files(claims.state.path) == []


async def test_unknown_kind_and_bad_owner_are_refused(tempdir: str) -> None:
    async with service(tempdir) as claims:
        with pytest.raises(InvalidRequest, match="unknown claim kind 'disk'"):
            await claims.acquire(_acquire("k", b"x", kind="disk"), PEER)
        with pytest.raises(InvalidRequest, match="invalid owner"):
            await claims.acquire(_acquire("k", b"x", owner="../etc"), PEER)
        with pytest.raises(InvalidRequest, match="unknown claim kind"):
            await claims.list(ClaimListRequest(id=1, kind="disk"), PEER)


async def test_full_store_is_an_error_and_leaves_journal_and_inbox_unchanged(
    tempdir: str,
) -> None:
    async with service(tempdir) as claims:
        await claims.acquire(_acquire("kept", b"kept"), PEER)
        store = claims._store
        assert isinstance(store, SQLiteStore)
        await store.set_max_pages(await store.set_max_pages(1) + 2)
        for n, size in enumerate((4096, 512, 64, 8) * 4):  # fill every page to the cap
            with contextlib.suppress(StoreFull):
                while True:
                    await store.put(f"filler/{n}/{store.revision}", b"f" * size)
        before, files = store.revision, _placed(claims.state.path)
        with pytest.raises(StoreFull):
            await claims.acquire(_acquire("big", b"x" * (MAX_CONTENT - 1)), PEER)
        assert store.revision == before
        assert _placed(claims.state.path) == files
        assert _staged_contents(claims.state.path) == []
        await store.set_max_pages(None)
        result = await claims.acquire(_acquire("big", b"x" * (MAX_CONTENT - 1)), PEER)
        assert result.outcome is Outcome.ACQUIRED


async def test_full_disk_while_delivering_writes_nothing(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async with service(tempdir) as claims:
        monkeypatch.setattr("fleetd.delivery.os.write", full)
        with pytest.raises(StoreFull, match="the disk is full"):
            await claims.acquire(_acquire("k", b"x"), PEER)
        monkeypatch.undo()
        assert (await claims.list(ClaimListRequest(id=1), PEER)).claims == []
        assert _placed(claims.state.path) == []
        assert _staged_contents(claims.state.path) == []


def _write_out_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every staging's write-out fails, as on a full disk (its first sight of it may be there)."""
    sync_file_range = delivery._sync_file_range

    def full(fd: int, flags: int) -> OSError | None:
        if flags == delivery._START_AND_WAIT:
            return OSError(errno.ENOSPC, "No space left on device")
        return sync_file_range(fd, flags)

    monkeypatch.setattr(delivery, "_sync_file_range", full)


async def test_a_write_out_that_fails_after_the_record_committed_restores_the_previous_record(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record and the write-out go to disk together; a full disk may show only at the
    write-out, when the record is already committed: it is taken back, and the error
    answered."""
    async with service(tempdir) as claims:
        await claims.acquire(_acquire("k", b"first\n"), PEER)
        released = (await claims.release(_release("k"), PEER)).claim
        _write_out_fails(monkeypatch)
        with pytest.raises(StoreFull, match="the disk is full"):
            await claims.acquire(_acquire("k", b"second\n", owner="bob"), PEER)
        monkeypatch.undo()
        inspected = await claims.inspect(ClaimInspect(id=1, kind="prompt_inbox", key="k"), PEER)
        assert inspected.claim == released
        assert _placed(claims.state.path) == []
        staging = os.path.join(claims.state.path, STAGING)
        kept = [_read(os.path.join(staging, name)) for name in os.listdir(staging)]
        assert b"second\n" not in kept, "the failed staging is gone (a released file may stay)"


async def test_a_write_out_that_fails_for_a_new_claim_leaves_no_record(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with service(tempdir) as claims:
        _write_out_fails(monkeypatch)
        with pytest.raises(StoreFull):
            await claims.acquire(_acquire("k", b"x"), PEER)
        monkeypatch.undo()
        assert (await claims.list(ClaimListRequest(id=1), PEER)).claims == []
        assert (await claims.acquire(_acquire("k", b"x"), PEER)).outcome is Outcome.ACQUIRED


async def test_a_failed_take_back_is_logged_and_start_up_delivers_the_claim(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write-out failed after the record committed, and so did writing the record back:
    the caller was answered the write-out's error, and start-up finds a held record with no
    file, and its content in the store: the claim is held, so its file is delivered (the
    caller's retry answers already_acquired)."""
    async with service(tempdir) as claims:
        _write_out_fails(monkeypatch)
        txn, calls = claims._txn, []

        async def second_fails(*args: Any) -> Any:
            calls.append(args)
            if len(calls) == 2:
                raise StoreFull("the store's disk is full; nothing was written")
            return await txn(*args)

        monkeypatch.setattr(claims, "_txn", second_fails)
        with capture_logs() as logs, pytest.raises(StoreFull, match="cannot deliver"):
            await claims.acquire(_acquire("k", b"x"), PEER)
        monkeypatch.undo()
        assert [e["claim"] for e in logs if e["event"] == "claim_not_withdrawn"] == [
            "prompt_inbox/k"
        ]
        assert len((await claims.list(ClaimListRequest(id=1), PEER)).claims) == 1
    async with service(tempdir) as claims:
        [held] = (await claims.list(ClaimListRequest(id=1), PEER)).claims
        assert (held.state, _read(held.path)) == ("held", b"x")
        retried = await claims.acquire(_acquire("k", b"x"), PEER)
        assert retried.outcome is Outcome.ALREADY_ACQUIRED


async def test_a_retried_acquire_whose_file_went_missing_delivers_it_again(tempdir: str) -> None:
    """ALREADY_ACQUIRED means the file is in place, whatever happened to it meanwhile."""
    async with service(tempdir) as claims:
        first = await claims.acquire(_acquire("k", b"prompt\n"), PEER)
        assert first.claim is not None
        os.unlink(first.claim.path)
        again = await claims.acquire(_acquire("k", b"prompt\n"), PEER)
        assert (again.outcome, again.claim) == (Outcome.ALREADY_ACQUIRED, first.claim)
        assert _read(first.claim.path) == b"prompt\n"


async def test_a_retried_acquire_finds_its_file_without_following_a_planted_link(
    tempdir: str,
) -> None:
    """The owner's inbox replaced by a link to a directory holding a file of the same name:
    the retry looks link-free, finds no file, and its delivery is refused at the link."""
    async with service(tempdir) as claims:
        first = await claims.acquire(_acquire("k", b"prompt\n"), PEER)
        assert first.claim is not None
        inbox = os.path.dirname(first.claim.path)
        elsewhere = os.path.join(tempdir, "elsewhere")
        os.rename(inbox, elsewhere)
        os.symlink(elsewhere, inbox)
        _write(os.path.join(elsewhere, "k"), b"planted\n")
        with pytest.raises(UnsafePath):
            await claims.acquire(_acquire("k", b"prompt\n"), PEER)
        assert _read(os.path.join(elsewhere, "k")) == b"planted\n"


async def test_acquires_that_fill_the_disk_together_answer_no_space_and_lose_nothing(
    tempdir: str,
) -> None:
    state = os.path.join(tempdir, "state")
    if not mount_tmpfs(state, "1m"):
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        async with service(tempdir) as claims:
            answers: dict[str, str] = {}
            content = b"x" * 200_000

            async def acquire(key: str) -> None:
                try:
                    result = await claims.acquire(_acquire(key, content, kind="file"), PEER)
                    answers[key] = result.outcome
                except StoreFull:
                    answers[key] = "no_space"

            async with anyio.create_task_group() as tasks:
                for n in range(8):
                    tasks.start_soon(acquire, f"k{n}")
            held = sorted(c.key for c in (await claims.list(ClaimListRequest(id=1), PEER)).claims)
            assert sorted(answers.values()) == ["acquired"] * len(held) + ["no_space"] * (
                8 - len(held)
            )
            assert 0 < len(held) < 8
            assert sorted(os.listdir(os.path.join(state, "files"))) == held
            assert all(_read(os.path.join(state, "files", key)) == content for key in held)
            assert _staged_contents(state) == []
    finally:
        await anyio.run_process(["umount", "-l", state], check=False)


async def test_concurrent_acquires_and_releases_of_one_key_keep_their_order(
    tempdir: str,
) -> None:
    """Requests of one claim, in flight together and batched with other claims' requests,
    take effect in the order they arrived: each release removes the file its acquire
    delivered, and never the next one's."""
    rounds = 20
    async with service(tempdir) as claims:
        outcomes: dict[int, Outcome] = {}

        async def run(n: int, request: Any) -> None:
            handler = claims.acquire if isinstance(request, ClaimAcquire) else claims.release
            outcomes[n] = (await handler(request, PEER)).outcome

        async with anyio.create_task_group() as tasks:
            for n in range(rounds):
                tasks.start_soon(run, 2 * n, _acquire("same", f"round {n}\n".encode()))
                tasks.start_soon(run, 2 * n + 1, _release("same"))
                tasks.start_soon(run, 1000 + n, _acquire(f"other-{n}", b"other\n", owner="bob"))
            tasks.start_soon(run, 2 * rounds, _acquire("same", b"last\n"))
        assert [outcomes[n] for n in range(2 * rounds + 1)] == [
            Outcome.ACQUIRED,
            Outcome.RELEASED,
        ] * rounds + [Outcome.ACQUIRED]
        assert _read(os.path.join(claims.state.path, "inbox", "alice", "same")) == b"last\n"
        assert len(os.listdir(os.path.join(claims.state.path, "inbox", "bob"))) == rounds


async def test_a_failed_acquire_does_not_fail_those_batched_with_it(tempdir: str) -> None:
    async with service(tempdir) as claims:
        os.makedirs(os.path.join(claims.state.path, "inbox"), mode=0o700)
        os.symlink(tempdir, os.path.join(claims.state.path, "inbox", "mallory"))
        refused: list[str] = []

        async def acquire(owner: str) -> None:
            try:
                await claims.acquire(_acquire(f"k-{owner}", b"x", owner=owner), PEER)
            except UnsafePath:
                refused.append(owner)

        async with anyio.create_task_group() as tasks:
            for owner in ("a", "mallory", "b"):
                tasks.start_soon(acquire, owner)
        held = (await claims.list(ClaimListRequest(id=1), PEER)).claims
        assert refused == ["mallory"]
        assert sorted(c.key for c in held) == ["k-a", "k-b"]
        assert _placed(claims.state.path) == ["inbox/a/k-a", "inbox/b/k-b"]


async def test_start_up_reconciles_what_a_crash_left(tempdir: str) -> None:
    state = os.path.join(tempdir, "state")
    async with service(tempdir) as claims:
        await claims.acquire(_acquire("held", b"1"), PEER)
        await claims.acquire(_acquire("gone", b"2"), PEER)
        await claims.release(
            ClaimRelease(id=1, kind="prompt_inbox", key="gone", owner="alice"), PEER
        )
        # a release that crashed before the unlink, a delivery before its journal write,
        # and a staging file from a write cut short:
        deliver(claims.state, relative_path("prompt_inbox", "gone", "alice"), b"2")
        deliver(claims.state, relative_path("prompt_inbox", "orphan", "bob"), b"3")
        _write(os.path.join(claims.state.path, STAGING, "1-2.tmp"), b"half")
    async with service(tempdir):
        held, quarantined = _files(state)
        assert held == "inbox/alice/held"
        assert re.fullmatch(r"quarantine/[^/]+/inbox/bob/orphan", quarantined)
        assert _read(os.path.join(state, quarantined)) == b"3"


# -- crash states, built on disk, and fleetd started on them -------------------------------------


T = TypeVar("T")


def _in_store(daemon: Fleetd, use: Callable[[SQLiteStore], Awaitable[T]]) -> T:
    """What `use` makes of the store of a stopped fleetd."""

    async def opened() -> T:
        async with SQLiteStore.open(os.path.join(daemon.state_dir, STORE_FILE)) as store:
            return await use(store)

    return anyio.run(opened)


def _stored_value(daemon: Fleetd, key: str) -> bytes:
    """The record of prompt_inbox claim `key` as the store of a stopped fleetd holds it."""
    kv = _in_store(daemon, lambda store: store.get(record_key("prompt_inbox", key)))
    assert kv is not None
    return kv.value


def _stored_record(daemon: Fleetd, key: str) -> StoredClaim:
    return msgspec.json.decode(_stored_value(daemon, key), type=StoredClaim)


def _stored_content(daemon: Fleetd, key: str) -> bytes:
    """The content the record of prompt_inbox claim `key` keeps (a stopped fleetd's)."""
    return msgspec.json.decode(_stored_value(daemon, key), type=Delivered).content


def _delete_stored_content(daemon: Fleetd, key: str) -> None:
    """The record rewritten as a fleetd from before contents were kept wrote it."""
    put = Put(record_key("prompt_inbox", key), msgspec.json.encode(_stored_record(daemon, key)))
    _in_store(daemon, lambda store: store.txn((), (put,)))


def _stopped_with_claim(tempdir: str, key: str, content: bytes, *, release: bool = False) -> Fleetd:
    """A fleetd that acquired (and, if `release`, released) alice's claim `key`, now stopped."""
    daemon = Fleetd(tempdir).start()
    with SyncClient(daemon.socket_path) as client:
        client.claim_acquire("prompt_inbox", key, "alice", content)
        if release:
            client.claim_release("prompt_inbox", key, "alice")
    daemon.stop()
    return daemon


def _inbox_file(daemon: Fleetd, key: str, owner: str = "alice") -> str:
    return os.path.join(daemon.state_dir, "inbox", owner, key)


def _staging_file(daemon: Fleetd, name: str) -> str:
    return os.path.join(daemon.state_dir, STAGING, name)


def _claim(daemon: Fleetd, key: str) -> Any:
    with SyncClient(daemon.socket_path) as client:
        return client.claim_inspect("prompt_inbox", key)


def test_a_held_claim_found_only_staged_is_rolled_forward_at_start_up(tempdir: str) -> None:
    """A crash after the record and the staged file were durable, before the rename."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        record = _stored_record(daemon, "p")
        assert record is not None and record.staged
        os.rename(_inbox_file(daemon, "p"), _staging_file(daemon, record.staged))
        daemon.start()
        assert _read(_inbox_file(daemon, "p")) == b"prompt\n"
        assert os.listdir(os.path.join(daemon.state_dir, STAGING)) == []
        assert _claim(daemon, "p").claim.state == "held"
    finally:
        daemon.close()


def test_a_staged_file_that_is_not_the_records_content_is_not_rolled_forward(
    tempdir: str,
) -> None:
    """A power loss before the staged file was written out (a reused file may still hold what
    it held before): that file never reaches the inbox; the content in the store does."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        record = _stored_record(daemon, "p")
        assert record is not None and record.staged
        os.unlink(_inbox_file(daemon, "p"))
        _write(_staging_file(daemon, record.staged), b"prompX\n")
        daemon.start()
        assert _read(_inbox_file(daemon, "p")) == b"prompt\n"
        assert os.listdir(os.path.join(daemon.state_dir, STAGING)) == []
        assert _claim(daemon, "p").claim.state == "held"
    finally:
        daemon.close()


def test_rolling_forward_replaces_a_released_claims_file_the_crash_kept(tempdir: str) -> None:
    """Released (its unlink lost to the crash), acquired again, and staged only."""
    daemon = _stopped_with_claim(tempdir, "p", b"new\n")
    try:
        record = _stored_record(daemon, "p")
        assert record is not None
        os.rename(_inbox_file(daemon, "p"), _staging_file(daemon, record.staged))
        _write(_inbox_file(daemon, "p"), b"old\n")
        daemon.start()
        assert _read(_inbox_file(daemon, "p")) == b"new\n"
        assert not any("quarantine" in f for f in _files(daemon.state_dir))
    finally:
        daemon.close()


def test_rolling_forward_through_a_planted_link_is_refused_and_fleetd_starts(
    tempdir: str,
) -> None:
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        record = _stored_record(daemon, "p")
        assert record is not None
        os.rename(_inbox_file(daemon, "p"), _staging_file(daemon, record.staged))
        owner = os.path.dirname(_inbox_file(daemon, "p"))
        os.rmdir(owner)
        elsewhere = os.path.join(tempdir, "elsewhere")
        os.mkdir(elsewhere)
        os.symlink(elsewhere, owner)
        daemon.start()
        assert os.listdir(elsewhere) == []
        assert _read(_inbox_file(daemon, "p")) == b"prompt\n", "delivered from the store"
        assert not os.path.islink(os.path.dirname(_inbox_file(daemon, "p")))
        assert os.listdir(os.path.join(daemon.state_dir, STAGING)) == []
        assert any(re.fullmatch(r"quarantine/[^/]+/inbox/alice", f) for f in _links(daemon))
    finally:
        daemon.close()


def _links(daemon: Fleetd) -> list[str]:
    found = []
    for directory, dirs, _ in os.walk(daemon.state_dir):
        for name in dirs:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                found.append(os.path.relpath(path, daemon.state_dir))
    return found


def test_a_held_claim_whose_file_is_nowhere_is_delivered_again_from_the_store(
    tempdir: str,
) -> None:
    """A power loss took its rename and its staging (neither is flushed when the acquire is
    answered): its content is in the store."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        os.unlink(_inbox_file(daemon, "p"))
        daemon.start()
        assert _read(_inbox_file(daemon, "p")) == b"prompt\n"
        assert _claim(daemon, "p").claim.state == "held"
        assert any(
            '"claim_delivered_again"' in line and _inbox_file(daemon, "p") in line
            for line in daemon.log().splitlines()
        )
    finally:
        daemon.close()


def test_a_released_claim_leaves_no_content_in_the_store(tempdir: str) -> None:
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n", release=True)
    try:
        assert _stored_content(daemon, "p") == b""
    finally:
        daemon.close()


async def test_only_a_claim_too_large_for_its_record_has_its_file_flushed(
    tempdir: str, flushed: list[int]
) -> None:
    """A small content is durable in its record; a large one only in its file."""
    async with service(tempdir) as claims:
        await claims.acquire(_acquire("small", b"s" * claims_module.RECORDED), PEER)
        assert flushed == []
        await claims.acquire(_acquire("large", b"x" * (claims_module.RECORDED + 1)), PEER)
        assert len(flushed) == 1


def test_a_large_claim_whose_file_is_nowhere_at_start_up_is_dropped(tempdir: str) -> None:
    """Over RECORDED, the record leaves the content out (it would cost the store more than
    the file's flush): so its file, found nowhere at start-up, was never answered, and its
    record is dropped."""
    large = b"x" * (claims_module.RECORDED + 1)
    daemon = _stopped_with_claim(tempdir, "p", large)
    try:
        assert _stored_content(daemon, "p") == b""
        os.unlink(_inbox_file(daemon, "p"))
        daemon.start()
        assert _claim(daemon, "p").outcome == "absent"
    finally:
        daemon.close()


def test_a_held_claim_without_stored_content_whose_file_is_nowhere_is_dropped(
    tempdir: str,
) -> None:
    """A record written before fleetd kept contents, whose file is nowhere: its acquire was
    never answered (that fleetd flushed the file first), so a retry by the caller delivers
    again."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        assert _stored_content(daemon, "p") == b"prompt\n"
        _delete_stored_content(daemon, "p")
        os.unlink(_inbox_file(daemon, "p"))
        daemon.start()
        assert _claim(daemon, "p").outcome == "absent"
        assert any(
            '"claim_dropped"' in line and '"prompt_inbox/p"' in line
            for line in daemon.log().splitlines()
        )
        with SyncClient(daemon.socket_path) as client:
            assert client.claim_acquire("prompt_inbox", "p", "alice", b"prompt\n").outcome == (
                "acquired"
            )
        assert _read(_inbox_file(daemon, "p")) == b"prompt\n"
    finally:
        daemon.close()


def test_a_staged_file_no_held_claim_names_is_removed_at_start_up(tempdir: str) -> None:
    """A crash before the record committed: the acquire was never answered."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n")
    try:
        _write(_staging_file(daemon, "1-dead-7.tmp"), b"half")
        daemon.start()
        assert os.listdir(os.path.join(daemon.state_dir, STAGING)) == []
        assert _files(os.path.join(daemon.state_dir, "inbox")) == ["alice/p"]
    finally:
        daemon.close()


def test_a_released_claims_file_is_removed_at_start_up(tempdir: str) -> None:
    """A crash lost the release's unlink (its directory's fsync is not awaited)."""
    daemon = _stopped_with_claim(tempdir, "p", b"prompt\n", release=True)
    try:
        _write(_inbox_file(daemon, "p"), b"prompt\n")
        daemon.start()
        assert _read(_inbox_file(daemon, "p")) is None
        assert _claim(daemon, "p").claim.state == "released"
    finally:
        daemon.close()


# -- fleetctl claims: golden envelopes ----------------------------------------------------------

Step = tuple[str, list[str], bytes | None]

STEPS: list[Step] = [
    ("acquired", ["acquire", "--kind", "prompt_inbox", "--key", "p1", "--owner", "alice"], b"hi\n"),
    (
        "already_acquired",
        ["acquire", "--kind", "prompt_inbox", "--key", "p1", "--owner", "alice"],
        b"hi\n",
    ),
    ("contested", ["acquire", "--kind", "prompt_inbox", "--key", "p1", "--owner", "bob"], b"hi\n"),
    (
        "contested_other_content",
        ["acquire", "--kind", "prompt_inbox", "--key", "p1", "--owner", "alice"],
        b"bye\n",
    ),
    ("acquired_file", ["acquire", "--kind", "file", "--key", "f1.txt", "--owner", "bob"], b"data"),
    ("inspect_ok", ["inspect", "--kind", "prompt_inbox", "--key", "p1"], None),
    ("list", ["list"], None),
    ("list_owner", ["list", "--owner", "bob"], None),
    (
        "release_not_owned",
        ["release", "--kind", "prompt_inbox", "--key", "p1", "--owner", "bob"],
        None,
    ),
    ("released", ["release", "--kind", "prompt_inbox", "--key", "p1", "--owner", "alice"], None),
    (
        "already_released",
        ["release", "--kind", "prompt_inbox", "--key", "p1", "--owner", "alice"],
        None,
    ),
    ("release_absent", ["release", "--kind", "file", "--key", "nope", "--owner", "alice"], None),
    ("inspect_absent", ["inspect", "--kind", "file", "--key", "nope"], None),
    ("error_empty_stdin", ["acquire", "--kind", "file", "--key", "e", "--owner", "a"], b""),
    ("error_binary", ["acquire", "--kind", "file", "--key", "e", "--owner", "a"], b"\x00\xff"),
    ("error_too_large", ["acquire", "--kind", "file", "--key", "e", "--owner", "a"], b"x" * 65),
    ("error_key_slash", ["acquire", "--kind", "file", "--key", "a/b", "--owner", "a"], b"x"),
    ("error_key_dotdot", ["acquire", "--kind", "file", "--key", "..", "--owner", "a"], b"x"),
    ("error_unknown_kind", ["acquire", "--kind", "disk", "--key", "e", "--owner", "a"], b"x"),
    ("usage_missing_owner", ["acquire", "--kind", "file", "--key", "e"], b"x"),
]


def _normalise(value: Any, root: str) -> Any:
    """Volatile fields (revisions, times, the temp dir) become placeholders."""
    if isinstance(value, dict):
        out = {}
        for name, item in value.items():
            if name == "revision" and isinstance(item, int):
                out[name] = "<revision>"
            elif name in ("acquired_at", "released_at") and item:
                out[name] = "<time>"
            else:
                out[name] = _normalise(item, root)
        return out
    if isinstance(value, list):
        return [_normalise(item, root) for item in value]
    if isinstance(value, str):
        return value.replace(root, "<root>")
    return value


def claims(env: dict[str, str], args: list[str], stdin: bytes | None) -> tuple[int, Any]:
    result = subprocess.run(
        [*FLEETCTL, "claims", *args],
        env=env,
        input=stdin or b"",
        capture_output=True,
        timeout=30,
        check=False,
    )
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 1, f"expected one envelope, got {result.stdout!r} ({result.stderr})"
    return result.returncode, json.loads(lines[0])


def _check_golden(name: str, actual: dict[str, Any]) -> None:
    path = os.path.join(GOLDEN, f"{name}.json")
    if UPDATE:
        os.makedirs(GOLDEN, exist_ok=True)
        with open(path, "w") as f:
            f.write(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    with open(path) as f:
        assert json.load(f) == actual, f"{name}: envelope differs from {path}"


def test_golden_envelopes_and_exit_codes(tempdir: str) -> None:
    with running_fleetd(tempdir, FLEET_CLAIM_MAX_BYTES="64") as daemon:
        for name, args, stdin in STEPS:
            before = claims(daemon.env, ["list"], None)[1] if name.startswith("error") else None
            code, envelope = claims(daemon.env, args, stdin)
            expected_exit = Outcome(envelope["outcome"]).exit_code
            assert code == expected_exit, (name, code, envelope)
            _check_golden(name, {"exit": code, "envelope": _normalise(envelope, tempdir)})
            if before is not None:
                assert claims(daemon.env, ["list"], None)[1] == before, name
    used = {f"{name}.json" for name, _, _ in STEPS} | {
        "unavailable.json",
        "error_over_cap.json",
        "error_no_space.json",
        "list_journal.json",  # the journal's goldens: tests/test_journal.py
        "inspect_lease.json",
        "error_fleetd_kind.json",
        "gc_exited_cluster.json",
    }
    assert set(os.listdir(GOLDEN)) <= used, "golden files no step produces"


def test_delivered_file_content_and_removal(fleetd: Fleetd) -> None:
    code, acquired = claims(
        fleetd.env, ["acquire", "--kind", "prompt_inbox", "--key", "t1", "--owner", "w1"], b"do X\n"
    )
    assert code == 0
    path = acquired["claim"]["path"]
    assert path == os.path.join(fleetd.state_dir, "inbox", "w1", "t1")
    with open(path, "rb") as f:
        assert f.read() == b"do X\n"
    claims(fleetd.env, ["release", "--kind", "prompt_inbox", "--key", "t1", "--owner", "w1"], None)
    assert not os.path.exists(path)


def test_over_the_hard_cap_is_refused_before_sending(tempdir: str) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "none.sock")}
    args = ["acquire", "--kind", "file", "--key", "big", "--owner", "a"]
    code, envelope = claims(env, args, b"x" * (MAX_CONTENT + 1))
    _check_golden("error_over_cap", {"exit": code, "envelope": _normalise(envelope, tempdir)})


def test_no_fleetd_is_unavailable_exit_14(tempdir: str) -> None:
    env = {**os.environ, "FLEET_SOCKET": os.path.join(tempdir, "none.sock")}
    code, envelope = claims(env, ["inspect", "--kind", "file", "--key", "x"], None)
    _check_golden("unavailable", {"exit": code, "envelope": _normalise(envelope, tempdir)})


def test_claims_is_hidden_from_help() -> None:
    result = subprocess.run([*FLEETCTL, "--help"], capture_output=True, text=True, check=True)
    commands = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert "lease" in commands and "gc" in commands and "claims" not in commands


def test_full_disk_on_a_small_tmpfs_is_an_error_envelope(tempdir: str) -> None:
    daemon = Fleetd(tempdir)
    if not mount_tmpfs(daemon.state_dir, "1m"):
        pytest.skip("needs root and tmpfs to fill a real disk")
    try:
        daemon.start()
        args = ["acquire", "--kind", "file", "--owner", "a", "--key"]
        chunk = b"x" * (MAX_CONTENT - 1)
        code, envelope = 0, {}
        for n in range(8):  # fill the 1 MiB tmpfs
            code, envelope = claims(daemon.env, [*args, f"k{n}"], chunk)
            if code:
                break
        assert code == 1
        # the file and the record go to disk together: either may be the one that hits the limit
        message = envelope["error"]["message"]
        assert message.endswith("disk is full; nothing was written"), message
        envelope["error"]["message"] = "<the file's or the record's> disk is full"
        _check_golden("error_no_space", {"exit": code, "envelope": _normalise(envelope, tempdir)})
        listed = claims(daemon.env, ["list"], None)[1]["claims"]
        assert sorted(_files(os.path.join(daemon.state_dir, "files"))) == sorted(
            c["key"] for c in listed
        )
        assert _staged_contents(daemon.state_dir) == []
    finally:
        daemon.close()
        subprocess.run(["umount", "-l", daemon.state_dir], check=False)


# -- crash safety -------------------------------------------------------------------------------


def test_kill_9_during_a_burst_of_acquires_loses_no_acknowledged_claim(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        acknowledged: list[tuple[str, bytes]] = []
        lock = threading.Lock()

        with SyncClient(daemon.socket_path) as client:  # live owners survive start-up gc
            for n in range(4):
                client.lease_acquire(f"owner-w{n}", f"w{n}", ttl=600)

        def burst(worker: int) -> None:
            try:
                with SyncClient(daemon.socket_path, timeout=5) as client:
                    for i in range(100_000):
                        key, content = f"k{worker}-{i}", f"prompt {worker} {i}\n".encode() * 50
                        client.claim_acquire("prompt_inbox", key, f"w{worker}", content)
                        with lock:
                            acknowledged.append((f"w{worker}/{key}", content))
            except FleetError:
                return

        threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 200:
            threading.Event().wait(0.01)
        daemon.signal(signal.SIGKILL)
        daemon.wait()
        for thread in threads:
            thread.join(30)
        daemon.start()
        with SyncClient(daemon.socket_path) as client:
            held = {
                f"{c.owner}/{c.key}": c
                for c in client.claim_list("prompt_inbox").claims
                if c.state == "held"
            }
        inbox = os.path.join(daemon.state_dir, "inbox")
        delivered = set(_files(inbox))
        assert delivered == set(held), "every file has a claim and every claim its file"
        for name, content in acknowledged:
            assert name in held
            with open(os.path.join(inbox, name), "rb") as f:
                assert f.read() == content
        assert os.listdir(os.path.join(daemon.state_dir, STAGING)) == []
    finally:
        daemon.close()


# -- gc -----------------------------------------------------------------------------------------


def _gc(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [*FLEETCTL, "--json", "gc", *args], env=env, capture_output=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    envelope: dict[str, Any] = json.loads(result.stdout)
    return envelope


def test_gc_removes_only_claims_of_owners_that_are_gone(tempdir: str) -> None:
    acquire = ["acquire", "--kind", "prompt_inbox", "--key"]
    with running_fleetd(tempdir) as daemon:
        env = daemon.env
        with SyncClient(daemon.socket_path) as client:
            client.lease_acquire("agent-live", "live", ttl=600)
            client.lease_acquire("agent-ghost", "ghost", ttl=600)
            client.lease_release("agent-ghost", "ghost")
        claims(env, [*acquire, "mine", "--owner", "live"], b"keep me")
        claims(env, [*acquire, "later", "--owner", "unknown-agent"], b"for when it starts")
        _, ghost = claims(env, [*acquire, "lost", "--owner", "ghost"], b"orphan")
        path = ghost["claim"]["path"]

        dry = _gc(env, "--dry-run")  # kept: the two other claims and the two lease records
        assert (dry["dry_run"], [c["key"] for c in dry["removed"]], dry["kept"]) == (
            True,
            ["lost"],
            4,
        )
        assert _read(path) == b"orphan"

        done = _gc(env)
        assert ([c["key"] for c in done["removed"]], done["kept"]) == (["lost"], 4)
        assert _read(path) is None
        assert claims(env, ["inspect", "--kind", "prompt_inbox", "--key", "lost"], None)[0] == 11
        assert _gc(env)["removed"] == []  # idempotent
        assert claims(env, ["inspect", "--kind", "prompt_inbox", "--key", "mine"], None)[0] == 0

        human = subprocess.run(
            [*FLEETCTL, "gc", "--dry-run"], env=env, capture_output=True, text=True, check=False
        )
        assert human.stdout == "0 would remove, 4 kept\n"


def test_fleetd_collects_at_start_up(tempdir: str) -> None:
    daemon = Fleetd(tempdir).start()
    try:
        with SyncClient(daemon.socket_path) as client:
            client.lease_acquire("agent-ghost", "ghost", ttl=600)
            client.lease_release("agent-ghost", "ghost")
        _, ghost = claims(
            daemon.env, ["acquire", "--kind", "file", "--key", "g", "--owner", "ghost"], b"x"
        )
        daemon.stop()
        daemon.start()
        assert claims(daemon.env, ["inspect", "--kind", "file", "--key", "g"], None)[0] == 11
        assert _read(ghost["claim"]["path"]) is None
    finally:
        daemon.close()
