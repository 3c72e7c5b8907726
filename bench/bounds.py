"""Bounds: fleetd's memory while clients hold all they can of it, and after they leave.

200 connections each send an unfinished frame of about 1 MiB (no newline), all at once; then
10,000 long-poll lease watches sit outstanding, spread over as many connections as the cap on
waits per connection requires. fleetd's RSS is read at rest, under each load, and after the
clients close. The README's "Bounds" section states the limits these targets follow from.

Targets are for a 2-core machine, where fleetd and the benchmark each get about one core.
"""

import fcntl
import math
import selectors
import socket
import struct
import termios
import time

from bench.harness import Figure, Fleetd, Target, rss_mib, running_fleetd
from fleetctl import SyncClient
from fleetd.core import bounds
from protocol import MAX_FRAME
from protocol.framing import encode
from protocol.leases import MAX_WAIT
from protocol.messages import LeaseWatch, Ping

PARTIAL_CONNECTIONS = 200
PARTIAL_BYTES = MAX_FRAME - 4096
"""Each connection's unfinished frame: just under the frame limit, so the limit is not why
one is refused."""
WATCHES = 10_000
SETTLE = 1.0
"""Seconds RSS must hold still before it is read: fleetd gives memory back shortly after
large connections close (fleetd.core.bounds.TRIM_DELAY), not at once."""
SETTLE_LIMIT = 10.0
SEND_TIMEOUT = 60.0
MIB = 1 << 20

BUDGET_MIB = bounds.PARTIAL_FRAME_BUDGET / MIB
PARTIAL_MARGIN_MIB = 16
"""Beyond the budget itself: the buffers' over-allocation (an eighth), a read in flight, the
200 connections' own state."""
PARTIAL_LEFT_MIB = 4
"""What fleetd may keep after the unfinished frames left: their buffers go back whole."""
WATCH_KIB = 10
"""Memory an outstanding watch may cost: its coroutines, a worker task, their cancel scopes."""
WATCHES_LEFT_MIB = 20
"""What fleetd may keep after the watches left: CPython arenas that a few objects made during
the load still pin (glibc's allocator alone, PYTHONMALLOC=malloc, keeps much less)."""


def measure() -> list[Figure]:
    with running_fleetd() as fleetd:
        with SyncClient(fleetd.socket_path) as client:
            for _ in range(10):
                client.ping()
        rest = rss_mib(fleetd.pid)
        figures = [Figure("rss_rest_mib", "fleetd RSS at rest", rest, "MiB")]
        figures += _partial_frames(fleetd, rest)
        rest = rss_mib(fleetd.pid)
        figures += _watches(fleetd, rest)
    return figures


def _partial_frames(fleetd: Fleetd, rest: float) -> list[Figure]:
    socks = [_connect(fleetd) for _ in range(PARTIAL_CONNECTIONS)]
    try:
        accepted, refused = _send_unfinished(socks)
        held = rss_mib(fleetd.pid)
    finally:
        for sock in socks:
            sock.close()
    left = _settled_rss(fleetd)
    return [
        Figure("partial_accepted", f"of {PARTIAL_CONNECTIONS} partial frames, held", accepted),
        Figure("partial_refused", f"of {PARTIAL_CONNECTIONS} partial frames, refused", refused),
        Figure("rss_partial_mib", f"RSS, {PARTIAL_CONNECTIONS} partial frames", held, "MiB"),
        Figure(
            "rss_partial_growth_mib",
            "  growth over rest",
            held - rest,
            "MiB",
            Target(BUDGET_MIB + PARTIAL_MARGIN_MIB),
        ),
        Figure("rss_partial_left_mib", "RSS after they left", left, "MiB"),
        Figure(
            "rss_partial_left_growth_mib",
            "  growth over rest",
            left - rest,
            "MiB",
            Target(PARTIAL_LEFT_MIB),
        ),
    ]


def _connect(fleetd: Fleetd) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(fleetd.socket_path)
    sock.setblocking(False)
    return sock


