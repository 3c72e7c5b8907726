"""Many clusters under one fleetd, as real processes: 200 clusters of 5 `sleep` members come up
at once, answer for everyone and for each, and go down. Slow: 200 holders start (the bench's
`clusters` section times the same, beside supervisord)."""

from contextlib import AsyncExitStack

import anyio
import pytest

from fleetctl import Client
from protocol.definitions import ClusterSpec, MemberSpec
from protocol.members import MemberState
from tests.processes import Fleetd

CLUSTERS = 200
MEMBERS = 5
TIMEOUT = 180.0


def spec(cluster: str) -> ClusterSpec:
    members = [MemberSpec(name=f"m{i}", command=["sleep", "60"]) for i in range(MEMBERS)]
    return ClusterSpec(name=cluster, members=members)


async def up(client: Client, cluster: str) -> None:
    await client.cluster_up(spec(cluster))
    await client.member_wait([f"{cluster}/m{i}" for i in range(MEMBERS)], timeout=TIMEOUT)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
async def test_two_hundred_clusters_come_up_answer_and_go_down(holders: Fleetd) -> None:
    names = [f"c{i}" for i in range(CLUSTERS)]
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(Client(holders.socket_path, timeout=TIMEOUT))
            for _ in names
        ]
        async with anyio.create_task_group() as tasks:
            for client, name in zip(clients, names, strict=True):
                tasks.start_soon(up, client, name)

        every = await clients[0].member_status()
        assert len(every) == CLUSTERS * MEMBERS
        assert {s.state for s in every} == {MemberState.RUNNING}
        assert {s.cluster for s in every} == set(names)
        last = (f"c{CLUSTERS - 1}", f"m{MEMBERS - 1}")
        named = await clients[0].member_status(["/".join(last), "c0/m0"])
        assert [(s.cluster, s.name) for s in named] == [last, ("c0", "m0")]

        async with anyio.create_task_group() as tasks:
            for client, name in zip(clients, names, strict=True):
                tasks.start_soon(client.cluster_down, name)
        assert await clients[0].member_status() == []
        gone = await clients[0].member_status(["c0/m0"])
        assert [s.state for s in gone] == [MemberState.STOPPED]
