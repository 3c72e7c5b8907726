"""Default locations, resolved from an environment mapping (pure: the caller passes os.environ)."""

from __future__ import annotations

TYPE_CHECKING = False  # fleetctl's fast path imports this module: collections.abc costs it 0.1 ms
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SUN_PATH_MAX = 107
"""Longest unix socket path Linux accepts (sun_path is 108 bytes with its NUL)."""


SYSTEM_SOCKET = "/run/fleet/fleetd.sock"
"""Where the systemd unit puts the control socket."""


def control_socket_path(env: Mapping[str, str]) -> str:
    """Where fleetd listens by default."""
    return control_socket_candidates(env)[0]


def control_socket_candidates(env: Mapping[str, str]) -> list[str]:
    """Where a client looks, in order: $FLEET_SOCKET alone when set; else the user's runtime
    directory, then the system daemon's socket (a root shell has $XDG_RUNTIME_DIR set, and
    should still find the fleetd that systemd runs)."""
    if env.get("FLEET_SOCKET"):
        return [env["FLEET_SOCKET"]]
    if env.get("XDG_RUNTIME_DIR"):
        return [env["XDG_RUNTIME_DIR"] + "/fleet/fleetd.sock", SYSTEM_SOCKET]
    return [SYSTEM_SOCKET]


def client_socket_path(env: Mapping[str, str], exists: Callable[[str], bool]) -> str:
    """The first candidate that `exists`, else the first: what the error message names."""
    candidates = control_socket_candidates(env)
    return next((path for path in candidates if exists(path)), candidates[0])


def state_dir_path(env: Mapping[str, str]) -> str:
    if env.get("FLEET_STATE_DIR"):
        return env["FLEET_STATE_DIR"]
    if env.get("XDG_STATE_HOME"):
        return env["XDG_STATE_HOME"] + "/fleet"
    return "/var/lib/fleet"


def socket_path_problem(path: str) -> str | None:
    """Why `path` cannot be a unix socket address, or None when it can."""
    size = len(path.encode(errors="surrogateescape"))  # as the kernel gets it: any bytes
    if size > SUN_PATH_MAX:
        return (
            f"socket path is {size} bytes, over the {SUN_PATH_MAX}-byte limit of unix "
            f"sockets: {path!r}; choose a shorter directory"
        )
    if "\0" in path:
        return f"socket path contains a NUL byte: {path!r}"
    return None


def no_fleetd(socket_path: str, why: str) -> str:
    """What to say when nobody answers at `socket_path`, and what to do about it."""
    return (
        f"no fleetd at {socket_path}: {why} (start one with `fleetd`, or point FLEET_SOCKET "
        "at the socket of one that runs)"
    )
