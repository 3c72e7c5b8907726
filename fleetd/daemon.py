"""The daemon's lifecycle: claim its directories, lock, open the store, listen, serve, and
shut down in order.

`claim_places` does everything that must hold before fleetd touches anything: the socket path
fits, both directories are fleetd's own (fleetd.core.dirs), and both locks are taken. Services then
start in dependency order with ``await tg.start(...)``, so READY=1 is only sent to systemd
once every one of them is really ready; shutdown runs the same path backwards.
"""

import functools
import os
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import anyio
import structlog
from anyio.abc import SocketListener

from fleetd import metrics_http, systemd
from fleetd.claims import ClaimService
from fleetd.clusters.registry import HolderRegistry
from fleetd.clusters.warm import WarmTemplate
from fleetd.core.bounds import Limits
from fleetd.core.dirs import PrivateDir
from fleetd.core.dispatch import Dispatcher, Peer
from fleetd.core.metrics import KEPT, Registry
from fleetd.core.server import ControlServer, socket_group
from fleetd.core.startup import return_free_memory
from fleetd.journal import LeaseJournal
from fleetd.leases import LeaseManager
from fleetd.presence import Presence, home_of
from fleetd.state import (
    ETCD_WATERMARK_FILE,
    LOCK_FILE,
    STORE_FILE,
    WATERMARK_FILE,
    check_store_files,
    exclusive_lock,
)
from fleetd.store import Store
from fleetd.store.scoped import Scoped
from fleetd.store.sqlite import SQLiteStore
from fleetd.store.watermark import Watermark
from fleetd.tasks.service import TaskService, max_workers_from
from protocol import PROTOCOL_VERSION, RELEASE
from protocol.claims import (
    ClaimAcquire,
    ClaimGc,
    ClaimInspect,
    ClaimListRequest,
    ClaimRelease,
)
from protocol.clusters import (
    ClusterApply,
    ClusterApplyToml,
    ClusterDown,
    ClusterResult,
    ClusterUp,
    ClusterUpToml,
    LogsNamed,
    MemberAdd,
    MemberLogs,
    MemberRestart,
    MemberStart,
    MemberStatusRequest,
    MemberStop,
    MemberWait,
)
from protocol.definitions import parse_toml
from protocol.errors import Incompatible, InvalidRequest, StartupError
from protocol.messages import (
    Empty,
    Hello,
    HelloResult,
    LeaseAcquire,
    LeaseHeartbeat,
    LeaseInspect,
    LeaseListRequest,
    LeaseRelease,
    LeaseWatch,
    Metrics,
    MetricsText,
    Ping,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.paths import socket_path_problem
from protocol.runs import (
    Drain,
    EventEmit,
    EventList,
    ReceiptListRequest,
    ReceiptScore,
    RunCancel,
    RunListRequest,
    RunShow,
    RunSubmit,
    TaskListRequest,
)

log = structlog.get_logger("fleetd")

SHUTDOWN_GRACE = 10.0
"""Seconds in-flight requests get to finish after SIGTERM before they are cancelled."""


@dataclass(frozen=True)
class DaemonConfig:
    socket_path: str
    state_dir: str
    metrics_listen: str = ""
    """HOST:PORT to serve the metrics over HTTP at (fleetd.metrics_http), or nobody."""
    store: str = ""
    """etcd://HOST:PORT[,…] (fleetd.store.etcd), or empty: SQLite in the state directory."""


@dataclass(frozen=True)
class Places:
    """Where fleetd lives, claimed: the control socket's path (systemd's, under socket
    activation), the socket passed by systemd if any, and both directories, open and locked."""

    socket_path: str
    inherited: socket.socket | None
    state: PrivateDir
    runtime: PrivateDir


def check_socket_path(socket_path: str) -> None:
    problem = socket_path_problem(socket_path)
    if problem:
        raise StartupError(problem)


@contextmanager
def claim_places(config: DaemonConfig) -> Iterator[Places]:
    """Everything that must hold before fleetd touches anything; raises StartupError (and
    its kinds), UnsafePath or AlreadyRunning saying what is wrong, or the OSError of a
    directory that cannot be made."""
    try:
        inherited = next(iter(systemd.listen_sockets()), None)
    except OSError as exc:
        raise StartupError(f"cannot use the socket systemd passed: {exc}") from None
    socket_path = config.socket_path
    if inherited is not None:
        socket_path = _socket_file_of(inherited) or socket_path
    check_socket_path(socket_path)
    with ExitStack() as held:
        state = held.enter_context(PrivateDir.open(config.state_dir))
        runtime = held.enter_context(PrivateDir.open(os.path.dirname(socket_path)))
        held.enter_context(exclusive_lock(state, LOCK_FILE))
        held.enter_context(exclusive_lock(runtime, os.path.basename(socket_path) + ".lock"))
        check_store_files(state)
        yield Places(socket_path, inherited, state, runtime)


def _socket_file_of(sock: socket.socket) -> str:
    name = sock.getsockname()
    return name if isinstance(name, str) else ""


async def open_listener(socket_path: str, inherited: socket.socket | None) -> SocketListener:
    """The control listener: systemd's socket under activation, else a new 0600 socket."""
    if inherited is not None:
        return await SocketListener.from_socket(inherited)
    return await anyio.create_unix_listener(socket_path, mode=0o600)


async def run(config: DaemonConfig, template: WarmTemplate) -> None:
    """Claim fleetd's places, then serve until SIGTERM/SIGINT or a shutdown request, forking
    holders from `template` (started before the event loop: fleetd.clusters.warm)."""
    if config.metrics_listen:
        metrics_http.parse_listen(config.metrics_listen)  # before anything is claimed
    make_store = store_maker(config.store)  # before anything is claimed, as a bad address
    with claim_places(config) as places:
        store = make_store(places.state)
        await Daemon(places, template, store, metrics_listen=config.metrics_listen).run()


def store_maker(address: str) -> Callable[[PrivateDir], Store]:
    """What makes the store, given the state directory: SQLite there (the default), or etcd
    at an etcd:// address. etcd's module loads gRPC: only now, after the template was forked
    (fleetd.store.etcd)."""
    if not address:
        return _sqlite_store
    if not address.startswith("etcd://"):
        raise StartupError(
            f"--store {address!r}: give etcd://HOST:PORT[,HOST:PORT…], or nothing for SQLite "
            "in the state directory"
        )
    try:
        from fleetd.store.etcd import Endpoints, EtcdStore
    except ImportError as exc:
        raise StartupError(
            f"the etcd store needs the etcd extra (pip install 'fleet[etcd]'): {exc}"
        ) from None
    try:
        endpoints = Endpoints.parse(address)
    except InvalidRequest as exc:
        raise StartupError(exc.message) from None
    return lambda state: EtcdStore(endpoints, watermark=Watermark(state, ETCD_WATERMARK_FILE))


def _ours_alone(store: Store, state: PrivateDir) -> Store:
    """The part of the store only this fleetd uses (its holders' journal): all of it, unless
    other fleetds share it (etcd), where it is this fleetd's home's scope."""
    return Scoped(store, f"homes/{home_of(state)}/") if store.shared else store


def _sqlite_store(state: PrivateDir) -> Store:
    return SQLiteStore(state.join(STORE_FILE), watermark=Watermark(state, WATERMARK_FILE))


class Daemon:
    def __init__(
        self, places: Places, template: WarmTemplate, store: Store, *, metrics_listen: str = ""
    ) -> None:
        self.places = places
        self.metrics_listen = metrics_listen
        self.template = template
        self.socket_path = places.socket_path
        state = places.state
        self.store = store
        self.presence = Presence(store, state) if store.shared else None
        self.leases = LeaseManager(self.store, presence=self.presence)
        self.holders = HolderRegistry(_ours_alone(store, state), state, template)
        self.claims = ClaimService(
            self.store, state, providers=(self.holders.journal, LeaseJournal(self.leases))
        )
        self.tasks = TaskService(
            self.store,
            self.holders,
            state,
            places.runtime,
            places.socket_path,
            max_workers=max_workers_from(os.environ),
        )
        self.metrics = Registry(KEPT)
        for collector in (self.holders.index.metrics, self.leases.metrics, self.claims.metrics):
            self.metrics.add(collector)
        self._stopping = anyio.Event()

    def dispatcher(self) -> Dispatcher:
        dispatcher = Dispatcher(counted=True)
        dispatcher.register(Hello, self.hello)
        dispatcher.register(Ping, self.ping)
        dispatcher.register(Version, self.version)
        dispatcher.register(Shutdown, self.shutdown)
        dispatcher.register(Metrics, self.scrape)
        dispatcher.register(LeaseAcquire, self.leases.acquire)
        dispatcher.register(LeaseHeartbeat, self.leases.heartbeat)
        dispatcher.register(LeaseRelease, self.leases.release)
        dispatcher.register(LeaseInspect, self.leases.inspect)
        dispatcher.register(LeaseListRequest, self.leases.list)
        dispatcher.register(LeaseWatch, self.leases.watch, waits=_watch_waits)
        dispatcher.register(ClusterUp, self.holders.up)
        dispatcher.register(ClusterUpToml, self.up_toml)
        dispatcher.register(ClusterDown, self.holders.down)
        dispatcher.register(MemberStatusRequest, self.holders.status)
        dispatcher.register(MemberWait, self.holders.wait, waits=_asks_to_wait)
        dispatcher.register(MemberStop, self.holders.stop)
        dispatcher.register(MemberAdd, self.holders.add)
        dispatcher.register(MemberLogs, self.holders.logs)
        dispatcher.register(LogsNamed, self.holders.logs_named)
        dispatcher.register(MemberStart, self.holders.start)
        dispatcher.register(MemberRestart, self.holders.restart)
        dispatcher.register(ClusterApply, self.holders.apply)
        dispatcher.register(ClusterApplyToml, self.apply_toml)
        dispatcher.register(ClaimAcquire, self.claims.acquire)
        dispatcher.register(ClaimRelease, self.claims.release)
        dispatcher.register(ClaimInspect, self.claims.inspect)
        dispatcher.register(ClaimListRequest, self.claims.list)
        dispatcher.register(ClaimGc, self.claims.gc)
        dispatcher.register(RunSubmit, self.tasks.submit)
        dispatcher.register(RunListRequest, self.tasks.list_runs)
        dispatcher.register(RunShow, self.tasks.show)
        dispatcher.register(RunCancel, self.tasks.cancel)
        dispatcher.register(TaskListRequest, self.tasks.list_tasks)
        dispatcher.register(EventList, self.tasks.events, waits=_asks_to_wait)
        dispatcher.register(EventEmit, self.tasks.emit)
        dispatcher.register(ReceiptListRequest, self.tasks.receipts)
        dispatcher.register(ReceiptScore, self.tasks.score_receipt)
        dispatcher.register(Drain, self.tasks.drain, waits=_asks_to_wait)
        return dispatcher

    def hello(self, request: Hello, peer: Peer) -> HelloResult:
        if request.version != PROTOCOL_VERSION:
            raise Incompatible(
                f"client speaks protocol {request.version}, fleetd speaks {PROTOCOL_VERSION}",
                server_version=PROTOCOL_VERSION,
            )
        return HelloResult(version=PROTOCOL_VERSION, server=RELEASE, pid=os.getpid())

    async def up_toml(self, request: ClusterUpToml, peer: Peer) -> ClusterResult:
        """cluster_up of the definition a fleet.toml's text gives, parsed as a client would:
        in a worker thread, since a thousand members take tens of milliseconds to parse and
        check, which the event loop's other clients should not wait for."""
        parse = functools.partial(
            parse_toml, source=request.source, name=request.name, directory=request.directory
        )
        spec = await anyio.to_thread.run_sync(parse, request.text)
        up = ClusterUp(id=request.id, spec=spec, idempotent=request.idempotent)
        return await self.holders.up(up, peer)

    async def apply_toml(self, request: ClusterApplyToml, peer: Peer) -> ClusterResult:
        """cluster_apply of a fleet.toml's text, parsed as up_toml parses it."""
        parse = functools.partial(
            parse_toml, source=request.source, name=request.name, directory=request.directory
        )
        spec = await anyio.to_thread.run_sync(parse, request.text)
        return await self.holders.apply(ClusterApply(id=request.id, spec=spec), peer)

    async def scrape(self, request: Metrics, peer: Peer) -> MetricsText:
        return MetricsText(text=await self.metrics.render())

    def ping(self, request: Ping, peer: Peer) -> Empty:
        return Empty()

    def version(self, request: Version, peer: Peer) -> VersionResult:
        return VersionResult(version=RELEASE, protocol=PROTOCOL_VERSION)

    def shutdown(self, request: Shutdown, peer: Peer) -> Empty:
        log.info("shutdown_requested", peer_pid=peer.pid)
        self._stopping.set()
        return Empty()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or a shutdown request. A store that cannot be opened
        (lost, rolled back, corrupt) raises its StartupError before anything is touched."""
        places = self.places
        async with anyio.create_task_group() as daemon:
            daemon.start_soon(self._watch_signals)
            await daemon.start(self.store.serve)
            if self.presence is not None:
                await daemon.start(self.presence.serve)
            await daemon.start(self.leases.serve)
            await daemon.start(self.template.serve)
            await daemon.start(self.holders.serve, places.runtime)
            await daemon.start(self.claims.serve)  # its start-up gc needs leases and holders
            await daemon.start(self.tasks.serve)  # its workers are members of holders
            if self.metrics_listen:
                await daemon.start(metrics_http.serve, self.metrics_listen, self.metrics.render)
            try:
                listener = await open_listener(self.socket_path, places.inherited)
            except OSError as exc:
                raise StartupError(f"cannot listen on {self.socket_path}: {exc}") from None
            await self._serve(daemon, listener, owns_socket_file=places.inherited is None)
            daemon.cancel_scope.cancel()
        log.info("fleetd_stopped")

    async def _serve(
        self, daemon: anyio.abc.TaskGroup, listener: SocketListener, *, owns_socket_file: bool
    ) -> None:
        try:
            server = ControlServer(
                self.dispatcher(),
                limits=Limits.from_environ(os.environ),
                group=socket_group(self.socket_path),
            )
            async with anyio.create_task_group() as serving:
                await serving.start(server.serve, listener)
                self._announce_ready(daemon)
                await self._stopping.wait()
                systemd.notify("STOPPING=1", "STATUS=finishing in-flight requests")
                log.info("fleetd_stopping")
                server.stop()
                self.leases.close_watches()
                serving.cancel_scope.deadline = anyio.current_time() + SHUTDOWN_GRACE
        finally:
            if owns_socket_file:
                self.places.runtime.unlink(os.path.basename(self.socket_path))

    def _announce_ready(self, daemon: anyio.abc.TaskGroup) -> None:
        systemd.notify("READY=1", f"STATUS=serving {self.socket_path}")
        return_free_memory()  # start-up (the store loaded, holders adopted) left MiBs of it
        interval = systemd.watchdog_interval()
        if interval:
            daemon.start_soon(_pet_watchdog, interval)
        log.info(
            "fleetd_ready",
            socket=self.socket_path,
            state_dir=self.places.state.path,
            pid=os.getpid(),
            version=RELEASE,
        )

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal_received", signal=signal.Signals(signum).name)
                self._stopping.set()


def _watch_waits(request: LeaseWatch) -> bool:
    """A watch from a cursor waits for events; one without answers the cursor at once."""
    return request.after is not None and request.wait > 0


def _asks_to_wait(request: MemberWait | EventList | Drain) -> bool:
    """A request with a `wait` of seconds is a long poll when it gives some."""
    return request.wait > 0


async def _pet_watchdog(interval: float) -> None:
    while True:
        systemd.notify("WATCHDOG=1")
        await anyio.sleep(interval)
