"""The serving loop both fleetd programs share (fleetd.core.server), in-process over a real
unix socket."""

import socket

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from fleetd.core import server
from fleetd.core.dispatch import Dispatcher
from protocol.framing import decode_response, encode
from protocol.messages import Empty, Message, Ping, Version


async def test_a_bug_in_a_connection_is_logged_with_its_traceback_and_serving_goes_on(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_admit(stream: object, group: int | None = None) -> None:
        raise RuntimeError("a bug in the connection itself")

    monkeypatch.setattr(server, "admit", broken_admit)
    control = server.ControlServer(Dispatcher())
    path = f"{tempdir}/s.sock"
    with capture_logs() as logs:
        async with anyio.create_task_group() as tasks:
            await tasks.start(control.serve, await anyio.create_unix_listener(path))
            for _ in range(2):
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(path)
                    assert await anyio.to_thread.run_sync(client.recv, 1) == b""
            control.stop()
    failures = [event for event in logs if event["event"] == "connection_failed"]
    assert len(failures) == 2
    assert all(isinstance(event["exc_info"], RuntimeError) for event in failures)


class _Large(Message, frozen=True):
    text: str


async def test_answers_larger_than_the_socket_takes_at_once_arrive_whole_and_in_order(
    tempdir: str,
) -> None:
    large = "x" * 600_000  # several times what a unix socket buffers
    dispatcher = Dispatcher()
    dispatcher.register(Version, lambda request, peer: _Large(text=large))
    dispatcher.register(Ping, lambda request, peer: Empty())
    control = server.ControlServer(dispatcher)
    path = f"{tempdir}/s.sock"

    def ask() -> list[bytes]:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            client.sendall(encode(Version(id=1)) + encode(Ping(id=2)) + encode(Version(id=3)))
            received = b""
            while received.count(b"\n") < 3:
                received += client.recv(4096)  # slowly: the server's sends fill the socket
            return received.split(b"\n")[:3]

    async with anyio.create_task_group() as tasks:
        await tasks.start(control.serve, await anyio.create_unix_listener(path))
        frames = await anyio.to_thread.run_sync(ask)
        control.stop()
    answers = [decode_response(frame) for frame in frames]
    assert [answer.id for answer in answers] == [1, 2, 3]
    assert msgspec.json.decode(answers[0].result, type=_Large).text == large
    assert answers[2].result == answers[0].result
