"""fleet.toml files read from disk, for `fleetctl up`/`add` and bound clusters.

The protocol package parses definitions (``protocol.definitions.parse_toml``) but does no I/O,
so reading the file is done here, on the side of the program that was given its path.
"""

from protocol.definitions import ClusterSpec, parse_toml
from protocol.errors import InvalidRequest


def load_toml(path: str, *, name: str | None = None) -> ClusterSpec:
    """The cluster a `fleet.toml` defines; `name` overrides its top-level `name` (default:
    "default"). Raises InvalidRequest naming the file, line and key of the first problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_toml(raw.decode(errors="replace"), source=path, name=name)
