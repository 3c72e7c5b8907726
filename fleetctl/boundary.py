"""Where a client finds fleetd, and what connecting to it raises: the OS's errors mapped to
fleet's at the client's boundary, once for the async Client and the blocking SyncClient.

    OSError (nothing listens, no such file)   -> Unavailable
    TimeoutError (connect took too long)      -> Timeout
    a socket path that cannot work (too long) -> Unavailable, before any connect
"""

import contextlib
import os
from collections.abc import Iterator

from protocol.errors import Timeout, Unavailable
from protocol.paths import client_socket_path, no_fleetd, socket_path_problem


def resolve_socket(socket_path: str | None) -> str:
    """`socket_path`, else $FLEET_SOCKET, else the default path (protocol.paths)."""
    return socket_path or client_socket_path(os.environ, os.path.exists)


@contextlib.contextmanager
def connecting(socket_path: str, timeout: float) -> Iterator[None]:
    """Around opening a connection to fleetd at `socket_path`."""
    problem = socket_path_problem(socket_path)
    if problem:
        raise Unavailable(problem)
    try:
        yield
    except TimeoutError:
        raise Timeout(f"connecting to {socket_path} took over {timeout}s") from None
    except OSError as exc:
        raise Unavailable(no_fleetd(socket_path, exc.strerror or str(exc))) from None
