"""Outcomes and their stable exit codes: the contract scripts rely on."""

from enum import StrEnum


class Outcome(StrEnum):
    ACQUIRED = "acquired"
    ALREADY_ACQUIRED = "already_acquired"
    RENEWED = "renewed"
    RELEASED = "released"
    ALREADY_RELEASED = "already_released"
    CONNECTED = "connected"
    OK = "ok"
    ERROR = "error"
    USAGE = "usage"
    NOT_OWNED = "not_owned"
    NOT_ENABLED = "not_enabled"
    ABSENT = "absent"
    CONTESTED = "contested"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    INCOMPATIBLE = "incompatible"

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self]


EXIT_CODES: dict[Outcome, int] = {
    Outcome.ACQUIRED: 0,
    Outcome.ALREADY_ACQUIRED: 0,
    Outcome.RENEWED: 0,
    Outcome.RELEASED: 0,
    Outcome.ALREADY_RELEASED: 0,
    Outcome.CONNECTED: 0,
    Outcome.OK: 0,
    Outcome.ERROR: 1,
    Outcome.USAGE: 2,
    Outcome.NOT_OWNED: 10,
    Outcome.NOT_ENABLED: 10,
    Outcome.ABSENT: 11,
    Outcome.CONTESTED: 12,
    Outcome.TIMEOUT: 13,
    Outcome.UNAVAILABLE: 14,
    Outcome.INCOMPATIBLE: 15,
}
