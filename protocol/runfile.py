"""The run file: the runs `fleetctl runs submit FILE` sends, in TOML or JSON, and its strict
parser. Pure: reading the file is the caller's part.

A run file has the seed's FleetRun shape without what fleetd assigns (id, status, times):
`name`, `labels`, `task_specs` and `worker_specs`, each spec with the fields of
protocol.tasks.TaskSpec and WorkerSpec::

    name = "nightly"

    [[task_specs]]
    id = "lint"
    name = "lint the tree"
    instructions = "run make lint"
    scorer = { kind = "exit_code" }

    [[worker_specs]]
    id = "w1"
    name = "local worker"
    host = { kind = "local" }
    command = ["python3", "worker.py"]

Unlike the wire, where unknown fields are ignored, the file refuses an unknown key anywhere (a
typo must not be silently dropped), and checks what the wire types cannot: safe and distinct
ids, scorers (a regex that compiles, a JSON path in protocol.tasks' subset, a path inside the
task's workspace), sane numbers, and a command for every local worker. Host kinds other than
`local` parse, and are refused at dispatch. Each error is an InvalidRequest naming the file
and the key path (`run.toml: task_specs[3].scorer.pattern: ...`), with `key` in its details.
"""

import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec
import msgspec.inspect

from protocol.definitions import check_argv, check_env
from protocol.errors import InvalidRequest
from protocol.names import PATH_SAFE
from protocol.tasks import (
    AlertPolicy,
    FileExistsScorer,
    JsonPathScorer,
    LocalHost,
    PagerDutyChannel,
    Record,
    RegexMatchScorer,
    RetryPolicy,
    Scorer,
    SlackChannel,
    SshHost,
    TaskSpec,
    WebhookChannel,
    WorkerSpec,
    check_json_path,
)

RunFileFormat = Literal["toml", "json"]

PAGERDUTY_SEVERITIES = ("critical", "error", "warning", "info")
"""The severities PagerDuty's Events API v2 takes."""


class RunSpec(Record, frozen=True):
    """A run as submitted: the seed's FleetRun without its id, status and times."""

    name: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    task_specs: list[TaskSpec] = msgspec.field(default_factory=list)
    worker_specs: list[WorkerSpec] = msgspec.field(default_factory=list)


KeyPath = tuple[str | int, ...]


class _Problem(Exception):
    """What is wrong, and at which key, before the file's name is known."""

    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def parse_run_file(text: str, *, source: str, fmt: RunFileFormat, directory: str = "") -> RunSpec:
    """The run the text of a run file defines; `source` names it in errors. `directory`, the
    file's (absolute), is where a task without a `workspace` works, and what a relative one is
    relative to ("" leaves workspaces as written)."""
    document = _document(text, source=source, fmt=fmt)
    try:
        spec = _shaped(document, fmt)
    except _Problem as problem:
        raise _invalid(source, problem, _ids_in_document(document)) from None
    return _in_directory(check_run_spec(spec, source=source, fmt=fmt), directory)


def check_run_spec(spec: RunSpec, *, source: str = "run", fmt: RunFileFormat = "json") -> RunSpec:
    """`spec` if its values are sound (as parse_run_file checks them past their shape; for a
    RunSpec that came over the wire); InvalidRequest naming `source` and the key otherwise."""
    try:
        _check_values(spec, fmt)
    except _Problem as problem:
        ids = {
            "task_specs": [task.id for task in spec.task_specs],
            "worker_specs": [worker.id for worker in spec.worker_specs],
        }
        raise _invalid(source, problem, ids) from None
    return spec


# --- from text to a RunSpec's shape -----------------------------------------------------------


def _document(text: str, *, source: str, fmt: RunFileFormat) -> dict[str, Any]:
    try:
        document = tomllib.loads(text) if fmt == "toml" else msgspec.json.decode(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{source}: not valid TOML: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"{source}: not valid JSON: {exc}") from None
    except UnicodeEncodeError:
        raise InvalidRequest(f"{source}: not valid UTF-8 text (a lone surrogate)") from None
    if not isinstance(document, dict):
        raise InvalidRequest(f"{source}: the top level must be an object, with a name and tasks")
    return document


_RUN_SPEC = msgspec.inspect.type_info(RunSpec)


def _shaped(document: dict[str, Any], fmt: RunFileFormat) -> RunSpec:
    """`document` as a RunSpec: first the keys (an unknown one is the likelier mistake than
    the missing key it was meant to be), then msgspec's types."""
    _unwritable(document, ())
    _stray_keys(document, _RUN_SPEC, (), fmt)
    try:
        return msgspec.convert(document, RunSpec)
    except msgspec.ValidationError as exc:
        raise _reworded(str(exc), fmt) from None