def _send_unfinished(socks: list[socket.socket]) -> tuple[int, int]:
    """Send every socket its unfinished frame, all at once; then how many fleetd holds (every
    byte sent and read, no answer) and how many it refused (an error frame, or closed)."""
    frame = b'{"op":"ping","id":1,"pad":"' + b"x" * PARTIAL_BYTES
    left = {sock: memoryview(frame) for sock in socks}
    refused: set[socket.socket] = set()
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + SEND_TIMEOUT
        while left and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    sent = sock.send(left[sock][:65536])
                except BlockingIOError:
                    continue
                except OSError:  # fleetd closed it: refused
                    sent = len(left[sock])
                    refused.add(sock)
                left[sock] = left[sock][sent:]
                if not left[sock]:
                    del left[sock]
                    selector.unregister(sock)
    if left:
        raise RuntimeError(f"{len(left)} connections could not send their frame: fleetd stalled")
    _wait_read(socks)
    for sock in socks:
        try:
            sock.recv(1, socket.MSG_PEEK)  # an error frame, or the end of the stream
        except BlockingIOError:
            continue  # nothing to read: still held
        except OSError:
            pass
        refused.add(sock)
    return len(socks) - len(refused), len(refused)


def _wait_read(socks: list[socket.socket]) -> None:
    """Until fleetd read everything sent (each socket's send queue empty, per SIOCOUTQ)."""
    deadline = time.monotonic() + SEND_TIMEOUT
    for sock in socks:
        while time.monotonic() < deadline:
            try:
                queued = struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]
            except OSError:
                break
            if not queued:
                break
            time.sleep(0.01)


def _watches(fleetd: Fleetd, rest: float) -> list[Figure]:
    with SyncClient(fleetd.socket_path) as client:
        start = client.lease_watch("bench/")
    per_connection = min(bounds.MAX_WAITS, WATCHES)
    connections = math.ceil(WATCHES / per_connection)
    socks = []
    try:
        for n in range(connections):
            count = min(per_connection, WATCHES - n * per_connection)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(fleetd.socket_path)
            socks.append(sock)
            frames = b"".join(
                encode(
                    LeaseWatch(
                        id=i, prefix="bench/", after=start.cursor, epoch=start.epoch, wait=MAX_WAIT
                    )
                )
                for i in range(count)
            )
            sock.sendall(frames + encode(Ping(id=count)))
        for sock in socks:
            _await_pong(sock)  # every watch before it was read and is outstanding
        time.sleep(SETTLE)
        held = rss_mib(fleetd.pid)
    finally:
        for sock in socks:
            sock.close()
    left = _settled_rss(fleetd)
    return [
        Figure("watch_connections", f"connections for {WATCHES:,} watches", connections),
        Figure("rss_watches_mib", f"RSS, {WATCHES:,} outstanding watches", held, "MiB"),
        Figure(
            "watch_kib",
            "  growth per watch",
            (held - rest) * 1024 / WATCHES,
            "KiB",
            Target(WATCH_KIB),
        ),
        Figure("rss_watches_left_mib", "RSS after they left", left, "MiB"),
        Figure(
            "rss_watches_left_growth_mib",
            "  growth over rest",
            left - rest,
            "MiB",
            Target(WATCHES_LEFT_MIB),
        ),
    ]


def _await_pong(sock: socket.socket) -> None:
    """The ping's answer: the only answer that comes while every watch waits."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("fleetd closed a watching connection")
        data += chunk
    if data.count(b"\n") != 1 or b'"result":{}' not in data:
        raise RuntimeError(f"expected only the ping's answer, got {data[:200]!r}")


def _settled_rss(fleetd: Fleetd) -> float:
    """RSS once it stops moving: unchanged for SETTLE seconds (fleetd trims TRIM_DELAY after
    the last of a burst of large connections ended, and ending 10,000 watches takes a while),
    read at most SETTLE_LIMIT seconds after the clients left."""
    deadline = time.monotonic() + SETTLE_LIMIT
    readings = [rss_mib(fleetd.pid)]
    while time.monotonic() < deadline:
        time.sleep(SETTLE / 4)
        readings.append(rss_mib(fleetd.pid))
        if len(readings) > 4 and len(set(readings[-5:])) == 1:
            break
    return readings[-1]
