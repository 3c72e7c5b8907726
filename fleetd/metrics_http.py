"""`fleetd --metrics-listen HOST:PORT`: the metrics over HTTP, for Prometheus to scrape.

One resource, `GET /metrics` (and `/`), answered with the text exposition and the
connection closed: HTTP/1.0 semantics, which every scraper speaks. Anything else is 404 or
405; a request that does not arrive whole within READ_TIMEOUT, or is over MAX_REQUEST
bytes, is dropped. At most MAX_CONNECTIONS are served at once; one more is answered 503 and
closed, so that idle connections cannot take the descriptors fleetd needs for its clients
and holders (a scraper asks a few times a minute). The control socket's peer checks do not
apply here: bind it to loopback (or a private network) as you would any exporter.
"""

from collections.abc import Awaitable, Callable

import anyio
import structlog
from anyio.abc import SocketStream, TaskStatus

from protocol.errors import StartupError

log = structlog.get_logger("fleetd.metrics_http")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
READ_TIMEOUT = 5.0
MAX_REQUEST = 8192
"""Bytes of request line and headers read at most."""
MAX_CONNECTIONS = 16


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9101` for IPv6; port 0 picks a free one) as (host, port);
    StartupError if it is not one."""
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise StartupError(f"--metrics-listen wants HOST:PORT (127.0.0.1:9101), not {value!r}")
    return host, int(port)


async def serve(
    listen: str,
    render: Callable[[], Awaitable[str]],
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `render()` at `listen` until cancelled; started with the address bound (port 0
    picks one)."""
    host, port = parse_listen(listen)
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise StartupError(f"cannot listen for metrics on {listen}: {exc}") from None
    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_address)
        log.info("metrics_listening", address=f"{bound[0]}:{bound[1]}")
        task_status.started((str(bound[0]), int(bound[1])))
        slots = anyio.Semaphore(MAX_CONNECTIONS)
        await listener.serve(lambda stream: _admit(stream, slots, render))


async def _admit(
    stream: SocketStream, slots: anyio.Semaphore, render: Callable[[], Awaitable[str]]
) -> None:
    if slots.value == 0:
        async with stream:
            with anyio.move_on_after(READ_TIMEOUT):
                await _send(stream, "503 Service Unavailable", "too many connections\n")
        return
    async with slots:
        await _answer(stream, render)


async def _answer(stream: SocketStream, render: Callable[[], Awaitable[str]]) -> None:
    """Never raises: a scraper's connection must not take fleetd down."""
    async with stream:
        with anyio.move_on_after(READ_TIMEOUT):
            head = await _read_head(stream)
            if head is None:
                return
            method, _, rest = head.partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if path not in ("/metrics", "/"):
                await _send(stream, "404 Not Found", "not found: try /metrics\n")
            elif method not in ("GET", "HEAD"):
                await _send(stream, "405 Method Not Allowed", "GET /metrics\n")
            else:
                try:
                    text = await render()
                except Exception as exc:
                    log.error("metrics_not_rendered", error=repr(exc))
                    await _send(stream, "500 Internal Server Error", "see fleetd's log\n")
                    return
                await _send(stream, "200 OK", text, body=method == "GET")


async def _read_head(stream: SocketStream) -> str | None:
    """The request line, once the headers have ended; None if they never do."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        try:
            data += await stream.receive(4096)
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            return None
    return data.split(b"\n", 1)[0].decode("latin-1").strip()


async def _send(stream: SocketStream, status: str, text: str, *, body: bool = True) -> None:
    payload = text.encode()
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    try:
        await stream.send(head.encode() + (payload if body else b""))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        return
