"""fleetctl: the client library and CLI of fleetd.

Names are imported on first use, so that the CLI starts without loading what a command does
not need (anyio alone costs several milliseconds).
"""

from protocol import RELEASE as __version__

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs the CLI 3 ms
if TYPE_CHECKING:
    from fleetctl.bound import cluster as cluster
    from fleetctl.client import Client as Client
    from fleetctl.sync import SyncClient as SyncClient
    from protocol.errors import (
        Absent as Absent,
    )
    from protocol.errors import (
        ConnectionLost as ConnectionLost,
    )
    from protocol.errors import (
        FleetError as FleetError,
    )
    from protocol.errors import (
        Incompatible as Incompatible,
    )
    from protocol.errors import (
        InvalidRequest as InvalidRequest,
    )
    from protocol.errors import (
        MemberFailed as MemberFailed,
    )
    from protocol.errors import (
        PermissionDenied as PermissionDenied,
    )
    from protocol.errors import (
        Timeout as Timeout,
    )
    from protocol.errors import (
        Unavailable as Unavailable,
    )

_LAZY = {
    "cluster": "fleetctl.bound",
    "Client": "fleetctl.client",
    "SyncClient": "fleetctl.sync",
    "Absent": "protocol.errors",
    "ConnectionLost": "protocol.errors",
    "FleetError": "protocol.errors",
    "Incompatible": "protocol.errors",
    "InvalidRequest": "protocol.errors",
    "MemberFailed": "protocol.errors",
    "PermissionDenied": "protocol.errors",
    "Timeout": "protocol.errors",
    "Unavailable": "protocol.errors",
}
"""The exceptions are those a user catches (protocol.errors has them all)."""

__all__ = [
    "Absent",
    "Client",
    "ConnectionLost",
    "FleetError",
    "Incompatible",
    "InvalidRequest",
    "MemberFailed",
    "PermissionDenied",
    "SyncClient",
    "Timeout",
    "Unavailable",
    "__version__",
    "cluster",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fleetctl' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The lazy names too: `dir(fleetctl)` and completion in a REPL show them."""
    return sorted({*globals(), *__all__} - {"TYPE_CHECKING"})
