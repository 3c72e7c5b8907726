"""Wire messages: frozen msgspec structs, requests a tagged union on ``op``.

Evolution rules: new fields get defaults; a field's type never changes; an op name is never
reused. Unknown fields are ignored, so an older peer can read a newer peer's frames.
"""

from typing import Any, ClassVar

import msgspec


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Project-wide struct options."""


class Request(Message, tag_field="op", frozen=True):
    """Every request carries an `id` that its response echoes."""

    id: int
    result_type: ClassVar[type[Message]]


class Empty(Message, frozen=True):
    """The result of an op that has nothing to say but that it succeeded."""


class HelloResult(Message, frozen=True):
    version: int
    server: str
    pid: int


class VersionResult(Message, frozen=True):
    version: str
    protocol: int


class Hello(Request, tag="hello", frozen=True):
    """Exchanges protocol versions; the daemon refuses a mismatch, and so does the client."""

    version: int
    client: str = ""
    result_type = HelloResult


class Ping(Request, tag="ping", frozen=True):
    result_type = Empty


class Version(Request, tag="version", frozen=True):
    result_type = VersionResult


class Shutdown(Request, tag="shutdown", frozen=True):
    """Asks the daemon to finish in-flight requests and exit 0."""

    result_type = Empty


AnyRequest = Hello | Ping | Version | Shutdown
REQUEST_TYPES: tuple[type[Request], ...] = (Hello, Ping, Version, Shutdown)
OPS: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in REQUEST_TYPES)


class ErrorBody(Message, frozen=True):
    code: str
    message: str
    details: dict[str, Any] = {}


class Response(Message, frozen=True):
    """What the daemon sends: `result` when ok, `error` otherwise. `id` is null only when the
    request was too broken to carry one."""

    id: int | None
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


class RawResponse(Message, frozen=True):
    """What the client decodes: the result stays raw until the caller's type is known."""

    id: int | None
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: ErrorBody | None = None
