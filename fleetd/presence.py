"""This fleetd's presence in a shared store (etcd): one store lease, kept alive, to which
every lease record it holds for its clients is attached.

With several fleetd processes on one etcd, each keeps the deadlines of the leases granted
through it (heartbeats write nothing: fleetd.leases), and the others see those leases as held
until the record says otherwise. Should a fleetd die, or lose etcd for good, nobody would
write that: so its held records are put with its presence, and etcd deletes them once the
presence expires. One store lease per fleetd, not one per name: keepalives then cost one
message every TTL/3 whatever the number of leases (../shared/ETCD-NOTES.md).

A fleetd may act on its leases only while its presence is sure to be alive: until the last
acknowledged keepalive's send time plus the TTL (`valid`), on its own monotonic clock, whatever
etcd says later (a restart or a leader change resets etcd's count). Past that, every lease it
holds is lost (`on_lost`), its heartbeats answer not_owned, and coord-run kills its child.

The presence's id is kept in the state directory, so that a fleetd restarted within the TTL
takes its presence, and so its leases, back.
"""

import socket
import time
from collections.abc import Callable

import anyio
import structlog
from anyio.abc import TaskStatus

from fleetd.core.dirs import PrivateDir
from fleetd.store import Store
from protocol.errors import FleetError

log = structlog.get_logger("fleetd.presence")

TTL = 10.0
"""Seconds a fleetd's presence outlives its last keepalive: how long a dead fleetd's leases
stay held before another fleetd may grant them."""
MIN_PAUSE = 0.1
FILE = "presence"


def home_of(state: PrivateDir) -> str:
    """A fleetd's home on a shared store: its host and state directory, which hold what only
    it may touch (the files of the claims delivered through it, its holders' journal)."""
    return f"{socket.gethostname()}:{state.path}"


class Presence:
    """Start it with ``await tg.start(presence.serve)`` once the store serves."""

    def __init__(
        self,
        store: Store,
        state: PrivateDir,
        *,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = TTL,
    ) -> None:
        self._store = store
        self._state = state
        self._clock = clock
        self._ttl = ttl
        self.id = 0
        """The store lease; 0 while there is none."""
        self.valid_until = 0.0
        self.on_lost: Callable[[], None] = lambda: None
        """Called once the presence can no longer be sure to be alive."""

    def valid(self, now: float) -> bool:
        return now < self.valid_until

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Take the presence back, or grant one; then keep it alive until cancelled."""
        if not await self._take_back():
            await self._grant()
        task_status.started()
        while True:
            await anyio.sleep(self._pause())
            await self._renew()

    def _pause(self) -> float:
        """A quarter of the TTL; less when the presence would lapse sooner (a keepalive
        failed), so that its loss is noticed on time."""
        every = self._ttl / 4
        if not self.id:
            return every
        return max(MIN_PAUSE, min(every, self.valid_until - self._clock()))

    async def _take_back(self) -> bool:
        """Whether the presence of this state directory's last fleetd is still alive: ours."""
        try:
            previous = int(self._state.read_file(FILE, 64) or b"0")
        except (FileNotFoundError, ValueError):
            return False
        sent = self._clock()
        if previous and await self._store.keepalive(previous) > 0:
            self.id, self.valid_until = previous, sent + self._ttl
            log.info("presence_taken_back", presence=f"{previous:x}")
            return True
        return False

    async def _grant(self) -> None:
        sent = self._clock()
        self.id, ttl = await self._store.grant(self._ttl)
        self._ttl = ttl
        self.valid_until = sent + ttl
        self._state.write_atomically(FILE, str(self.id).encode(), durable=True)
        log.info("presence_granted", presence=f"{self.id:x}", ttl=ttl)

    async def _renew(self) -> None:
        sent = self._clock()
        try:
            if not self.id:
                await self._grant()
                return
            remaining = await self._store.keepalive(self.id)
        except FleetError as exc:
            log.warning("presence_not_renewed", presence=f"{self.id:x}", error=exc.message)
            self._lost_if_expired()
            return
        if remaining > 0:
            self.valid_until = sent + remaining
            return
        log.warning("presence_lost", presence=f"{self.id:x}", reason="etcd expired it")
        self.valid_until = 0.0
        self._lost()

    def _lost_if_expired(self) -> None:
        if self.id and not self.valid(self._clock()):
            log.warning("presence_lost", presence=f"{self.id:x}", reason="etcd unreachable")
            self._lost()

    def _lost(self) -> None:
        self.id = 0
        self.on_lost()
