"""The client side of a holder's member sockets, shared by bound clusters (fleetctl.bound)
and by fleetd's registry of detached holders (fleetd.clusters): one pipelined connection with
watch pushes, a one-shot request, readiness of a freshly spawned holder, and the on-disk status
of a member whose holder is gone.

It imports nothing of fleetd, so fleetctl stays a client that never loads the daemon.
"""

import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import msgspec

from fleetctl._conversation import decode_result
from fleetctl._link import Answers, SocketLink
from protocol import MAX_FRAME
from protocol.errors import BadFrame, ConnectionLost, FleetError, Timeout
from protocol.framing import FrameSplitter, decode_response, encode
from protocol.members import HOLDER_LOG, MemberState, MemberStatus, member_statefile
from protocol.messages import Message, RawResponse, Request

R = TypeVar("R", bound=Message)


class MemberLink:
    """A connection to a member socket: answers go to the caller waiting on their id, watch
    pushes to `on_push`, both from the event loop's reader callback (fleetctl._link). Many
    requests may be in flight."""

    def __init__(
        self,
        *,
        on_push: Callable[[MemberStatus], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._on_push = on_push
        self._on_failure = on_failure
        self._splitter = FrameSplitter(MAX_FRAME)
        self._next_id = 0
        self._answers: Answers[RawResponse] = Answers()
        self._watch_id: int | None = None
        self._push_decoder = msgspec.json.Decoder(MemberStatus)
        self._socket: SocketLink | None = None
        self.failure: FleetError | None = None

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
        link = cls(on_push=on_push, on_failure=on_failure)
        try:
            link._socket = await SocketLink.open(path, link._data, link._ended, peer="the holder")
        except OSError as exc:
            raise ConnectionLost(f"cannot reach the holder at {path}: {exc.strerror}") from None
        return link

    async def request(
        self,
        request_type: type[Request],
        result_type: type[R],
        timeout: float,
        *,
        pushes: bool = False,
        **fields: Any,
    ) -> R:
        """Send a request and wait for its answer. `pushes`: later frames with its id are
        watch pushes (see protocol.members.Watch)."""
        if self.failure is not None:
            raise self.failure
        assert self._socket is not None, "use MemberLink.connect"
        self._next_id += 1
        request_id = self._next_id
        if pushes:
            self._watch_id = request_id
        try:
            self._socket.send(encode(request_type(id=request_id, **fields)))
            response = await self._answers.wait(request_id, timeout)
        except TimeoutError:
            raise Timeout(f"no answer from the holder within {timeout}s") from None
        return decode_result(response, result_type)

    def _data(self, data: bytes) -> None:
        try:
            for frame in self._splitter.feed(data):
                self._received(decode_response(frame))
        except (BadFrame, msgspec.MsgspecError) as exc:
            reason = exc.message if isinstance(exc, BadFrame) else str(exc)
            self._fail(ConnectionLost(f"the holder sent a bad frame: {reason}"))
            assert self._socket is not None
            self._socket.close()

    def _received(self, response: RawResponse) -> None:
        if self._answers.resolve(response.id, response):
            return
        if response.id == self._watch_id and self._on_push is not None:  # a watch's later frames
            self._on_push(self._push_decoder.decode(response.result))

    def _ended(self) -> None:
        self._fail(ConnectionLost("the holder closed the connection (it exited)"))

    def _fail(self, error: FleetError) -> None:
        if self.failure is not None:
            return
        self.failure = error
        self._answers.fail(error)
        if self._on_failure is not None:
            self._on_failure()

    async def aclose(self) -> None:
        if self._socket is not None:
            await self._socket.aclose()


async def one_request(
    path: str, request_type: type[Request], timeout: float, **fields: Any
) -> MemberStatus:
    """One request on a connection of its own (to address a particular member's socket)."""
    link = await MemberLink.connect(path)
    try:
        return await link.request(request_type, MemberStatus, timeout, **fields)
    finally:
        await link.aclose()


def status_on_disk(runtime_dir: str, name: str) -> MemberStatus:
    """With no holder to ask: `stopped` if the member left a state file, else `absent`."""
    try:
        with open(member_statefile(runtime_dir, name), "rb") as f:
            last = msgspec.json.decode(f.read(), type=MemberStatus)
    except (OSError, msgspec.MsgspecError):
        return MemberStatus(name=name, state=MemberState.ABSENT)
    return msgspec.structs.replace(last, state=MemberState.STOPPED, pid=None, running=False)


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
