"""The wire contract shared by fleetd and fleetctl: pure data and framing, no I/O policy.

Submodules:
    framing   -- newline-delimited frames, size limit enforced before decoding
    messages  -- request/response structs (frozen msgspec tagged unions on ``op``)
    outcomes  -- the outcome enum and its stable exit codes
    errors    -- one exception tree, a code per class, mapped to outcomes
    paths     -- where the control socket and state directory live

This module itself imports nothing heavy, so a fast command path can read the constants
without paying for msgspec.
"""

RELEASE = "0.1.0"
"""The fleet release: fleetd and fleetctl ship together from one distribution."""

PROTOCOL_VERSION = 1
"""Bumped only for an incompatible change; additive fields never bump it."""

MAX_FRAME = 1 << 20
"""Largest frame (without its newline) either side accepts, in bytes."""
