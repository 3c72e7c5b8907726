"""Command lines read as click reads them (fleetctl/cli.py), for the commands the fast path
serves, or None: click then reads the line, and prints whatever it has to say about it.

Only the plain spellings are taken: `--option VALUE`, `--option=VALUE`, `-f VALUE`, flags,
and arguments; each option as often as click allows (the last one counts). Anything else (an
option this command does not have, `-h`, `--help`, `--version`, `--`, a bare `-`, `-fVALUE`,
a value click would refuse, an argument that is not UTF-8) is left to click. Each value is
converted by the function click's type calls (`int`, protocol.durations.parse_duration), so
that what is taken means here what it means there: tests/test_fast.py checks it against click
for generated command lines.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing itself costs the fast path 3 ms
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Option = tuple[str, Callable[[str], object] | None]
    """An option's parameter, and how its value converts (None: a flag, taking no value)."""

DEFAULT_TIMEOUT = 10.0
"""Seconds: the default of fleetctl's global --timeout (fleetctl.cli)."""
LEAST_TIMEOUT, MOST_TIMEOUT = 0.001, 365 * 86_400.0
"""The range of fleetctl's global --timeout (fleetctl.cli.MAX_TIMEOUT)."""

_INT64 = (-(1 << 63), (1 << 64) - 1)
"""The integers msgspec encodes: click's path fails otherwise, and says how."""


class NotFast(Exception):
    """A command line for click to read."""


