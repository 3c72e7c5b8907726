"""A blocking facade for callers without an event loop: plain sockets, no anyio import."""

import socket
import time
from types import TracebackType
from typing import Any, Self

from fleetctl._conversation import (
    DEFAULT_TIMEOUT,
    Conversation,
    R,
    check_server_version,
    decode_result,
    resolve_socket,
    unavailable,
)
from protocol import PROTOCOL_VERSION
from protocol.errors import ClientClosed, ConnectionLost, Timeout, Unavailable
from protocol.leases import DEFAULT_TTL, MAX_WAIT
from protocol.messages import (
    Empty,
    Hello,
    HelloResult,
    LeaseAcquire,
    LeaseEvents,
    LeaseHeartbeat,
    LeaseInspect,
    LeaseList,
    LeaseListRequest,
    LeaseRelease,
    LeaseResult,
    LeaseWatch,
    Ping,
    Request,
    Shutdown,
    Version,
    VersionResult,
)
from protocol.paths import socket_path_problem

_READ_SIZE = 65536


class SyncClient:
    """The same calls as Client, blocking. One request at a time (no pipelining needed)."""

    def __init__(self, socket_path: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout
        self.server: HelloResult | None = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._conversation = Conversation()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def connect(self) -> HelloResult:
        if self._sock is not None or self._closed:
            raise ClientClosed("connect() on a client that was already connected")
        problem = socket_path_problem(self.socket_path)
        if problem:
            raise Unavailable(problem)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except TimeoutError:
            sock.close()
            raise Timeout(f"connecting to {self.socket_path} took over {self.timeout}s") from None
        except OSError as exc:
            sock.close()
            raise unavailable(self.socket_path, exc) from None
        self._sock = sock
        try:
            hello = self.request(Hello, HelloResult, version=PROTOCOL_VERSION, client="fleetctl")
            self.server = check_server_version(hello)
        except BaseException:
            self.close()
            raise
        return self.server

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def ping(self) -> None:
        self.request(Ping, Empty)

    def version(self) -> VersionResult:
        return self.request(Version, VersionResult)

    def shutdown(self) -> None:
        self.request(Shutdown, Empty)

    def lease_acquire(
        self, name: str, owner: str, ttl: float = DEFAULT_TTL, *, pid: int = 0
    ) -> LeaseResult:
        return self.request(LeaseAcquire, LeaseResult, name=name, owner=owner, ttl=ttl, pid=pid)

    def lease_heartbeat(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return self.request(
            LeaseHeartbeat, LeaseResult, timeout=timeout, name=name, owner=owner, token=token
        )

    def lease_release(
        self, name: str, owner: str, token: int = 0, *, timeout: float | None = None
    ) -> LeaseResult:
        return self.request(
            LeaseRelease, LeaseResult, timeout=timeout, name=name, owner=owner, token=token
        )

    def lease_inspect(self, name: str) -> LeaseResult:
        return self.request(LeaseInspect, LeaseResult, name=name)

    def lease_list(self, prefix: str = "") -> LeaseList:
        return self.request(LeaseListRequest, LeaseList, prefix=prefix)

    def lease_watch(
        self, prefix: str = "", after: int | None = None, *, epoch: str = "", wait: float = 25.0
    ) -> LeaseEvents:
        return self.request(
            LeaseWatch,
            LeaseEvents,
            timeout=wait + self.timeout,
            prefix=prefix,
            after=after,
            epoch=epoch,
            wait=min(wait, MAX_WAIT),
        )

    def request(
        self,
        request_type: type[Request],
        result_type: type[R],
        *,
        timeout: float | None = None,
        **fields: Any,
    ) -> R:
        sock = self._sock
        if sock is None:
            raise ClientClosed("the client is not connected; connect() first")
        conversation = self._conversation
        request_id, frame = conversation.request(request_type, fields)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(frame)
            while (answer := conversation.outcome(request_id)) is None:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = sock.recv(_READ_SIZE)
                if data:
                    conversation.received(data)
                else:
                    conversation.ended()
        except TimeoutError:
            raise Timeout(f"no answer from fleetd within {timeout or self.timeout}s") from None
        except OSError as exc:
            raise ConnectionLost(f"fleetd went away: {exc.strerror or exc}") from None
        finally:
            conversation.abandon(request_id)
        return decode_result(answer, result_type)
