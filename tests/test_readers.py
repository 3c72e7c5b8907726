"""The holder's Readers: many descriptors watched through one event-loop reader, level-triggered
as the loop's own add_reader."""

import contextlib
import os
from collections.abc import Callable, Iterator

import anyio
import pytest

from fleetd.holder.readers import Readers


@pytest.fixture
def readers() -> Iterator[Readers]:
    watched = Readers()
    yield watched
    watched.close()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    for fd in (read, write):
        with contextlib.suppress(OSError):
            os.close(fd)


def reading(fd: int, received: list[bytes], enough: int, done: anyio.Event) -> Callable[[], None]:
    """A callback reading a byte of `fd` at a time into `received`; `done` once `enough`
    reads were made (an empty one at EOF included)."""

    def read() -> None:
        received.append(os.read(fd, 1))
        if len(received) >= enough:
            done.set()

    return read


async def test_a_callback_runs_once_its_descriptor_is_readable(
    readers: Readers, pipe: tuple[int, int]
) -> None:
    read, write = pipe
    received: list[bytes] = []
    done = anyio.Event()
    readers.add(read, reading(read, received, 1, done))
    await anyio.sleep(0.05)
    assert received == []
    os.write(write, b"x")
    with anyio.fail_after(5):
        await done.wait()
    assert received == [b"x"]


async def test_a_callback_runs_again_while_data_is_left(
    readers: Readers, pipe: tuple[int, int]
) -> None:
    read, write = pipe
    chunks: list[bytes] = []
    done = anyio.Event()
    readers.add(read, reading(read, chunks, 3, done))
    os.write(write, b"abc")
    with anyio.fail_after(5):
        await done.wait()
    assert chunks == [b"a", b"b", b"c"]


async def test_many_descriptors_each_reach_their_own_callback(readers: Readers) -> None:
    pipes = [os.pipe() for _ in range(50)]
    written = pipes[::7]
    received: dict[int, list[bytes]] = {read: [] for read, _ in pipes}
    done = {read: anyio.Event() for read, _ in pipes}
    try:
        for read, _ in pipes:
            readers.add(read, reading(read, received[read], 1, done[read]))
        for _, write in written:
            os.write(write, b"x")
        with anyio.fail_after(5):
            for read, _ in written:
                await done[read].wait()
        await anyio.sleep(0.05)
        assert {read for read, chunks in received.items() if chunks} == {r for r, _ in written}
    finally:
        for read, write in pipes:
            readers.remove(read)
            os.close(read)
            os.close(write)


async def test_a_hangup_reaches_the_callback(readers: Readers, pipe: tuple[int, int]) -> None:
    read, write = pipe
    received: list[bytes] = []
    done = anyio.Event()
    readers.add(read, reading(read, received, 1, done))
    os.close(write)
    with anyio.fail_after(5):
        await done.wait()
    readers.remove(read)
    assert received == [b""]


async def test_a_removed_descriptor_is_not_called_back(
    readers: Readers, pipe: tuple[int, int]
) -> None:
    read, write = pipe
    calls: list[int] = []
    readers.add(read, lambda: calls.append(1))
    readers.remove(read)
    readers.remove(read)  # twice: nothing to do
    os.write(write, b"x")
    await anyio.sleep(0.05)
    assert calls == []


async def test_closed_readers_call_nothing_back(pipe: tuple[int, int]) -> None:
    read, write = pipe
    calls: list[int] = []
    watched = Readers()
    watched.add(read, lambda: calls.append(1))
    watched.close()
    watched.remove(read)  # its owner closing it afterwards: nothing to do
    os.write(write, b"x")
    await anyio.sleep(0.05)
    assert calls == []
