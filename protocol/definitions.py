"""Member and cluster definitions: what to run, pure data, and the strict `fleet.toml` parser.

`MemberSpec` and `ClusterSpec` travel on the wire (addmember) and to a holder, so they follow
the wire rules (unknown fields ignored, new fields get defaults) and validate their values on
construction and on decode, raising InvalidRequest that names the bad value.

The TOML parser is strict instead: a misspelt key is an error, reported with the key and its
line in the file, because a typo in a config file must never be silently ignored.
"""

import functools
import re
import signal
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from protocol.base import Message
from protocol.durations import parse_duration
from protocol.errors import InvalidRequest
from protocol.names import check_name

T = TypeVar("T")

RESTART_POLICIES = ("no", "on-failure", "always")
READY_KINDS = ("tcp", "notify", "none", "unix:PATH", "log:REGEX")

DEFAULT_STOP_TIMEOUT = 5.0
DEFAULT_START_TIMEOUT = 10.0

_ECHO_LIMIT = 100
"""Characters of a bad value echoed in an error message."""

RLIMITS = (
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
    "nproc", "rtprio", "rttime", "sigpending", "stack",
)  # fmt: skip
"""The resource limits a member may set (setrlimit(2)'s RLIMIT_*, lower case; not rss, which
Linux ignores)."""
INFINITY = -1
"""An unlimited resource in a MemberSpec's `limits` (as Python's resource.RLIM_INFINITY)."""
_RLIM_MAX = 2**64 - 2
"""The largest finite limit the kernel takes (2**64 - 1 is its infinity)."""


def check_ready(ready: object) -> str:
    """A readiness check: tcp, notify, none, unix:PATH or log:REGEX (the regex must compile)."""
    if ready in ("tcp", "notify", "none"):
        return str(ready)
    if isinstance(ready, str) and ready.startswith("unix:") and len(ready) > len("unix:"):
        check_path(ready[len("unix:") :], "ready unix:PATH")
        return ready
    if isinstance(ready, str) and ready.startswith("log:") and len(ready) > len("log:"):
        try:
            re.compile(ready[len("log:") :])
        except re.error as exc:
            raise InvalidRequest(
                f"invalid ready {ready!r}: bad regular expression: {exc}"
            ) from None
        except (OverflowError, RecursionError) as exc:  # a{4294967296}; groups nested too deep
            raise InvalidRequest(
                f"invalid ready {ready[:_ECHO_LIMIT]!r}: regular expression too large: {exc}"
            ) from None
        return ready
    raise InvalidRequest(f"invalid ready {ready!r}: use one of {', '.join(READY_KINDS)}")


def check_restart(restart: object) -> str:
    if restart not in RESTART_POLICIES:
        raise InvalidRequest(
            f"invalid restart {restart!r}: use one of {', '.join(RESTART_POLICIES)}"
        )
    return str(restart)


def check_signal(name: object) -> str:
    """A signal name without its SIG prefix ("TERM", "INT", "USR1"...). Only signals: the
    signal module also has SIG_DFL, SIG_IGN, SIG_BLOCK... (not signals, but 0, 1 or 2)."""
    if not isinstance(name, str) or f"SIG{name}" not in signal.Signals.__members__:
        raise InvalidRequest(f"invalid stop_signal {name!r}: use a name such as TERM, INT, QUIT")
    return name


def check_argv(argv: object, key: str) -> list[str]:
    """An argv list (a command is never a shell string: write ["sh", "-c", ...] for that)."""
    if isinstance(argv, str):
        raise InvalidRequest(f"{key} must be a list of arguments, not a string: {argv!r}")
    if not isinstance(argv, list | tuple) or not argv:
        raise InvalidRequest(f"{key} must be a non-empty list of arguments")
    if not all(isinstance(arg, str) and "\0" not in arg for arg in argv):
        raise InvalidRequest(f"{key} arguments must be strings without NUL bytes")
    if not argv[0]:
        raise InvalidRequest(f"{key}[0], the program, is empty")
    return list(argv)


def check_path(path: object, key: str) -> str:
    """A path the kernel will be given: a non-empty string without NUL bytes."""
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"{key} must be a non-empty path")
    if "\0" in path:
        raise InvalidRequest(f"{key} must not contain a NUL byte: {path[:100]!r}")
    return path


