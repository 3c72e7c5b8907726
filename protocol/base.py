"""The base wire structs, apart so that definitions and statuses can build on them and
protocol.messages can still gather every op (see protocol.messages for the evolution rules)."""

from typing import Any, ClassVar, Generic, TypeVar, get_args

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Project-wide struct options."""


R = TypeVar("R", bound=Message)


class Request(Message, tag_field="op", frozen=True):
    """Every request carries an `id` that its response echoes. Ops are declared as Op[Result]."""

    id: int
    result_type: ClassVar[type[Message]]
    """What the answer's `result` decodes to: Op's parameter (set on each op by Op)."""


class Op(Request, Generic[R], frozen=True):
    """A request whose answer carries an R: ``class Ping(Op[Empty], tag="ping")``. The client
    decodes the answer as `result_type` (protocol.connection.result_of), and a type checker
    knows that ``request(Ping)`` returns an Empty."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            (argument, *_) = get_args(base) or (None,)
            if isinstance(argument, type) and issubclass(argument, Message):
                cls.result_type = argument


class Empty(Message, frozen=True):
    """The result of an op that has nothing to say but that it succeeded."""
