"""Default locations, resolved from an environment mapping (pure: the caller passes os.environ)."""

from collections.abc import Mapping

SUN_PATH_MAX = 107
"""Longest unix socket path Linux accepts (sun_path is 108 bytes with its NUL)."""


def control_socket_path(env: Mapping[str, str]) -> str:
    if env.get("FLEET_SOCKET"):
        return env["FLEET_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return env["XDG_RUNTIME_DIR"] + "/fleet/fleetd.sock"
    return "/run/fleet/fleetd.sock"


def state_dir_path(env: Mapping[str, str]) -> str:
    if env.get("FLEET_STATE_DIR"):
        return env["FLEET_STATE_DIR"]
    if env.get("XDG_STATE_HOME"):
        return env["XDG_STATE_HOME"] + "/fleet"
    return "/var/lib/fleet"


def socket_path_problem(path: str) -> str | None:
    """Why `path` cannot be a unix socket address, or None when it can."""
    size = len(path.encode())
    if size > SUN_PATH_MAX:
        return (
            f"socket path is {size} bytes, over the {SUN_PATH_MAX}-byte limit of unix "
            f"sockets: {path!r}; choose a shorter directory"
        )
    if "\0" in path:
        return f"socket path contains a NUL byte: {path!r}"
    return None
