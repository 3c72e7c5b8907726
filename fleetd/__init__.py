"""fleetd: two programs. The daemon (`python -m fleetd`) is this package's own modules, one per
concept, with fleetd.clusters (its side of detached holders) and fleetd.store; the holder
(`python -m fleetd.holder`) is fleetd.holder, which also holds the template that forks holders
(`python -m fleetd.holder.template`); fleetd.core is what both stand on. The daemon never
imports the holder program, nor the holder the daemon (tests/test_layering.py)."""

from protocol import RELEASE as __version__

__all__ = ["__version__"]
