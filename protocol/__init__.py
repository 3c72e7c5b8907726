"""The wire contract shared by fleetd, its holders and fleetctl: pure data, rules and framing.
It imports only msgspec and the standard library, and does no I/O (tests/test_layering.py,
tests/test_protocol_is_pure.py): reading files and sockets is the programs' part.

Submodules:
    framing      newline-delimited frames, the size limit enforced before decoding
    base         the base structs every message and definition builds on
    messages     control-socket requests and responses (tagged unions on ``op``)
    members      the member-socket ops a holder answers (status, stop, addmember, bind, ack)
    template     what a warm holder template is asked (fork) and answers
    clusters     control-socket ops for detached clusters and their members under fleetd
    leases       lease records and their checks (owner, TTL); the ops are in messages
    claims       the claims journal's ops, kinds and checks
    definitions  MemberSpec, ClusterSpec and the strict fleet.toml parser
    tasks        task runs as data (the seed's shapes): specs, inbox, events, receipts
    runfile      RunSpec and the strict run file parser (TOML or JSON)
    status       a member's states and status
    outcomes     the outcome enum and its stable exit codes
    errors       one exception tree, a code per class, mapped to outcomes
    names        member, cluster and lease names: the two rules, one check
    durations    the one duration grammar (15, 1.5, 500ms, 1m30s)
    paths        where the control socket and state directory live

This module itself imports nothing heavy, so a fast command path can read the constants
without paying for msgspec.
"""

RELEASE = "0.1.0"
"""The fleet release: fleetd and fleetctl ship together from one distribution."""

PROTOCOL_VERSION = 1
"""Bumped only for an incompatible change; additive fields never bump it."""

MAX_FRAME = 1 << 20
"""Largest frame (without its newline) either side accepts, in bytes."""

MAX_CLAIM_CONTENT = 512 * 1024
"""Bytes: the most a claim may deliver (protocol.claims.MAX_CONTENT), here for fleetctl's fast
path, which refuses more before it sends anything. Base64 on the wire must fit a frame."""

MAX_TASK_PAGE = 5000
"""Tasks one task_list answer holds at most (protocol.runs.TaskListRequest's `limit`), here
for fleetctl's fast path, which pages through them with the largest. fleetd ends a page
sooner when its views would not fit a frame."""
