"""The holder program (`python -m fleetd.holder`): one process per cluster, parent and
supervisor of its members. It imports fleetd.core, never the daemon's modules."""
