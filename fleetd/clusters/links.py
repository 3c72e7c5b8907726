"""fleetd's one door to fleetctl.members_client, the client half of the member-socket
protocol: every call fleetd.clusters makes into it is here, so that when that API changes,
this file is the one to change.
"""

from collections.abc import Callable

import anyio

from fleetctl.members_client import MemberLink, holder_log, holder_ready, status_on_disk
from protocol.definitions import MemberSpec
from protocol.members import AddMember, MemberStatus, Remove, Restart, Start, Stop, Watch

__all__ = [
    "REQUEST_TIMEOUT",
    "MemberLink",
    "add_member",
    "holder_log",
    "holder_ready",
    "open_watch",
    "remove_member",
    "restart_member",
    "start_member",
    "status_on_disk",
    "stop_member",
]

REQUEST_TIMEOUT = 10.0
"""Seconds a holder gets to answer a watch or an addmember."""


async def open_watch(
    path: str, on_push: Callable[[MemberStatus], None]
) -> tuple[MemberLink, list[MemberStatus]]:
    """A watch over the member socket at `path`: the link, whose later pushes go to `on_push`,
    and the snapshot. Raises ConnectionLost when nothing listens there, PermissionDenied when
    another user's process does, Timeout when the holder does not answer."""
    link = await MemberLink.connect(path, on_push=on_push)
    try:
        snapshot = await link.request(Watch, REQUEST_TIMEOUT, pushes=True)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await link.aclose()
        raise
    return link, snapshot.members


async def stop_member(link: MemberLink, member: str, timeout: float) -> MemberStatus:
    return await link.request(Stop, timeout, name=member)


async def add_member(link: MemberLink, spec: MemberSpec) -> MemberStatus:
    return await link.request(AddMember, REQUEST_TIMEOUT, spec=spec)


async def start_member(link: MemberLink, member: str, timeout: float) -> MemberStatus:
    return await link.request(Start, timeout, name=member)


async def restart_member(
    link: MemberLink, member: str, timeout: float, spec: MemberSpec | None = None
) -> MemberStatus:
    return await link.request(Restart, timeout, name=member, spec=spec)


async def remove_member(link: MemberLink, member: str, timeout: float) -> MemberStatus:
    return await link.request(Remove, timeout, name=member)
