"""The client side of a holder's member sockets, shared by bound clusters (fleetctl.bound)
and by fleetd's registry of detached holders (fleetd.clusters): one pipelined connection with
watch pushes (the async connection, fleetctl.connection), a one-shot request, readiness of a
freshly spawned holder, and the on-disk status of a member whose holder is gone.

It imports nothing of fleetd, so fleetctl stays a client that never loads the daemon.
"""

import os
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from fleetctl.connection import AsyncConnection
from protocol.base import Op
from protocol.errors import ConnectionLost, FleetError, Timeout
from protocol.members import HOLDER_LOG, MemberState, MemberStatus, member_statefile
from protocol.messages import RawResponse

_push_decoder = msgspec.json.Decoder(MemberStatus)


class MemberLink(AsyncConnection):
    """A connection to a member socket: many requests may be in flight; a watch's pushes go
    to `on_push` as MemberStatus, and `on_failure` is called once when the holder goes (both
    from the event loop's reader callback)."""

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        on_push: Callable[[MemberStatus], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> "MemberLink":
        """Raises ConnectionLost when no holder listens at `path`, PermissionDenied when
        another user's process does (the holder must run as this process's uid, or root)."""
        try:
            return await cls.open(
                path, peer="the holder", on_push=_decoding(on_push), on_failure=on_failure
            )
        except OSError as exc:
            raise ConnectionLost(f"cannot reach the holder at {path}: {exc.strerror}") from None


def _decoding(
    on_push: Callable[[MemberStatus], None] | None,
) -> Callable[[RawResponse], None] | None:
    if on_push is None:
        return None

    def pushed(response: RawResponse) -> None:
        on_push(_push_decoder.decode(response.result))

    return pushed


async def one_request(
    path: str, op: type[Op[MemberStatus]], timeout: float, **fields: Any
) -> MemberStatus:
    """One request on a connection of its own (to address a particular member's socket)."""
    link = await MemberLink.connect(path)
    try:
        return await link.request(op, timeout, **fields)
    finally:
        await link.aclose()


def status_on_disk(runtime_dir: str, name: str) -> MemberStatus:
    """With no holder to ask: `stopped` if the member left a state file, `absent` if it left
    none; a state file that cannot be read or decoded is an `error` status that says so (a
    member that existed is never taken for one that did not)."""
    path = member_statefile(runtime_dir, name)
    try:
        with open(path, "rb") as f:
            last = msgspec.json.decode(f.read(), type=MemberStatus)
    except FileNotFoundError:
        return MemberStatus(name=name, state=MemberState.ABSENT)
    except OSError as exc:
        return _unreadable(name, f"cannot read its state file {path}: {exc.strerror or exc}")
    except (msgspec.MsgspecError, RecursionError) as exc:
        return _unreadable(name, f"its state file {path} is corrupt: {exc}")
    return msgspec.structs.replace(last, state=MemberState.STOPPED, pid=None, running=False)


def _unreadable(name: str, why: str) -> MemberStatus:
    return MemberStatus(name=name, state=MemberState.ERROR, error=why)


async def holder_ready(ready: int, timeout: float, runtime_dir: str) -> None:
    """Wait for the "ready" line a holder writes on its ready fd once every member socket
    listens (non-blocking reads on the pipe's read end, which this closes not); EOF means the
    holder failed to start, and the error carries the end of its log."""
    os.set_blocking(ready, False)
    received = b""
    try:
        with anyio.fail_after(timeout):
            while b"\n" not in received:
                await anyio.wait_readable(ready)
                chunk = os.read(ready, 64)
                if not chunk:
                    raise FleetError(f"the holder failed to start: {holder_log(runtime_dir)}")
                received += chunk
    except TimeoutError:
        raise Timeout(f"the holder did not start within {timeout}s") from None


def holder_log(log_path_or_dir: str, lines: int = 5) -> str:
    """The last lines of a holder's log (given the file, or the runtime directory holding
    holder.log), on one line, for an error message."""
    path = log_path_or_dir
    if os.path.isdir(path):
        path = os.path.join(path, HOLDER_LOG)
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"
