"""The three pieces of the systemd service protocol fleetd speaks: notify, watchdog, activation.

Pure stdlib and synchronous on purpose: every call is one non-blocking syscall or an environment
lookup, so the daemon may call them from async code without a thread, and `fleetctl` or a holder
never pulls in a dependency to import them. Outside systemd every function degrades to a no-op
(`False`, `None`, `[]`), so the daemon has no "am I under systemd?" branch.

The `environ` parameters exist so that tests can pass a plain dict instead of patching the
process environment; the daemon leaves them out.
"""

import os
import socket
from collections.abc import Mapping, MutableMapping

__all__ = ["LISTEN_FDS_START", "listen_sockets", "notify", "watchdog_interval"]

LISTEN_FDS_START = 3
"""First descriptor systemd passes on socket activation (SD_LISTEN_FDS_START)."""

_ACTIVATION_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

_notify_socket: socket.socket | None = None


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=…") as one sd_notify datagram to $NOTIFY_SOCKET.

    Returns whether the datagram was handed to the receiver. False when $NOTIFY_SOCKET is unset
    (not under systemd: nothing to do) and also when the receiver is gone, refuses, or its queue
    is full: a lost status line must never take the daemon down, so the caller may log it and go
    on. Fields must not contain a newline, which separates them on the wire.
    """
    address = _notify_address(os.environ if environ is None else environ)
    if address is None:
        return False
    try:
        _cached_notify_socket().sendto("\n".join(fields).encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval(*, environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings, or None when systemd expects none from us.

    Half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late ping is not yet a
    missed deadline. $WATCHDOG_PID names the process the watchdog is armed for: a holder that
    inherited the daemon's environment must not ping on the daemon's behalf.
    """
    env = os.environ if environ is None else environ
    usec = _positive_int(env.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and _positive_int(pid) != os.getpid():
        return None
    return usec / 2_000_000


def listen_sockets(*, environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """Sockets passed by socket activation ($LISTEN_PID/$LISTEN_FDS), or [] when there are none.

    The activation variables are removed from the environment whatever they say, as
    sd_listen_fds(3) does: holders are spawned from this environment and must not believe that
    the daemon's descriptors are theirs. The descriptors are made close-on-exec for the same
    reason. Raises OSError if a passed descriptor is not a socket (a ListenFIFO= in the unit).
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    for name in _ACTIVATION_VARIABLES:
        env.pop(name, None)
    if _positive_int(pid) != os.getpid():
        return []
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + (_positive_int(count) or 0))
    for fd in fds:
        os.set_inheritable(fd, False)
    return [socket.socket(fileno=fd) for fd in fds]


def _notify_address(env: Mapping[str, str]) -> str | None:
    """The sendto() address for $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace.

    Other forms (systemd 254's vsock:CID:PORT, for VMs) are not ours to support: None.
    """
    address = env.get("NOTIFY_SOCKET", "")
    if address.startswith("/"):
        return address
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    return None


def _cached_notify_socket() -> socket.socket:
    """One unbound datagram socket for the whole process: notify() runs every few seconds.

    Non-blocking so that a receiver with a full queue costs an EAGAIN, never a stalled event
    loop. Python sockets are close-on-exec already, so holders do not inherit it.
    """
    global _notify_socket  # noqa: PLW0603 - a process-wide cache is the point
    if _notify_socket is None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        _notify_socket = sock
    return _notify_socket


def _positive_int(text: str | None) -> int | None:
    """Decimal integer > 0, or None for anything systemd would not have written."""
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None
