"""The base wire structs, apart so that definitions and statuses can build on them and
protocol.messages can still gather every op (see protocol.messages for the evolution rules)."""

from typing import ClassVar

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Project-wide struct options."""


class Request(Message, tag_field="op", frozen=True):
    """Every request carries an `id` that its response echoes."""

    id: int
    result_type: ClassVar[type[Message]]


class Empty(Message, frozen=True):
    """The result of an op that has nothing to say but that it succeeded."""
