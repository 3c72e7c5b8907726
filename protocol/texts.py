"""Messages both of fleetctl's paths print (click's and the fast path's), worded once. It
imports nothing: the fast path loads neither msgspec nor typing (fleetctl._fast)."""


def left_up(message: str, cluster: str) -> str:
    """A failed `up --wait`'s message: the wait failed, but the cluster was brought up."""
    return f"{message} (cluster {cluster} was left up: `fleetctl down {cluster}` stops it)"