_INT64 = range(-(2**63), 2**64)
"""The integers JSON on the wire carries (msgspec's range)."""


def _unwritable(value: Any, path: KeyPath) -> None:
    """A problem where `value` holds what the wire cannot carry: a lone surrogate (TOML
    takes one in a string), an integer past 64 bits."""
    if isinstance(value, str):
        if not _encodable(value):
            raise _Problem(path, "not valid Unicode text (a lone surrogate)")
    elif isinstance(value, int) and value not in _INT64:
        raise _Problem(path, f"{value} is out of range: integers are 64-bit")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not _encodable(key):
                raise _Problem((*path, key), "a key that is not valid Unicode (a lone surrogate)")
            _unwritable(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _unwritable(item, (*path, index))


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _stray_keys(value: Any, info: msgspec.inspect.Type, path: KeyPath, fmt: RunFileFormat) -> None:
    """A problem at the first key of `value` that its type `info` does not have, at a tagged
    table whose tag names no kind, or at a table's value that is not the string it must be
    (msgspec does not name a table's keys); other wrong shapes are msgspec's to refuse."""
    if isinstance(info, msgspec.inspect.UnionType):
        structs = [t for t in info.types if isinstance(t, msgspec.inspect.StructType)]
        if not (structs and isinstance(value, dict)):
            return
        info = _variant(value, structs, path)
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, dict):
        fields = {field.encode_name: field for field in info.fields}
        for key in value:
            if key not in fields and key != info.tag_field:
                keys = [info.tag_field] if info.tag_field else []
                keys += fields
                raise _Problem((*path, key), f"unknown key: use {', '.join(keys)}")
        for name, field in fields.items():
            if name in value:
                _stray_keys(value[name], field.type, (*path, name), fmt)
    elif isinstance(info, msgspec.inspect.ListType) and isinstance(value, list):
        for index, item in enumerate(value):
            _stray_keys(item, info.item_type, (*path, index), fmt)
    elif isinstance(info, msgspec.inspect.DictType) and isinstance(value, dict):
        for key, item in value.items():
            if isinstance(info.value_type, msgspec.inspect.StrType) and not isinstance(item, str):
                got = _type_words(_JSON_TYPES.get(type(item), type(item).__name__), fmt)
                raise _Problem((*path, key), f"expected a string, got {got}")
            _stray_keys(item, info.value_type, (*path, key), fmt)


def _variant(
    value: dict[str, Any], structs: list[msgspec.inspect.StructType], path: KeyPath
) -> msgspec.inspect.StructType:
    """The struct of a union that `value` is: the one its tag names."""
    if len(structs) == 1 and structs[0].tag_field is None:
        return structs[0]
    tag_field = structs[0].tag_field
    assert tag_field is not None  # a union of structs is tagged
    kinds = [str(struct.tag) for struct in structs]
    if tag_field not in value:
        raise _Problem(path, f"missing required key {tag_field!r}: use one of {', '.join(kinds)}")
    chosen = next((s for s in structs if s.tag == value[tag_field]), None)
    if chosen is None:
        raise _Problem(
            (*path, tag_field),
            f"unknown {tag_field} {str(value[tag_field])[:80]!r}: use one of {', '.join(kinds)}",
        )
    return chosen


_MSGSPEC_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_STEP = re.compile(r"\.(?P<key>[^.\[]+)|\[(?P<index>\d+)\]|\[\.\.\.\]")
_TYPE_MISMATCH = re.compile(r"Expected `(?P<expected>[^`]*)`, got `(?P<got>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]*)`")
_JSON_TYPES = {bool: "bool", int: "int", float: "float", list: "array", dict: "object"}
"""The names msgspec gives the types of values in a decoded document."""
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "array": "an array",
    "object": "a table",
    "null": "null",
}


def _reworded(message: str, fmt: RunFileFormat) -> _Problem:
    """msgspec's ValidationError said as a run file's author reads it."""
    match = _MSGSPEC_ERROR.fullmatch(message)
    assert match is not None  # the pattern matches any text
    path: KeyPath = tuple(
        int(step["index"]) if step["index"] else step["key"] or "[...]"
        for step in _STEP.finditer(match["path"] or "")
    )
    what = match["what"]
    if missing := _MISSING.fullmatch(what):
        return _Problem(path, f"missing required key {missing['field']!r}")
    if mismatch := _TYPE_MISMATCH.fullmatch(what):
        expected = _type_words(mismatch["expected"], fmt)
        return _Problem(path, f"expected {expected}, got {_type_words(mismatch['got'], fmt)}")
    return _Problem(path, what.replace("`", ""))


