"""Sending without a loop turn when the kernel takes the data at once.

anyio's stream send starts with a checkpoint, a full event-loop turn, before touching the
socket: on a request-answer round trip of ~100 µs that turn was a third of it. `send` tries
the socket first and falls back to the stream only for what it would not take. (Receiving
gains nothing so: right after a request the answer is never there yet.) The caller keeps to
one sender at a time, as the stream's own guard would require.
"""

import socket

import anyio
from anyio.abc import SocketAttribute, SocketStream


def raw_socket(stream: SocketStream) -> socket.socket:
    sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    return sock


async def send(stream: SocketStream, sock: socket.socket, data: bytes) -> None:
    """All of `data`: what the socket takes now, the rest through the stream."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise anyio.BrokenResourceError from exc
    if sent < len(data):
        await stream.send(data[sent:])
