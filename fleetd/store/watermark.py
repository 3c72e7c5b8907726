"""The store's watermark: which store a state directory holds, and the highest revision that
store ever acknowledged, kept in a file of its own beside the store.

A store's files can go missing or backwards without SQLite noticing: deleted or emptied, its
WAL removed after a crash, an older copy restored. Opened again, what is left looks like a
store that simply has less in it, so fleetd would list no leases and grant fencing tokens it
had granted before. A mark holds two revisions: the `floor` the store had durably reached
when the mark was written, and a `revision` no commit answered so far is above. At start-up
`check_continuity` tells a new state directory from one whose store was lost, replaced or
rolled back (behind the floor), and a reset starts the revisions above the revision, so
tokens never repeat.

Two kinds of write keep it so. `advance` is durable (pwrite, fdatasync): the store calls it,
its flush alongside the COMMIT's, when a commit would pass the revision, and then reserves
revisions ahead (fleetd.store.sqlite), so that most commits need no flush of the watermark.
`note` records a new floor without waiting for the disk: a start-up after fleetd stopped or
crashed reads it from the page cache, and the store flushes it (`sync`) within a second.
Only a power loss in that second can take a note back, and then the floor read is an older
one, which is still sound: a floor is only ever a revision the store had made durable.

The file is 4 KiB written once, then updated in place: two 64-byte slots, each with a
sequence number and a CRC; the valid one with the higher sequence is the mark. A write never
goes to the slot holding the last flushed mark: notes and the next advance go to the other,
which becomes the flushed one once its fdatasync returns. So a write torn by a crash loses
only what it wrote, and the slot left holds a revision no commit answered is above. No
write allocates a block, so a full disk cannot fail one.
"""

import os
import struct
import time
import zlib
from dataclasses import dataclass
from enum import Enum

from fleetd.core.dirs import PrivateDir
from protocol.errors import StateLost, StoreCorrupt

MAGIC = b"FLEETWM2"
_SLOT = struct.Struct("<8sqQQQ")
"""magic, store id, revision, sequence, floor; then a CRC32 of those bytes."""
MAGIC_1 = b"FLEETWM1"
_SLOT_1 = struct.Struct("<8sqQQ")
"""Before floors (a fleetd of before 2026-12): magic, store id, revision, sequence; its floor
is its revision, since that fleetd wrote the mark after the commit."""
_CRC = struct.Struct("<I")
SLOT_SIZE = 64
FILE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Mark:
    """`floor`: the revision the store had durably reached when the mark was written; it is
    never behind it. `revision`: the highest it may have acknowledged."""

    store_id: int
    revision: int
    floor: int

    @classmethod
    def at(cls, store_id: int, revision: int) -> "Mark":
        """The mark of a store at rest at `revision`."""
        return cls(store_id, revision, revision)


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What the store says of itself. `watermarked`: a watermark was written for it."""

    store_id: int
    revision: int
    watermarked: bool


class Continuity(Enum):
    OK = "ok"
    ADOPT = "adopt"
    """No watermark was ever written for this store: a new state directory, or a store of a
    fleetd from before watermarks. Write one."""


def check_continuity(
    mark: Mark | None, found: StoreIdentity | None, *, store: str, watermark: str
) -> Continuity:
    """Whether the store found is the one the watermark describes, at or past its revision;
    raises StateLost saying what went wrong and what to do. `store` and `watermark` are the
    files' paths, for the message."""
    if mark is None:
        if found is None or not found.watermarked:
            return Continuity.ADOPT
        raise StateLost(
            f"{watermark} is missing, but {store} had one: the state directory lost a file. "
            f"Restore {watermark}, or run `fleetd reset-state --keep-store` to go on with "
            "this store"
        )
    if found is None:
        raise StateLost(
            f"{store} is missing or empty, but {watermark} says store {mark.store_id:x} "
            f"reached revision {mark.revision}: the store was lost. Restore it (with its "
            "-wal file) from a backup, or run `fleetd reset-state` to archive what is left "
            "and start empty"
        )
    if found.store_id != mark.store_id:
        raise StateLost(
            f"{store} is store {found.store_id:x}, not store {mark.store_id:x} that this "
            "state directory holds: it was replaced. Put the right one back, or run "
            "`fleetd reset-state --keep-store` to adopt this one"
        )
    if found.revision < mark.floor:
        raise StateLost(
            f"{store} is at revision {found.revision}, but it had reached revision "
            f"{mark.floor}: it was rolled back (an older copy, or its -wal file lost). "
            "Restore the newer copy, or run `fleetd reset-state --keep-store` to go on from "
            f"this one (revisions and fencing tokens continue above {mark.revision})"
        )
    return Continuity.OK