def _type_words(types: str, fmt: RunFileFormat) -> str:
    """`int | float | null` as "a number" (TOML has no null to write), `str` as "a string"."""
    words: list[str] = []
    for name in types.split(" | "):
        word = _TYPE_WORDS.get(name, name)
        if name == "int" and "float" in types:
            word = "a number"
        if name == "object" and fmt == "json":
            word = "an object"
        if word not in words and not (name == "null" and fmt == "toml"):
            words.append(word)
    return " or ".join(words)


# --- the values -------------------------------------------------------------------------------


def _check_values(spec: RunSpec, fmt: RunFileFormat) -> None:
    if not spec.task_specs:
        table = "a [[task_specs]] table" if fmt == "toml" else "an entry to task_specs"
        raise _Problem(("task_specs",), f"no tasks: add {table}")
    _check_ids("task", [task.id for task in spec.task_specs], "task_specs")
    _check_ids("worker", [worker.id for worker in spec.worker_specs], "worker_specs")
    for index, task in enumerate(spec.task_specs):
        _check_task(task, ("task_specs", index))
    for index, worker in enumerate(spec.worker_specs):
        _check_worker(worker, ("worker_specs", index))


def _check_ids(what: str, ids: list[str], section: str) -> None:
    """Ids are member-name safe (PATH_SAFE), as workers are members and ids name files."""
    first: dict[str, int] = {}
    for index, id_ in enumerate(ids):
        if not PATH_SAFE.pattern.fullmatch(id_):
            raise _Problem(
                (section, index, "id"), f"invalid {what} id {id_[:80]!r}: use {PATH_SAFE.described}"
            )
        if id_ in first:
            raise _Problem(
                (section, index, "id"),
                f"duplicate {what} id {id_!r} ({section}[{first[id_]}] has it): "
                f"{what} ids must differ within a run",
            )
        first[id_] = index


def _check_task(task: TaskSpec, path: KeyPath) -> None:
    if task.timeout_seconds is not None:
        _check_number(task.timeout_seconds, (*path, "timeout_seconds"), positive=True)
    if task.workspace is not None:
        _checked((*path, "workspace"), lambda: _check_path_text(task.workspace))
    if task.scorer is not None:
        _check_scorer(task.scorer, (*path, "scorer"))
    if task.retry_policy is not None:
        _check_retry(task.retry_policy, (*path, "retry_policy"))
    if task.alert_policy is not None:
        _check_alerts(task.alert_policy, (*path, "alert_policy"))


def _check_scorer(scorer: Scorer, path: KeyPath) -> None:
    if isinstance(scorer, FileExistsScorer | RegexMatchScorer | JsonPathScorer):
        _check_inside_workspace(scorer.path, (*path, "path"))
    if isinstance(scorer, RegexMatchScorer):
        _checked((*path, "pattern"), lambda: _check_regex(scorer.pattern))
    if isinstance(scorer, JsonPathScorer):
        _checked((*path, "expression"), lambda: check_json_path(scorer.expression))


def _check_inside_workspace(scorer_path: str, path: KeyPath) -> None:
    _checked(path, lambda: _check_path_text(scorer_path))
    if scorer_path.startswith("/"):
        raise _Problem(
            path, f"{scorer_path!r} is absolute: give a path relative to the task's workspace"
        )
    if ".." in scorer_path.split("/"):
        raise _Problem(path, f"{scorer_path!r} leaves the task's workspace: '..' is refused")


def _check_path_text(text: str | None) -> None:
    if not text:
        raise InvalidRequest("must be a non-empty path")
    if "\0" in text:
        raise InvalidRequest("must not contain a NUL byte")


