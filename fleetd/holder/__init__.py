"""The holder program (`python -m fleetd.holder`): one process per cluster, parent and
supervisor of its members; most are forked from a warm template (`python -m
fleetd.holder.template`, fleetd.holder.template). It imports fleetd.core, never the daemon's
modules."""
