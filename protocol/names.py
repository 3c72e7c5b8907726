"""The names people give things, checked in one place. There are two rules, on purpose:

Member and cluster names become directory and socket file names (and a unix socket path has
only 107 bytes), and travel inside environment values (``FLEET_PEERS`` is
``name=address,...``): short, lowercase and plain, 1 to 63 of ``a-z 0-9 . _ -``.

Lease names are store keys (``leases/NAME``) that ``lease list`` and ``lease_watch`` select by
prefix, never paths: they may be hierarchical and carry an owner's spelling (``build/main``,
``deploy:prod@eu``), 1 to 128 of ``A-Z a-z 0-9 . _ : @ / -``. A claim of kind ``lease`` is
keyed by its lease's name, so claims check it with the lease rule.

Both start with a letter or digit, so no name is ``.``, ``..``, hidden, or read as an option.
"""

import re
from dataclasses import dataclass
from typing import Literal

from protocol.errors import InvalidRequest

NameKind = Literal["member", "cluster", "lease"]


@dataclass(frozen=True)
class NameRule:
    pattern: re.Pattern[str]
    described: str


PATH_SAFE = NameRule(
    re.compile(r"[a-z0-9][a-z0-9._-]{0,62}"),
    "1 to 63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
)
"""Member and cluster names."""

STORE_KEY = NameRule(
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}"),
    "1 to 128 characters from A-Z a-z 0-9 and . _ : @ / -, starting with a letter or digit",
)
"""Lease names."""

_RULES: dict[NameKind, NameRule] = {"member": PATH_SAFE, "cluster": PATH_SAFE, "lease": STORE_KEY}

_ECHO_LIMIT = 80
"""Characters of a bad name echoed in an error message."""


def check_name(name: object, what: NameKind = "member") -> str:
    """`name` if it is a valid name of a `what`; InvalidRequest naming it otherwise."""
    rule = _RULES[what]
    if isinstance(name, str) and rule.pattern.fullmatch(name):
        return name
    shown = name[:_ECHO_LIMIT] if isinstance(name, str) else name
    raise InvalidRequest(f"invalid {what} name {shown!r}: use {rule.described}", name=str(shown))
