"""The serving loop both fleetd programs share (fleetd.core.server), in-process over a real
unix socket."""

import socket

import anyio
import pytest
from structlog.testing import capture_logs

from fleetd.core import server
from fleetd.core.dispatch import Dispatcher


async def test_a_bug_in_a_connection_is_logged_with_its_traceback_and_serving_goes_on(
    tempdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken_admit(stream: object) -> None:
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