def check_env(env: object) -> dict[str, str]:
    if not isinstance(env, Mapping):
        raise InvalidRequest("env must be a table of names to strings")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise InvalidRequest(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\0" in value:
            raise InvalidRequest(f"environment variable {key} must be a string without NUL")
    return dict(env)


def check_limits(limits: object) -> dict[str, list[int]]:
    """`limits` as a MemberSpec holds them: each name of RLIMITS to [soft, hard], INFINITY for
    "infinity". A definition may give one value for both, or [soft, hard]; each an integer
    from 0, or "infinity"."""
    if not isinstance(limits, Mapping):
        raise InvalidRequest("limits must be a table of resource names to limits")
    checked = {}
    for name, value in limits.items():
        if name not in RLIMITS:
            raise InvalidRequest(f"unknown limit {name!r}: use one of {', '.join(RLIMITS)}")
        pair = list(value) if isinstance(value, list | tuple) else [value, value]
        if len(pair) != 2:
            raise InvalidRequest(f"limit {name} must be a value or [soft, hard]")
        soft, hard = (_limit_value(name, v) for v in pair)
        if _ceiling(soft) > _ceiling(hard):
            raise InvalidRequest(f"limit {name}: soft {pair[0]} is above hard {pair[1]}")
        checked[name] = [soft, hard]
    return checked


def _limit_value(name: str, value: object) -> int:
    if value == "infinity":
        return INFINITY
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f'limit {name} must be an integer or "infinity", not {value!r}')
    if value < 0:
        raise InvalidRequest(f"limit {name} must not be negative: {value}")
    if value > _RLIM_MAX:
        raise InvalidRequest(f"limit {name} must be at most {_RLIM_MAX}: {value}")
    return value


def _as_written(limits: object) -> object:
    """A MemberSpec's `limits` as a definition writes them (INFINITY as "infinity")."""
    if not isinstance(limits, Mapping):
        return limits
    return {
        name: [v if v != INFINITY else "infinity" for v in pair]
        if isinstance(pair, list | tuple)
        else pair
        for name, pair in limits.items()
    }


def _ceiling(limit: int) -> int:
    return _RLIM_MAX + 1 if limit == INFINITY else limit


def check_account(name: object, key: str) -> str:
    """A user or group: a name, or a number (given as an integer or in decimal)."""
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name < 2**32 - 1:
            raise InvalidRequest(f"{key} {name} is not a valid id")
        return str(name)
    if not isinstance(name, str) or not name or "\0" in name or ":" in name:
        raise InvalidRequest(f"{key} must be a name or a number")
    return name


class MemberSpec(Message, frozen=True):
    """One member: an argv to run and how to supervise it. Durations are in seconds.

    `command`, `env` and `cwd` may use the placeholders {port} (a free loopback port the holder
    allocates), {name} and {dir} (the member's own directory).
    """

    name: str
    command: list[str]
    ready: str = "none"
    restart: str = "no"
    env: dict[str, str] = msgspec.field(default_factory=dict)
    cwd: str | None = None
    stop_signal: str = "TERM"
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    start_timeout: float = DEFAULT_START_TIMEOUT
    prepare: list[str] | None = None
    env_file: str | None = None
    """KEY=VALUE lines the holder reads at every start, under `env` (see parse_env_file)."""
    limits: dict[str, list[int]] = msgspec.field(default_factory=dict)
    """Resource limits, as check_limits returns them."""
    user: str | None = None
    """Who it runs as (a name, or a uid in decimal); the holder's user when None."""
    group: str | None = None
    """Its group (a name, or a gid in decimal); the user's own when None."""

    def __post_init__(self) -> None:
        check_name(self.name)
        check_argv(self.command, "command")
        check_ready(self.ready)
        if self.cwd is not None:
            check_path(self.cwd, "cwd")
        if self.env_file is not None:
            check_path(self.env_file, "env_file")
        check_restart(self.restart)
        check_env(self.env)
        check_signal(self.stop_signal)
        parse_duration(self.stop_timeout)
        parse_duration(self.start_timeout)
        if self.prepare is not None:
            check_argv(self.prepare, "prepare")
        check_limits(_as_written(self.limits))
        if self.user is not None:
            check_account(self.user, "user")
        if self.group is not None:
            check_account(self.group, "group")


class ClusterSpec(Message, frozen=True):
    """A named group of members served by one holder."""

    name: str
    members: list[MemberSpec]

    def __post_init__(self) -> None:
        check_name(self.name, "cluster")
        if not self.members:
            raise InvalidRequest(f"cluster {self.name!r} has no members")
        seen: set[str] = set()
        for member in self.members:
            if member.name in seen:
                raise InvalidRequest(f"duplicate member name {member.name!r}", name=member.name)
            seen.add(member.name)

    def member(self, name: str) -> MemberSpec | None:
        return next((m for m in self.members if m.name == name), None)


# --- the strict file format ----------------------------------------------------------------


