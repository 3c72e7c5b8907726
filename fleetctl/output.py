"""How fleetctl reports: human lines on a terminal, one JSON envelope with --json.

Every --json run prints exactly one envelope ``{"outcome": ...}`` on stdout and exits with the
outcome's code; errors carry ``"error": {"code", "message"}``. Nothing else goes to stdout.
"""

import sys
from typing import Any

import msgspec

from fleetctl import _stdout
from fleetctl._stdout import printable as printable  # noqa: PLC0414 (re-exported)
from protocol.errors import FleetError
from protocol.outcomes import Outcome


def envelope(outcome: Outcome, **fields: Any) -> bytes:
    return msgspec.json.encode({"outcome": outcome.value, **fields})


def emit(json_mode: bool, human: str, outcome: Outcome = Outcome.OK, **fields: Any) -> int:
    written = _stdout.write(envelope(outcome, **fields) if json_mode else human)
    return outcome.exit_code if written else Outcome.ERROR.exit_code


def fail(json_mode: bool, error: FleetError) -> int:
    message = printable(error.message)
    if json_mode:
        _stdout.write(envelope(error.outcome, error={"code": error.code, "message": message}))
    else:
        sys.stderr.write(f"fleetctl: {message}\n")
    return error.outcome.exit_code


def usage(json_mode: bool, message: str) -> int:
    if json_mode:
        _stdout.write(
            envelope(Outcome.USAGE, error={"code": "usage", "message": printable(message)})
        )
    return Outcome.USAGE.exit_code
