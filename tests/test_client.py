"""fleetctl.Client (async) and fleetctl.SyncClient against a real fleetd, and against fakes
that misbehave on purpose: never answer, speak another protocol version, or hang up."""

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import anyio
import pytest

import fleetctl
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.connection import State
from protocol.errors import (
    ClientClosed,
    ConnectionLost,
    FleetError,
    Incompatible,
    Timeout,
    Unavailable,
)
from protocol.framing import FrameSplitter, decode_request, encode
from protocol.messages import Hello, HelloResult, Ping, Response, VersionResult
from protocol.paths import SUN_PATH_MAX
from tests.processes import Fleetd

# -- a fake fleetd --------------------------------------------------------------------------------


@contextmanager
def fake_fleetd(
    path: str,
    *,
    hello_version: int | None = PROTOCOL_VERSION,
    hang_up_on: type | None = None,
    ping_answer: bytes | None = None,
) -> Iterator[None]:
    """A listener in a thread. It answers `hello` with `hello_version` (never, if None), hangs
    up on a `hang_up_on` request, answers `ping` with the raw `ping_answer` (`%d` is the id),
    and never answers anything else."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(0.05)
    stop = threading.Event()
    connections: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def converse(conn: socket.socket) -> None:
        splitter = FrameSplitter()
        try:
            while chunk := conn.recv(65536):
                for frame in splitter.feed(chunk):
                    request = decode_request(frame)
                    if hang_up_on is not None and isinstance(request, hang_up_on):
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                    if isinstance(request, Ping) and ping_answer is not None:
                        conn.sendall(ping_answer % request.id)
                    if isinstance(request, Hello) and hello_version is not None:
                        result = HelloResult(version=hello_version, server="fake", pid=os.getpid())
                        conn.sendall(encode(Response(id=request.id, ok=True, result=result)))
        except OSError:
            pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            connections.append(conn)
            thread = threading.Thread(target=converse, args=(conn,))
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        yield
    finally:
        stop.set()
        acceptor.join()
        listener.close()
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join()
        for conn in connections:
            conn.close()


@contextmanager
def silent_listener(path: str) -> Iterator[socket.socket]:
    """Listens, never accepts, never answers: connect() succeeds into the backlog."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(16)
        yield listener


def kill(fleetd: Fleetd) -> None:
    fleetd.signal(signal.SIGKILL)
    fleetd.wait()


# -- against fleetd ---------------------------------------------------------------------------


def test_the_exceptions_users_catch_are_fleetctls_and_dir_lists_them() -> None:
    import protocol.errors

    for name in ("MemberFailed", "Absent", "Timeout", "Unavailable", "FleetError"):
        assert getattr(fleetctl, name) is getattr(protocol.errors, name)
        assert name in dir(fleetctl)
    assert {"Client", "SyncClient", "cluster"} <= set(dir(fleetctl))
    assert set(fleetctl.__all__) <= set(dir(fleetctl))


async def test_connect_exchanges_hello(fleetd: Fleetd) -> None:
    client = fleetctl.Client(fleetd.socket_path)
    hello = await client.connect()
    try:
        assert fleetd.process is not None
        assert hello == HelloResult(
            version=PROTOCOL_VERSION, server=RELEASE, pid=fleetd.process.pid
        )
        assert client.server == hello
    finally:
        await client.aclose()


