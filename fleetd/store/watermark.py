"""The store's watermark: which store a state directory holds, and the highest revision that
store ever acknowledged, kept in a file of its own beside the store.

A store's files can go missing or backwards without SQLite noticing: deleted or emptied, its
WAL removed after a crash, an older copy restored. Opened again, what is left looks like a
store that simply has less in it, so fleetd would list no leases and grant fencing tokens it
had granted before. A mark holds two revisions: the `floor` the store had durably reached
when the mark was written, and the `revision` of the commit under way then. The store writes
it alongside each commit (the two flushes run together) and answers only once both are
durable, so the store is never behind the floor, and nothing above the revision was ever
acknowledged: at start-up `check_continuity` tells a new state directory from one whose store
was lost, replaced or rolled back (behind the floor), and a reset starts the revisions above
the revision, so tokens never repeat. A crash between the two flushes leaves the store at the
floor or at the revision; either is sound (the commit was not answered).

The file is 4 KiB written once, then updated in place: two 64-byte slots written in turn
(pwrite, fdatasync; no block is allocated, so a full disk cannot fail it), each with a
sequence number and a CRC. A write torn by a crash loses only the slot being written; the
other still holds a revision no greater than the store's.
"""

import os
import struct
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
    slots = [decode_slot(data[i : i + SLOT_SIZE]) for i in (0, SLOT_SIZE)]
    valid = [slot for slot in slots if slot is not None]
    return max(valid, key=lambda slot: slot[1]) if valid else None


class Watermark:
    """The watermark file `name` in `directory`; `read` it, then `create` or `open` it and
    `advance` it with each commit. Not thread-safe: one thread at a time advances it."""

    def __init__(self, directory: PrivateDir, name: str) -> None:
        self.directory = directory
        self.name = name
        self.path = directory.join(name)
        self._fd = -1
        self._sequence = 0
        self._mark: Mark | None = None

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
        self._fd = self.directory.open_file(self.name, os.O_RDWR)
        found = latest(os.pread(self._fd, FILE_SIZE, 0))
        if found is None:
            raise StoreCorrupt(f"{self.path} is damaged", path=self.path)
        self._mark, self._sequence = found

    @property
    def mark(self) -> Mark | None:
        return self._mark

    def advance(self, floor: int, revision: int) -> None:
        """Record durably that the store reached `floor` and commits `revision` now (no-op
        when that is the mark already)."""
        if self._mark is None:
            return
        mark = Mark(self._mark.store_id, revision, floor)
        if mark == self._mark:
            return
        self._sequence += 1
        slot = encode_slot(mark, self._sequence)
        offset = (self._sequence % 2) * SLOT_SIZE
        _write_all_at(self._fd, slot, offset)
        os.fdatasync(self._fd)
        self._mark = mark

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