def _check_regex(pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidRequest(f"invalid regular expression {pattern[:80]!r}: {exc}") from None
    except (OverflowError, RecursionError) as exc:  # a{4294967296}; groups nested too deep
        raise InvalidRequest(f"regular expression too large: {exc}") from None


def _check_retry(policy: RetryPolicy, path: KeyPath) -> None:
    if policy.max_attempts < 1:
        raise _Problem((*path, "max_attempts"), "must be at least 1 (the first attempt)")
    _check_number(policy.initial_backoff_seconds, (*path, "initial_backoff_seconds"))
    _check_number(policy.max_backoff_seconds, (*path, "max_backoff_seconds"))
    _check_number(policy.backoff_multiplier, (*path, "backoff_multiplier"))
    if policy.backoff_multiplier < 1:
        raise _Problem((*path, "backoff_multiplier"), "must be at least 1 (backoff never shrinks)")


def _check_alerts(policy: AlertPolicy, path: KeyPath) -> None:
    if policy.after_attempts is not None and policy.after_attempts < 1:
        raise _Problem((*path, "after_attempts"), "must be at least 1")
    if policy.after_minutes_stale is not None:
        _check_number(policy.after_minutes_stale, (*path, "after_minutes_stale"))
    for index, channel in enumerate(policy.channels):
        where = (*path, "channels", index)
        if isinstance(channel, SlackChannel):
            _check_url(channel.webhook_url, (*where, "webhook_url"))
        elif isinstance(channel, WebhookChannel):
            _check_url(channel.url, (*where, "url"))
        elif isinstance(channel, PagerDutyChannel) and channel.severity not in PAGERDUTY_SEVERITIES:
            raise _Problem(
                (*where, "severity"),
                f"unknown severity {channel.severity!r}: use {', '.join(PAGERDUTY_SEVERITIES)}",
            )


def _check_url(url: str, path: KeyPath) -> None:
    if not url.startswith(("http://", "https://")) or "\0" in url:
        raise _Problem(path, f"{url[:80]!r} is not an http:// or https:// URL")


def _check_worker(worker: WorkerSpec, path: KeyPath) -> None:
    if worker.max_concurrent_tasks is not None and worker.max_concurrent_tasks < 1:
        raise _Problem((*path, "max_concurrent_tasks"), "must be at least 1")
    _check_number(worker.lease_seconds, (*path, "lease_seconds"), positive=True)
    if isinstance(worker.host, LocalHost) and not worker.command:
        raise _Problem(
            (*path, "command"),
            'a local worker needs a command: its argv, as ["python3", "worker.py"]',
        )
    if worker.command:
        _checked((*path, "command"), lambda: check_argv(worker.command, "command"))
    _checked((*path, "env"), lambda: check_env(worker.env))
    port = worker.host.port if isinstance(worker.host, SshHost) else None
    if port is not None and not 0 < port < 65536:
        raise _Problem((*path, "host", "port"), "must be a port number, 1 to 65535")


def _check_number(value: float, path: KeyPath, *, positive: bool = False) -> None:
    if not math.isfinite(value):
        raise _Problem(path, f"must be a finite number, not {value}")
    if positive and value <= 0:
        raise _Problem(path, f"must be positive, not {value}")
    if value < 0:
        raise _Problem(path, f"must not be negative, not {value}")


def _checked(path: KeyPath, check: Callable[[], object]) -> None:
    """`check`'s InvalidRequest as a problem at `path`."""
    try:
        check()
    except InvalidRequest as exc:
        raise _Problem(path, exc.message) from None


# --- errors and workspaces --------------------------------------------------------------------


def _ids_in_document(document: dict[str, Any]) -> dict[str, list[Any]]:
    """Each section's ids as written, where they are strings, to name a spec in an error."""
    found: dict[str, list[Any]] = {}
    for section in ("task_specs", "worker_specs"):
        entries = document.get(section)
        if isinstance(entries, list):
            found[section] = [
                entry.get("id") if isinstance(entry, dict) else None for entry in entries
            ]
    return found


def _invalid(source: str, problem: _Problem, ids: dict[str, list[Any]]) -> InvalidRequest:
    key = render_path(problem.path)
    message = f"{source}: {key or '(top level)'}: {problem.message}"
    if len(problem.path) >= 2 and problem.path[-1] != "id":
        section, index = problem.path[:2]
        entries = ids.get(str(section), [])
        if isinstance(index, int) and index < len(entries) and isinstance(entries[index], str):
            owner = "task" if section == "task_specs" else "worker"
            message += f" (in {owner} {_safe(entries[index])[:80]!r})"
    return InvalidRequest(message, key=key)


def render_path(path: Iterable[str | int]) -> str:
    """A key path as `task_specs[3].scorer.pattern` (a key that is not a plain word quoted:
    `labels['a b']`)."""
    rendered = ""
    for step in path:
        if isinstance(step, int):
            rendered += f"[{step}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*|\[\.\.\.\]", step):
            rendered += f".{step}" if rendered and not step.startswith("[") else step
        else:
            rendered += f"[{_safe(step)!r}]"
    return rendered


def _safe(text: str) -> str:
    """`text` fit for a message on the wire, a lone surrogate escaped."""
    return text.encode(errors="backslashreplace").decode()


def _in_directory(spec: RunSpec, directory: str) -> RunSpec:
    """`spec` with each task's workspace resolved against `directory`: a task without one
    works there, a relative one is under it (os.path.join only joins: no I/O)."""
    if not directory:
        return spec
    tasks = [
        msgspec.structs.replace(
            task,
            workspace=directory
            if task.workspace is None
            else os.path.join(directory, task.workspace),
        )
        for task in spec.task_specs
    ]
    return msgspec.structs.replace(spec, task_specs=tasks)
