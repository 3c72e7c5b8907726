"""A part of a store of its own: every key under a scope, which the caller never sees.

On a store shared by several fleetd processes (etcd), what only one fleetd may read and write
(its holder journal: the pids of its holders, on its host) lives under a scope of its own
(``homes/HOST:STATE_DIR/``), so that another fleetd's start-up never reads it as its own.
"""

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import msgspec
from anyio.abc import TaskStatus

from fleetd.store import (
    Compare,
    Delete,
    DeleteRange,
    DeleteResult,
    Event,
    Get,
    KeyValue,
    Lease,
    Operation,
    Put,
    PutResult,
    Range,
    RangeResult,
    Response,
    Store,
    StoreStatistics,
    TxnResult,
)


class Scoped(Store):
    """`store`'s keys under `scope`, as if they were all of it. Served by whoever serves
    `store`: `serve` only waits."""

    def __init__(self, store: Store, scope: str) -> None:
        self._store = store
        self._scope = scope
        self.shared = store.shared
        self.max_operations = store.max_operations

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await anyio.sleep_forever()

    @property
    def revision(self) -> int:
        return self._store.revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Operation] = (),
        failure: Sequence[Operation] = (),
    ) -> TxnResult:
        result = await self._store.txn(
            [msgspec.structs.replace(c, key=self._scope + c.key) for c in compares],
            [self._in(op) for op in success],
            [self._in(op) for op in failure],
        )
        return msgspec.structs.replace(
            result, responses=tuple(self._out(r) for r in result.responses)
        )

    async def grant(self, ttl: float) -> tuple[int, float]:
        return await self._store.grant(ttl)

    async def keepalive(self, lease: int) -> float:
        return await self._store.keepalive(lease)

    async def revoke(self, lease: int) -> None:
        await self._store.revoke(lease)

    async def leases(self) -> tuple[Lease, ...]:
        return await self._store.leases()

    @asynccontextmanager
    async def watch(
        self, prefix: str, start_revision: int | None = None
    ) -> AsyncIterator[AsyncIterator[Event]]:
        async with self._store.watch(self._scope + prefix, start_revision) as events:
            yield self._events(events)

    def statistics(self) -> StoreStatistics:
        return self._store.statistics()

    async def _events(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async for event in events:
            prev = self._kv(event.prev_kv) if event.prev_kv is not None else None
            yield Event(event.type, self._kv(event.kv), prev)

    def _in(self, op: Operation) -> Operation:
        match op:
            case Put() | Delete() | Get():
                return msgspec.structs.replace(op, key=self._scope + op.key)
            case Range() | DeleteRange():
                return msgspec.structs.replace(op, prefix=self._scope + op.prefix)
        raise TypeError(op)

    def _out(self, response: Response) -> Response:
        match response:
            case PutResult():
                return response
            case DeleteResult(deleted):
                return DeleteResult(tuple(self._kv(kv) for kv in deleted))
            case RangeResult(kvs, more):
                return RangeResult(tuple(self._kv(kv) for kv in kvs), more)
        raise TypeError(response)

    def _kv(self, kv: KeyValue) -> KeyValue:
        return msgspec.structs.replace(kv, key=kv.key.removeprefix(self._scope))