class _MemberTable(msgspec.Struct, forbid_unknown_fields=True):
    """One `[members.NAME]` table as written; values are checked after the shape."""

    command: list[str]
    ready: str = "none"
    restart: str = "no"
    env: dict[str, str] = {}
    cwd: str | None = None
    stop_signal: str = "TERM"
    stop_timeout: str | float = DEFAULT_STOP_TIMEOUT
    start_timeout: str | float = DEFAULT_START_TIMEOUT
    prepare: list[str] | None = None
    env_file: str | None = None
    limits: dict[str, Any] = {}
    user: str | int | None = None
    group: str | int | None = None


class _ClusterTable(msgspec.Struct, forbid_unknown_fields=True):
    name: str | None = None
    members: dict[str, dict[str, Any]] = {}


class _KeyProblem(Exception):
    """A bad value under `keys`, before the line it is on is known."""

    def __init__(self, keys: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.keys = keys
        self.message = message


def parse_toml(
    text: str, *, source: str = "fleet.toml", name: str | None = None, directory: str = ""
) -> ClusterSpec:
    """The cluster the text of a `fleet.toml` defines; `source` names it in errors, `name`
    overrides its top-level `name`. `directory`, the file's (absolute), is where members run
    unless their `cwd` says otherwise, and what a relative `cwd` is relative to. Reading a
    file is the caller's (fleetctl.definitions)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{source}: {exc}") from None
    spec = _from_document(document, text=text, source=source, name=name)
    return in_directory(spec, directory)


def cluster_from_dict(
    document: Mapping[str, Any], *, name: str | None = None, source: str = "definitions"
) -> ClusterSpec:
    """The cluster a dict shaped like the TOML file defines (as the library accepts)."""
    return _from_document(document, text=None, source=source, name=name)


def in_directory(spec: ClusterSpec, directory: str) -> ClusterSpec:
    """`spec` with each member's `cwd` and `env_file` resolved against `directory` (absolute,
    or "" to leave them as they are): a member without a `cwd` runs there; an absolute path,
    or one starting with a placeholder ({dir}), stays."""
    if not directory:
        return spec
    members = [
        msgspec.structs.replace(
            member,
            cwd=_resolved(member.cwd, directory),
            env_file=None if member.env_file is None else _resolved(member.env_file, directory),
        )
        for member in spec.members
    ]
    return msgspec.structs.replace(spec, members=members)


def _resolved(cwd: str | None, directory: str) -> str:
    if cwd is None:
        return directory
    if cwd.startswith(("/", "{")):
        return cwd
    return f"{directory.rstrip('/')}/{cwd}"


def member_from_dict(name: str, table: Mapping[str, Any]) -> MemberSpec:
    """The member a dict shaped like a `[members.NAME]` table defines."""
    try:
        return _build_member(name, table)
    except _KeyProblem as problem:
        raise InvalidRequest(f"{'.'.join(problem.keys)}: {problem.message}") from None


def _from_document(
    document: Mapping[str, Any], *, text: str | None, source: str, name: str | None
) -> ClusterSpec:
    try:
        spec = _build_cluster(document, name)
    except _KeyProblem as problem:
        line = _line_of(text, problem.keys) if text is not None else None
        where = f"{source}:{line}" if line else source
        raise InvalidRequest(
            f"{where}: {'.'.join(problem.keys) or '(top level)'}: {problem.message}",
            key=".".join(problem.keys),
            line=line,
        ) from None
    return spec


def _build_cluster(document: Mapping[str, Any], name: str | None) -> ClusterSpec:
    unencodable = _unencodable(document, ())
    if unencodable is not None:
        raise _KeyProblem(unencodable, "not valid Unicode text (a lone surrogate)")
    table = _shaped(document, _ClusterTable, ())
    cluster_name = name or table.name or "default"
    _checked(("name",), lambda: check_name(cluster_name, "cluster"))
    if not table.members:
        raise _KeyProblem(("members",), "no members defined: add a [members.NAME] table")
    members = [_build_member(key, value) for key, value in table.members.items()]
    return ClusterSpec(name=cluster_name, members=members)


def _build_member(key: str, document: Mapping[str, Any]) -> MemberSpec:
    where = ("members", key)
    _checked(where, lambda: check_name(key))
    table = _shaped(document, _MemberTable, where)

    def checked(field: str, check: Callable[[Any], T], value: Any) -> T:
        return _checked((*where, field), lambda: check(value))

    return MemberSpec(
        name=key,
        command=checked("command", lambda v: check_argv(v, "command"), table.command),
        ready=checked("ready", check_ready, table.ready),
        restart=checked("restart", check_restart, table.restart),
        env=checked("env", check_env, table.env),
        cwd=None
        if table.cwd is None
        else checked("cwd", lambda v: check_path(v, "cwd"), table.cwd),
        stop_signal=checked("stop_signal", check_signal, table.stop_signal),
        stop_timeout=checked("stop_timeout", parse_duration, table.stop_timeout),
        start_timeout=checked("start_timeout", parse_duration, table.start_timeout),
        prepare=None
        if table.prepare is None
        else checked("prepare", lambda v: check_argv(v, "prepare"), table.prepare),
        env_file=None
        if table.env_file is None
        else checked("env_file", lambda v: check_path(v, "env_file"), table.env_file),
        limits=_checked_limits(where, table.limits),
        user=None
        if table.user is None
        else checked("user", lambda v: check_account(v, "user"), table.user),
        group=None
        if table.group is None
        else checked("group", lambda v: check_account(v, "group"), table.group),
    )


def _checked_limits(where: tuple[str, ...], limits: dict[str, Any]) -> dict[str, list[int]]:
    """Each limit checked under its own key, so that an error names its line."""
    checked: dict[str, list[int]] = {}
    for name, value in limits.items():
        checked |= _checked(
            (*where, "limits", name), functools.partial(check_limits, {name: value})
        )
    return checked


def _unencodable(value: Any, keys: tuple[str, ...]) -> tuple[str, ...] | None:
    """Where a string in `value` (a key or a value) cannot be encoded, as a lone surrogate
    cannot: neither JSON on the wire nor a file could carry it. None when all can."""
    if isinstance(value, str):
        return None if _encodable(value) else keys
    items: Iterable[tuple[object, Any]] = ()
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    for key, item in items:
        here = (*keys, str(key).encode(errors="backslashreplace").decode())
        if isinstance(key, str) and not _encodable(key):
            return here
        found = _unencodable(item, here)
        if found is not None:
            return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _checked(keys: tuple[str, ...], check: Callable[[], T]) -> T:
    try:
        return check()
    except InvalidRequest as exc:
        raise _KeyProblem(keys, exc.message) from None


_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<field>[^`]*)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<field>[^`]*)`")


def _shaped(document: Any, table: type[T], where: tuple[str, ...]) -> T:
    """`document` converted to `table`, or the problem at the key msgspec complains about."""
    if not isinstance(document, Mapping):
        raise _KeyProblem(where, "must be a table")
    try:
        return msgspec.convert(document, table)
    except msgspec.ValidationError as exc:
        raise _problem_at(str(exc), where) from None


def _problem_at(message: str, where: tuple[str, ...]) -> _KeyProblem:
    match = _MSGSPEC_PATH.match(message)
    assert match is not None  # the pattern matches any string
    what, path = match["what"], match["path"] or ""
    keys = (*where, *(k for k in re.split(r"\.|\[[^\]]*\]", path) if k))
    if unknown := _UNKNOWN_FIELD.match(what):
        return _KeyProblem((*keys, unknown["field"]), "unknown key")
    if missing := _MISSING_FIELD.match(what):
        return _KeyProblem(keys, f"missing required key {missing['field']!r}")
    return _KeyProblem(keys, what.replace("`", "").replace("Expected", "expected"))


# --- finding the line of a key (tomllib keeps no positions) ----------------------------------

_KEY_TOKEN = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*""")


