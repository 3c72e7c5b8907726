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
        ConnectionLost as ConnectionLost,
    )
    from protocol.errors import (
        FleetError as FleetError,
    )
    from protocol.errors import (
        Incompatible as Incompatible,
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
    "FleetError": "protocol.errors",
    "ConnectionLost": "protocol.errors",
    "Incompatible": "protocol.errors",
    "Timeout": "protocol.errors",
    "Unavailable": "protocol.errors",
}

__all__ = [
    "Client",
    "ConnectionLost",
    "FleetError",
    "Incompatible",
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
