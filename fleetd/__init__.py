"""fleetd: the supervisor daemon. One module per concept; see the package tree."""

from protocol import RELEASE as __version__

__all__ = ["__version__"]