class Command:
    """A command line the fast path serves: the command (`lease acquire`), the global options
    (`socket_path` None for the default) and the command's parameters, as click's context
    would hold them (tuples for arguments taken any number of times)."""

    __slots__ = ("json", "name", "params", "socket_path", "timeout")

    def __init__(
        self,
        name: str,
        params: dict[str, Any],
        *,
        socket_path: str | None = None,
        json: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.name = name
        self.params = params
        self.socket_path = socket_path
        self.json = json
        self.timeout = timeout

    def __repr__(self) -> str:
        return (
            f"Command({self.name!r}, {self.params!r}, socket_path={self.socket_path!r}, "
            f"json={self.json!r}, timeout={self.timeout!r})"
        )


def _text(value: str) -> str:
    return value


def _int(value: str) -> int:
    """As click.INT converts, within what the request can carry."""
    try:
        number = int(value)
    except ValueError:
        raise NotFast from None
    if not _INT64[0] <= number <= _INT64[1]:
        raise NotFast
    return number


def _duration(value: str) -> float:
    """As fleetctl.cli.Duration() converts (never negative, always finite)."""
    from protocol.durations import parse_duration

    try:
        return parse_duration(value)
    except Exception:  # InvalidRequest: its message is click's to print
        raise NotFast from None


def _timeout(value: str) -> float:
    seconds = _duration(value)
    if not LEAST_TIMEOUT <= seconds <= MOST_TIMEOUT:
        raise NotFast
    return seconds


class _Spec:
    """A command's options (each spelling: its parameter and how its value converts, or None
    for a flag),
    its arguments (a parameter taking one, or "*" any number, "+" one or more), which
    options it requires, and its parameters' defaults."""

    __slots__ = ("arguments", "defaults", "options", "required")

    def __init__(
        self,
        options: dict[str, Option],
        *,
        arguments: tuple[str, str] | None = None,
        required: tuple[str, ...] = (),
        defaults: dict[str, Any] | None = None,
    ) -> None:
        self.options = options
        self.arguments = arguments
        self.required = required
        self.defaults = defaults or {}


_GLOBAL: dict[str, Option] = {
    "--socket": ("socket_path", _text),
    "--json": ("json", None),
    "--timeout": ("timeout", _timeout),
}
_OWNER: dict[str, Option] = {"--owner": ("owner", _text)}
_TOKEN: dict[str, Option] = {"--token": ("token", _int)}
_KIND_KEY: dict[str, Option] = {"--kind": ("kind", _text), "--key": ("key", _text)}
_WAIT_TIMEOUT: dict[str, Option] = {"--timeout": ("wait_timeout", _duration)}
_LEASE_CHANGE = _Spec(
    {**_OWNER, **_TOKEN}, arguments=("name", "1"), required=("owner",), defaults={"token": 0}
)
_CLAIM_CHANGE = _Spec({**_KIND_KEY, **_OWNER}, required=("kind", "key", "owner"))

SPECS = {
    "ping": _Spec({}),
    "version": _Spec({}),
    "status": _Spec({}, arguments=("names", "*")),
    "wait": _Spec(_WAIT_TIMEOUT, arguments=("names", "+"), defaults={"wait_timeout": 30.0}),
    "up": _Spec(
        {
            "-f": ("path", _text),
            "--file": ("path", _text),
            "--name": ("name", _text),
            "--wait": ("wait", None),
            **_WAIT_TIMEOUT,
            "--idempotent": ("idempotent", None),
        },
        defaults={
            "path": "fleet.toml",
            "name": None,
            "wait": False,
            "wait_timeout": 30.0,
            "idempotent": False,
        },
    ),
    "lease acquire": _Spec(
        {**_OWNER, "--ttl": ("ttl", _duration), "--pid": ("pid", _int)},
        arguments=("name", "1"),
        required=("owner",),
        defaults={"ttl": 15.0, "pid": None},
    ),
    "lease heartbeat": _LEASE_CHANGE,
    "lease release": _LEASE_CHANGE,
    "lease inspect": _Spec({}, arguments=("name", "1")),
    "claims acquire": _CLAIM_CHANGE,
    "claims release": _CLAIM_CHANGE,
    "claims inspect": _Spec(_KIND_KEY, required=("kind", "key")),
    "runs show": _Spec({}, arguments=("run", "1")),
    "tasks list": _Spec({"--run": ("run", _text)}, defaults={"run": ""}),
}
"""Each command the fast path serves, as fleetctl/cli.py and fleetctl/runs.py declare it."""

_GROUPS = ("lease", "claims", "runs", "tasks")


def parse(argv: list[str]) -> Command | None:
    """The command `argv` asks for, when it is one the fast path serves, spelt plainly."""
    try:
        "".join(argv).encode()
    except UnicodeEncodeError:  # not UTF-8: click's path says what cannot be sent
        return None
    try:
        return _parse(argv)
    except NotFast:
        return None


def _parse(argv: list[str]) -> Command:
    given: dict[str, Any] = {}
    at = 0
    while at < len(argv) and argv[at].startswith("-"):  # a group stops at its command
        at = _option(_GLOBAL, argv, at, given)
    name, at = _command_name(argv, at)
    spec = SPECS[name]
    params = dict(spec.defaults)
    arguments: list[str] = []
    while at < len(argv):
        if argv[at] == "--json":  # after the command too (fleetctl.cli)
            given["json"] = True
            at += 1
        elif argv[at].startswith("-"):
            at = _option(spec.options, argv, at, params)
        else:
            arguments.append(argv[at])
            at += 1
    if any(option not in params for option in spec.required):
        raise NotFast
    _take_arguments(spec, arguments, params)
    return Command(name, params, **given)


def _command_name(argv: list[str], at: int) -> tuple[str, int]:
    if at >= len(argv):
        raise NotFast
    name = argv[at]
    if name in _GROUPS and at + 1 < len(argv):
        name, at = f"{name} {argv[at + 1]}", at + 1
    if name not in SPECS:
        raise NotFast
    return name, at + 1


def _option(
    options: dict[str, Option],
    argv: list[str],
    at: int,
    params: dict[str, Any],
) -> int:
    """Read the option at argv[at] into `params`; the index after it."""
    token = argv[at]
    if token in options:
        parameter, convert = options[token]
        if convert is None:
            params[parameter] = True
            return at + 1
        if at + 1 >= len(argv):
            raise NotFast
        value, after = argv[at + 1], at + 2  # whatever follows, as click takes it
    elif token.startswith("--") and "=" in token:
        spelling, value = token.split("=", 1)
        parameter, convert = options.get(spelling, ("", None))
        if convert is None:  # unknown, or a flag given a value
            raise NotFast
        after = at + 1
    else:
        raise NotFast
    params[parameter] = convert(value)
    return after


def _take_arguments(spec: _Spec, arguments: list[str], params: dict[str, object]) -> None:
    if spec.arguments is None:
        if arguments:
            raise NotFast
        return
    parameter, count = spec.arguments
    if count == "1":
        if len(arguments) != 1:
            raise NotFast
        params[parameter] = arguments[0]
    elif count == "+" and not arguments:
        raise NotFast
    else:
        params[parameter] = tuple(arguments)