def encode_slot(mark: Mark, sequence: int) -> bytes:
    body = _SLOT.pack(MAGIC, mark.store_id, mark.revision, sequence, mark.floor)
    return (body + _CRC.pack(zlib.crc32(body))).ljust(SLOT_SIZE, b"\0")


def decode_slot(data: bytes) -> tuple[Mark, int] | None:
    """The mark and sequence of a slot, or None when it is blank or torn."""
    layout = {MAGIC: _SLOT, MAGIC_1: _SLOT_1}.get(data[:8])
    if layout is None or len(data) < layout.size + _CRC.size:
        return None
    body = data[: layout.size]
    (crc,) = _CRC.unpack_from(data, layout.size)
    if crc != zlib.crc32(body):
        return None
    _, store_id, revision, sequence, *floor = layout.unpack(body)
    return Mark(store_id, revision, floor[0] if floor else revision), sequence


def latest(data: bytes) -> tuple[Mark, int] | None:
    """The valid slot with the highest sequence."""
    found = _latest_slot(data)
    return found[1:] if found is not None else None


def _latest_slot(data: bytes) -> tuple[int, Mark, int] | None:
    """The index, mark and sequence of the valid slot with the highest sequence."""
    slots = [(i, decode_slot(data[i * SLOT_SIZE : (i + 1) * SLOT_SIZE])) for i in (0, 1)]
    valid = [(i, *slot) for i, slot in slots if slot is not None]
    return max(valid, key=lambda slot: slot[2]) if valid else None


class Watermark:
    """The watermark file `name` in `directory`; `read` it, then `create` or `open` it, and
    `advance` or `note` it as the store commits. Not thread-safe: one thread at a time writes."""

    def __init__(self, directory: PrivateDir, name: str) -> None:
        self.directory = directory
        self.name = name
        self.path = directory.join(name)
        self._fd = -1
        self._sequence = 0
        self._mark: Mark | None = None
        self._spare = 1
        """The slot the next write goes to: not the one holding the last flushed mark."""
        self.noted_at: float | None = None
        """When the first note not flushed yet was written (time.monotonic), if one is."""

    def read(self) -> Mark | None:
        """The mark, or None when there is no file; StoreCorrupt when neither slot is valid."""
        if self.directory.entry(self.name) is None:
            return None
        found = latest(self.directory.read_file(self.name, FILE_SIZE))
        if found is None:
            raise StoreCorrupt(
                f"{self.path} is damaged: restore it, or run `fleetd reset-state --keep-store`",
                path=self.path,
            )
        return found[0]

    def create(self, mark: Mark) -> None:
        """Write a new file (durably: its directory entry too) and keep it open."""
        self.directory.write_atomically(
            self.name, encode_slot(mark, 1).ljust(FILE_SIZE, b"\0"), durable=True
        )
        self.open()

    def open(self) -> None:
        """Open the file to write it, flushed first: what a crash left in the page cache is
        then the flushed mark, whose slot is kept."""
        self._fd = self.directory.open_file(self.name, os.O_RDWR)
        found = _latest_slot(os.pread(self._fd, FILE_SIZE, 0))
        if found is None:
            raise StoreCorrupt(f"{self.path} is damaged", path=self.path)
        os.fdatasync(self._fd)
        index, self._mark, self._sequence = found
        self._spare = 1 - index

    @property
    def mark(self) -> Mark | None:
        return self._mark

    def advance(self, floor: int, revision: int) -> None:
        """Record durably that the store reached `floor` and answers no commit above
        `revision` (no-op when that is the flushed mark already)."""
        if self._mark is None:
            return
        mark = Mark(self._mark.store_id, revision, floor)
        if mark == self._mark and self.noted_at is None:
            return
        self._write(mark)
        self._flush()
        self._mark = mark  # only once durable: a failed flush leaves the last flushed mark

    def note(self, floor: int) -> None:
        """Record that the store reached `floor`, not waiting for the disk (see the module's
        docstring); `sync` flushes it."""
        if self._mark is None or floor == self._mark.floor:
            return
        self._mark = Mark(self._mark.store_id, self._mark.revision, floor)
        self._write(self._mark)
        if self.noted_at is None:
            self.noted_at = time.monotonic()

    def sync(self) -> None:
        """Flush the notes written since the last flush, if any."""
        if self.noted_at is not None:
            self._flush()

    def _write(self, mark: Mark) -> None:
        self._sequence += 1
        _write_all_at(self._fd, encode_slot(mark, self._sequence), self._spare * SLOT_SIZE)

    def _flush(self) -> None:
        os.fdatasync(self._fd)
        self._spare = 1 - self._spare
        self.noted_at = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