def _split_key(text: str) -> tuple[tuple[str, ...], str] | None:
    """The dotted key at the start of `text` and what follows it, or None."""
    keys: list[str] = []
    rest = text
    while True:
        token = _KEY_TOKEN.match(rest)
        if token is None:
            return None
        keys.append(next(group for group in token.groups() if group is not None))
        rest = rest[token.end() :]
        if not rest.startswith("."):
            return tuple(keys), rest
        rest = rest[1:]


def _line_of(text: str | None, keys: tuple[str, ...]) -> int | None:
    """The 1-based line where `keys` is written: the line of the key itself, else of the
    closest enclosing table, else where a table under `keys` first appears."""
    if text is None:
        return None
    best: tuple[int, int] | None = None  # (matched depth, line)
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        full = _header_keys(stripped) if stripped.startswith("[") else None
        if full is not None:
            table = full
        else:
            split = _split_key(stripped)
            if split is None or not split[1].startswith("="):
                continue
            full = (*table, *split[0])
        depth = _common_prefix(full, keys)
        if depth == min(len(full), len(keys)) and (best is None or depth > best[0]):
            best = (depth, number)
    return best[1] if best else None


def _header_keys(line: str) -> tuple[str, ...] | None:
    inner = line.strip("[]")
    split = _split_key(inner)
    return split[0] if split is not None else None


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    depth = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        depth += 1
    return depth


def parse_env_file(text: str) -> dict[str, str]:
    """An env_file's variables: `KEY=VALUE` lines (`export KEY=VALUE` too), blank lines and
    `#` comments skipped, a value's matching outer quotes removed, nothing else interpreted
    (no expansion, no escapes: as docker compose reads one). ValueError names the first line
    that is none of those."""
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not equals or not key or any(c.isspace() for c in key):
            raise ValueError(f"line {number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        found[key] = value
    return found
