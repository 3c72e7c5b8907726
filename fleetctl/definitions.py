"""fleet.toml files read from disk, for `fleetctl up`/`add` and bound clusters.

The protocol package parses definitions (``protocol.definitions.parse_toml``) but does no I/O,
so reading the file is done here, on the side of the program that was given its path.
"""

import os

from protocol.definitions import ClusterSpec, parse_toml
from protocol.errors import InvalidRequest


def load_toml(path: str, *, name: str | None = None) -> ClusterSpec:
    """The cluster a `fleet.toml` defines; `name` overrides its top-level `name` (default:
    "default"). Raises InvalidRequest naming the file, line and key of the first problem."""
    return parse_toml(read_toml(path), source=path, name=name, directory=directory_of(path))


def directory_of(path: str) -> str:
    """The directory a fleet.toml's members run in (the file's, absolute)."""
    return os.path.dirname(os.path.abspath(path))


def read_toml(path: str) -> str:
    """The text of a `fleet.toml` (what is not UTF-8 replaced), for fleetd to parse
    (`fleetctl up`) or for load_toml. Raises InvalidRequest when it cannot be read.
    fleetctl's fast path (fleetctl._fast.commands) reads it alike, with the same message."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return raw.decode(errors="replace")