async def test_version(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        assert await client.version() == VersionResult(version=RELEASE, protocol=PROTOCOL_VERSION)


async def test_a_thousand_concurrent_pings_on_one_client_all_succeed(fleetd: Fleetd) -> None:
    done = 0

    async def ping(client: fleetctl.Client) -> None:
        nonlocal done
        await client.ping()
        done += 1

    async with fleetctl.Client(fleetd.socket_path) as client:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(1000):
                    tg.start_soon(ping, client)
        assert done == 1000
        assert client._connection is not None and not client._connection.core.waiting
        assert await client.version() == VersionResult(version=RELEASE, protocol=PROTOCOL_VERSION)


async def test_lifecycle_is_unopened_then_opened_then_closed(fleetd: Fleetd) -> None:
    client = fleetctl.Client(fleetd.socket_path)
    assert client.state is State.UNOPENED
    await client.connect()
    assert client.state is State.OPENED
    await client.aclose()
    assert client.state is State.CLOSED
    await client.aclose()  # closing twice is harmless
    assert client.state is State.CLOSED


async def test_async_with_closes_the_client(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        assert client.state is State.OPENED
    assert client.state is State.CLOSED


async def test_calling_an_unopened_client_raises_client_closed(fleetd: Fleetd) -> None:
    client = fleetctl.Client(fleetd.socket_path)
    with pytest.raises(ClientClosed, match="unopened"):
        await client.ping()


async def test_calling_a_closed_client_raises_client_closed(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        await client.ping()
    with pytest.raises(ClientClosed, match="closed"):
        await client.ping()


async def test_reconnecting_a_closed_client_raises_client_closed(fleetd: Fleetd) -> None:
    client = fleetctl.Client(fleetd.socket_path)
    await client.connect()
    await client.aclose()
    with pytest.raises(ClientClosed):
        await client.connect()


async def test_connecting_twice_raises_client_closed(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        with pytest.raises(ClientClosed):
            await client.connect()
        await client.ping()


async def test_daemon_killed_between_calls_is_connection_lost(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path, timeout=5) as client:
        await client.ping()
        await anyio.to_thread.run_sync(kill, fleetd)
        with pytest.raises(ConnectionLost) as raised:
            await client.ping()
        assert raised.value.outcome.exit_code == 14
        with pytest.raises(ConnectionLost):
            await client.version()


def test_sync_client_connect_ping_version(fleetd: Fleetd) -> None:
    with fleetctl.SyncClient(fleetd.socket_path) as client:
        assert fleetd.process is not None
        assert client.server == HelloResult(
            version=PROTOCOL_VERSION, server=RELEASE, pid=fleetd.process.pid
        )
        client.ping()
        assert client.version() == VersionResult(version=RELEASE, protocol=PROTOCOL_VERSION)
    with pytest.raises(ClientClosed):
        client.ping()


def test_sync_client_daemon_killed_between_calls_is_connection_lost(fleetd: Fleetd) -> None:
    with fleetctl.SyncClient(fleetd.socket_path, timeout=5) as client:
        client.ping()
        kill(fleetd)
        with pytest.raises(ConnectionLost):
            client.ping()


# -- no daemon, bad paths -----------------------------------------------------------------------


async def test_no_daemon_is_unavailable_exit_14(tempdir: str) -> None:
    path = os.path.join(tempdir, "fleetd.sock")
    client = fleetctl.Client(path)
    with pytest.raises(Unavailable) as raised:
        await client.connect()
    assert type(raised.value) is Unavailable
    assert raised.value.outcome.exit_code == 14
    assert path in raised.value.message
    assert client.state is not State.OPENED


async def test_stale_socket_file_is_unavailable(tempdir: str) -> None:
    """A socket file left by a dead fleetd: connect() is refused, not a crash."""
    path = os.path.join(tempdir, "fleetd.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as orphan:
        orphan.bind(path)
    with pytest.raises(Unavailable) as raised:
        await fleetctl.Client(path).connect()
    assert type(raised.value) is Unavailable


def test_sync_client_no_daemon_is_unavailable_exit_14(tempdir: str) -> None:
    path = os.path.join(tempdir, "fleetd.sock")
    with pytest.raises(Unavailable) as raised:
        fleetctl.SyncClient(path).connect()
    assert type(raised.value) is Unavailable
    assert raised.value.outcome.exit_code == 14


def _path_of_length(tempdir: str, size: int) -> str:
    path = os.path.join(tempdir, "s")
    return path + "x" * (size - len(path.encode()))


async def test_socket_path_over_107_bytes_is_unavailable_naming_the_limit(tempdir: str) -> None:
    path = _path_of_length(tempdir, SUN_PATH_MAX + 1)
    with pytest.raises(Unavailable, match=f"{SUN_PATH_MAX}-byte limit"):
        await fleetctl.Client(path).connect()
    with pytest.raises(Unavailable, match=f"{SUN_PATH_MAX}-byte limit"):
        fleetctl.SyncClient(path).connect()


async def test_socket_path_of_exactly_107_bytes_works(tempdir: str) -> None:
    path = _path_of_length(tempdir, SUN_PATH_MAX)
    assert len(path.encode()) == 107
    with fake_fleetd(path):
        async with fleetctl.Client(path) as client:
            assert client.server is not None and client.server.server == "fake"
        with fleetctl.SyncClient(path) as sync_client:
            assert sync_client.server is not None


# -- fakes: silence, other versions, hanging up -------------------------------------------------


async def test_connect_times_out_when_nothing_answers_hello(tempdir: str) -> None:
    path = os.path.join(tempdir, "silent.sock")
    with silent_listener(path):
        client = fleetctl.Client(path, timeout=0.2)
        with pytest.raises(Timeout) as raised:
            await client.connect()
        assert raised.value.outcome.exit_code == 13
        assert client.state is State.CLOSED


async def test_per_call_timeout_raises_timeout(tempdir: str) -> None:
    path = os.path.join(tempdir, "mute.sock")
    with fake_fleetd(path):
        async with fleetctl.Client(path, timeout=5) as client:
            started = anyio.current_time()
            with pytest.raises(Timeout, match=r"0\.2s"):
                await client.request(Ping, timeout=0.2)
            assert anyio.current_time() - started < 2
            assert client.state is State.OPENED
            assert client._connection is not None
            assert not client._connection.core.waiting, "the timed-out request was not forgotten"


async def test_a_cancelled_request_leaves_the_client_usable(fleetd: Fleetd) -> None:
    async with fleetctl.Client(fleetd.socket_path) as client:
        start = await client.lease_watch("nothing/")
        with anyio.move_on_after(0.2) as waiting:
            await client.lease_watch("nothing/", start.cursor, epoch=start.epoch, wait=10)
        assert waiting.cancelled_caught
        assert client._connection is not None
        assert not client._connection._futures, "the cancelled request was not forgotten"
        assert not client._connection.core.waiting
        assert (await client.version()).protocol == PROTOCOL_VERSION


async def test_client_timeout_bounds_every_call(tempdir: str) -> None:
    path = os.path.join(tempdir, "mute.sock")
    with fake_fleetd(path):
        async with fleetctl.Client(path, timeout=0.2) as client:
            for call in (client.ping, client.version):
                with pytest.raises(Timeout):
                    await call()


def test_sync_client_per_call_timeout_raises_timeout(tempdir: str) -> None:
    path = os.path.join(tempdir, "mute.sock")
    with fake_fleetd(path), fleetctl.SyncClient(path, timeout=5) as client:
        with pytest.raises(Timeout, match=r"0\.2s"):
            client.request(Ping, timeout=0.2)
        with pytest.raises(Timeout):
            client.request(Ping, timeout=0.2)


def test_sync_client_connect_times_out_when_nothing_answers_hello(tempdir: str) -> None:
    path = os.path.join(tempdir, "silent.sock")
    with silent_listener(path), pytest.raises(Timeout):
        fleetctl.SyncClient(path, timeout=0.2).connect()


async def test_client_refuses_a_server_of_another_protocol_version(tempdir: str) -> None:
    path = os.path.join(tempdir, "future.sock")
    with fake_fleetd(path, hello_version=PROTOCOL_VERSION + 1):
        client = fleetctl.Client(path)
        with pytest.raises(Incompatible) as raised:
            await client.connect()
        assert raised.value.details == {"server_version": PROTOCOL_VERSION + 1}
        assert raised.value.outcome.exit_code == 15
        assert client.state is State.CLOSED
        with pytest.raises(Incompatible):
            fleetctl.SyncClient(path).connect()


async def test_daemon_hanging_up_mid_request_is_connection_lost(tempdir: str) -> None:
    path = os.path.join(tempdir, "dying.sock")
    with fake_fleetd(path, hang_up_on=Ping):
        async with fleetctl.Client(path, timeout=5) as client:
            with pytest.raises(ConnectionLost) as raised:
                await client.ping()
            assert raised.value.outcome.exit_code == 14
            with pytest.raises(ConnectionLost):
                await client.version()


async def test_daemon_hanging_up_fails_every_pending_request(tempdir: str) -> None:
    path = os.path.join(tempdir, "dying.sock")
    failures: list[BaseException] = []

    async def version(client: fleetctl.Client) -> None:
        try:
            await client.version()
        except ConnectionLost as exc:
            failures.append(exc)

    with fake_fleetd(path, hang_up_on=Ping):
        async with fleetctl.Client(path, timeout=5) as client, anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(version, client)
            await anyio.sleep(0.05)
            with pytest.raises(ConnectionLost):
                await client.ping()
    assert len(failures) == 10


def test_sync_client_daemon_hanging_up_mid_request_is_connection_lost(tempdir: str) -> None:
    path = os.path.join(tempdir, "dying.sock")
    with (
        fake_fleetd(path, hang_up_on=Ping),
        fleetctl.SyncClient(path, timeout=5) as client,
        pytest.raises(ConnectionLost),
    ):
        client.ping()


@pytest.mark.parametrize(
    "answer",
    [
        b'{"id":%d,"ok":true,"result":[1]}\n',
        b'{"id":%d,"ok":false,"error":{"code":"absent","message":"\xff"}}\n',
    ],
    ids=["result-of-the-wrong-shape", "bad-utf8-in-error-message"],
)
async def test_malformed_answer_raises_a_fleet_error(tempdir: str, answer: bytes) -> None:
    path = os.path.join(tempdir, "odd.sock")
    with fake_fleetd(path, ping_answer=answer):
        async with fleetctl.Client(path, timeout=5) as client:
            with pytest.raises(FleetError):
                await client.ping()
