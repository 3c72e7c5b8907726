"""Task runs as data: runs, task and worker specs, the inbox, worker events, retry and alert
policies, receipts, and the worker's result line. Pure data and rules, no I/O.

The JSON shapes are the control-plane seed's (shared/seeds/002, Rust serde types): snake_case
tags (`kind` on scorers, hosts and alert channels; `state` on worker events, whose payload is
flattened beside the envelope's fields); an artifact kind is a flat string, and kinds other
than ARTIFACT_KINDS are kept as written; a retry policy's missing fields take the defaults
(3 attempts, 5 s, x2, 300 s cap); absent optional fields are omitted, and decoding takes an
explicit null for them. Numbers the seed keeps as integers (seconds, attempts) are
`int | float` here, so that a whole number written as one is encoded as one. Fields marked
"fleet's extension" are not in the seed. Unknown fields are ignored on decode, as on the rest
of the wire; the run file's parser (protocol.runfile) refuses them instead. Times are
RFC 3339 UTC strings (`timestamp`, `epoch`). Golden files under tests/golden/tasks/ pin every
encoding.

The result line (the dispatch seed's FormatResult/ParseResult) is how a worker reports its
outcome on its output, one line::

    fleet-result: {"kind":"success","summary":"all green","branch":"fix-1","rev":"4f2a9c1"}

RESULT_PREFIX at the start of a line, then the compact JSON of a ResultMessage (kind is
success, fork or fail; summary, branch and rev are omitted when empty). Compact JSON never
holds a raw newline, so any summary fits on the line. The last well-formed result line of a
worker's output is its result (`last_result`); other lines, malformed ones too, are output.

A json_path scorer's expression is a small JSONPath subset: `$` (the document), then any of
`.name` (a key of letters, digits, `_` and `-`, not starting with a digit or `-`), `['name']`
or `["name"]` (any key; a backslash escapes the quote or itself), and `[index]` (an array
index, negative from the end). `$.results[0]['pass rate']` selects a value of
``{"results": [{"pass rate": 1}]}``.
"""

import functools
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec

from protocol.errors import InvalidRequest


class Record(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The options of every task record; apart from protocol.base.Message so that records
    and ops stay apart."""


RunStatus = Literal["pending", "queued", "running", "paused", "completed", "failed", "cancelled"]
WorkerStatus = Literal["unknown", "online", "busy", "offline", "unhealthy", "draining", "retired"]
TaskResult = Literal["pass", "fail", "skip", "timeout"]
InboxState = Literal["queued", "leased", "running", "done", "cancelled"]

ARTIFACT_KINDS: tuple[str, ...] = ("log", "patch", "test_result", "report", "checkpoint", "receipt")
"""The seed's artifact kinds; an artifact's kind is any string, and these are the known ones."""


# --- times -----------------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def timestamp(epoch: float) -> str:
    """`epoch` (seconds since 1970) as RFC 3339 UTC, to the microsecond: the fraction is
    left out when it is zero (`2026-06-12T17:00:00Z`, `2026-06-12T17:00:00.123456Z`)."""
    seconds, micros = divmod(round(epoch * 1_000_000), 1_000_000)
    whole = _whole_seconds(seconds)
    return f"{whole}.{micros:06d}Z" if micros else f"{whole}Z"


@functools.lru_cache(maxsize=4)
def _whole_seconds(seconds: int) -> str:
    """Formatted once a second, not once an event (strftime is most of a timestamp's cost)."""
    return (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")


def epoch(ts: str) -> float:
    """Seconds since 1970 of an RFC 3339 time (any offset; `timestamp` writes UTC)."""
    match = _RFC3339.fullmatch(ts) if isinstance(ts, str) else None
    if match is None:
        raise InvalidRequest(f"invalid time {str(ts)[:40]!r}: use RFC 3339, 2026-06-12T17:00:00Z")
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    offset = timedelta(0)
    if match[9]:
        offset = timedelta(hours=int(match[10]), minutes=int(match[11]))
        offset = -offset if match[9] == "-" else offset
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone(offset))
    except ValueError as exc:
        raise InvalidRequest(f"invalid time {ts!r}: {exc}") from None
    return moment.timestamp() + (float(match[7]) if match[7] else 0.0)


# --- scorers, hosts, policies ----------------------------------------------------------------


class ScorerBase(Record, frozen=True, tag_field="kind"):
    """How a finished task is verified; scorer paths are relative to the task's workspace."""


class ExitCodeScorer(ScorerBase, frozen=True, tag="exit_code"):
    """Pass when the worker exits 0."""


class FileExistsScorer(ScorerBase, frozen=True, tag="file_exists"):
    path: str


class RegexMatchScorer(ScorerBase, frozen=True, tag="regex_match"):
    path: str
    pattern: str


class JsonPathScorer(ScorerBase, frozen=True, tag="json_path"):
    path: str
    expression: str
    """In the JSONPath subset of this module's docstring."""


class ManualScorer(ScorerBase, frozen=True, tag="manual"):
    """Pending until someone scores it (`fleetctl receipts score`)."""


Scorer = ExitCodeScorer | FileExistsScorer | RegexMatchScorer | JsonPathScorer | ManualScorer


class HostBase(Record, frozen=True, tag_field="kind"):
    """Where a worker runs: only `local` is dispatched; the others are refused there."""


class LocalHost(HostBase, frozen=True, tag="local"):
    pass


class SshHost(HostBase, frozen=True, tag="ssh"):
    host: str
    port: int | None = None
    user: str | None = None
    identity: str | None = None


class DockerHost(HostBase, frozen=True, tag="docker"):
    image: str
    args: list[str] = []


HostSpec = LocalHost | SshHost | DockerHost


class RetryPolicy(Record, frozen=True):
    """How often a task is tried, and how long to wait between tries."""

    max_attempts: int = 3
    initial_backoff_seconds: int | float = 5
    max_backoff_seconds: int | float = 300
    backoff_multiplier: int | float = 2

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before attempt `attempts` + 1, after `attempts` failed ones:
        initial x multiplier ** (attempts - 1), capped at max_backoff_seconds."""
        initial, cap = float(self.initial_backoff_seconds), float(self.max_backoff_seconds)
        if initial <= 0:
            return 0.0
        try:
            delay = initial * float(self.backoff_multiplier) ** (max(attempts, 1) - 1)
        except OverflowError:
            delay = math.inf
        return min(delay, cap)

    def exhausted(self, attempts: int) -> bool:
        """Whether a task tried `attempts` times may not be tried again."""
        return attempts >= self.max_attempts


DEFAULT_RETRY = RetryPolicy()


class ChannelBase(Record, frozen=True, tag_field="kind"):
    """Where an alert goes."""


class SlackChannel(ChannelBase, frozen=True, tag="slack"):
    webhook_url: str


class WebhookChannel(ChannelBase, frozen=True, tag="webhook"):
    url: str
    secret: str | None = None
    """When set, the POST is signed with HMAC-SHA256 of its body under this secret."""


class PagerDutyChannel(ChannelBase, frozen=True, tag="pager_duty"):
    routing_key: str
    severity: str


AlertChannel = SlackChannel | WebhookChannel | PagerDutyChannel


class AlertPolicy(Record, frozen=True):
    """Alert every channel after `after_attempts` failed attempts, or once a worker has been
    stale for `after_minutes_stale` minutes."""

    channels: list[AlertChannel] = []
    after_attempts: int | None = None
    after_minutes_stale: int | float | None = None


class ArtifactRef(Record, frozen=True):
    kind: str
    """One of ARTIFACT_KINDS, or any other kind, kept as written."""
    path: str
    checksum: str | None = None
    mime_type: str | None = None
    size_bytes: int | None = None


# --- runs -------------------------------------------------------------------------------------


class TaskSpec(Record, frozen=True):
    """One unit of work within a run."""

    id: str
    name: str
    instructions: str
    description: str | None = None
    expected_artifacts: list[str] = []
    scorer: Scorer | None = None
    retry_policy: RetryPolicy | None = None
    alert_policy: AlertPolicy | None = None
    timeout_seconds: int | float | None = None
    metadata: dict[str, Any] = {}
    priority: int = 0
    """fleet's extension: higher is dispatched first (then the older)."""
    capabilities: list[str] = []
    """fleet's extension: a worker must have all of them."""
    labels: dict[str, str] = {}
    """fleet's extension: a worker's labels must include all of them."""
    workspace: str | None = None
    """fleet's extension: the directory the worker runs in; scorer paths are inside it."""


class WorkerSpec(Record, frozen=True):
    """A worker the dispatcher may start, up to max_concurrent_tasks (None: 1) at once."""

    id: str
    name: str
    host: HostSpec
    labels: dict[str, str] = {}
    capabilities: list[str] = []
    max_concurrent_tasks: int | None = None
    command: list[str] = []
    """fleet's extension: its argv, to which the task's flags are appended (worker_flags)."""
    lease_seconds: int | float = 30.0
    """fleet's extension: a lapse of heartbeats this long makes the worker stale."""
    env: dict[str, str] = {}
    """fleet's extension: its environment, over what members inherit."""


class Run(Record, frozen=True):
    id: str
    name: str
    status: RunStatus
    created_at: str
    task_specs: list[TaskSpec] = []
    worker_specs: list[WorkerSpec] = []
    labels: dict[str, str] = {}
    updated_at: str | None = None
    completed_at: str | None = None


class InboxEntry(Record, frozen=True):
    """A task waiting for, or leased to, a worker."""

    run_id: str
    task_id: str
    priority: int
    enqueued_at: str
    lease_deadline: str | None = None
    attempts: int = 0
    state: InboxState = "queued"
    """fleet's extension."""
    worker_id: str | None = None
    """fleet's extension: the worker it is leased to."""
    attempt_id: str | None = None
    """fleet's extension: the current attempt's id, which its worker is given."""
    not_before: str | None = None
    """fleet's extension: not leased again before this time (the retry backoff)."""


# --- worker events ----------------------------------------------------------------------------


class WorkerEventBase(Record, frozen=True, tag_field="state"):
    """A worker event's envelope; its payload's fields sit beside these (serde's flatten).
    `seq` numbers a run's events from 1, without gaps. Each state sets kw_only again, as
    msgspec does not inherit it, so that its required fields may follow `extra`."""

    seq: int
    run_id: str
    worker_id: str
    task_id: str
    timestamp: str
    extra: dict[str, Any] = {}


class Queued(WorkerEventBase, frozen=True, kw_only=True, tag="queued"):
    pass


class Leased(WorkerEventBase, frozen=True, kw_only=True, tag="leased"):
    lease_expires_at: str | None = None


class Starting(WorkerEventBase, frozen=True, kw_only=True, tag="starting"):
    pass


class Running(WorkerEventBase, frozen=True, kw_only=True, tag="running"):
    pass


class ModelWait(WorkerEventBase, frozen=True, kw_only=True, tag="model_wait"):
    model: str | None = None


class RunningTool(WorkerEventBase, frozen=True, kw_only=True, tag="running_tool"):
    tool: str
    call_id: str | None = None


class Heartbeat(WorkerEventBase, frozen=True, kw_only=True, tag="heartbeat"):
    cpu_percent: float | None = None
    memory_mb: int | None = None


class Artifact(WorkerEventBase, frozen=True, kw_only=True, tag="artifact"):
    """An ArtifactRef's fields, flattened."""

    kind: str
    path: str
    checksum: str | None = None
    mime_type: str | None = None
    size_bytes: int | None = None

    def ref(self) -> ArtifactRef:
        """The artifact, as a receipt lists it."""
        return ArtifactRef(
            kind=self.kind,
            path=self.path,
            checksum=self.checksum,
            mime_type=self.mime_type,
            size_bytes=self.size_bytes,
        )


class Completed(WorkerEventBase, frozen=True, kw_only=True, tag="completed"):
    exit_code: int | None = None
    summary: str | None = None


class Failed(WorkerEventBase, frozen=True, kw_only=True, tag="failed"):
    reason: str
    recoverable: bool = False


class Cancelled(WorkerEventBase, frozen=True, kw_only=True, tag="cancelled"):
    cancelled_by: str | None = None


class Interrupted(WorkerEventBase, frozen=True, kw_only=True, tag="interrupted"):
    signal: str | None = None


class Stale(WorkerEventBase, frozen=True, kw_only=True, tag="stale"):
    last_heartbeat_at: str | None = None


class Restarted(WorkerEventBase, frozen=True, kw_only=True, tag="restarted"):
    restart_count: int = 0


class Escalated(WorkerEventBase, frozen=True, kw_only=True, tag="escalated"):
    channel: str
    alert_id: str | None = None


WorkerEvent = (
    Queued
    | Leased
    | Starting
    | Running
    | ModelWait
    | RunningTool
    | Heartbeat
    | Artifact
    | Completed
    | Failed
    | Cancelled
    | Interrupted
    | Stale
    | Restarted
    | Escalated
)

EVENT_STATES: tuple[str, ...] = (
    "queued", "leased", "starting", "running", "model_wait", "running_tool", "heartbeat",
    "artifact", "completed", "failed", "cancelled", "interrupted", "stale", "restarted",
    "escalated",
)  # fmt: skip
"""Every worker event's `state`, in the seed's order."""


# --- results and receipts ---------------------------------------------------------------------

ResultKind = Literal["success", "fork", "fail"]


class ResultMessage(Record, frozen=True):
    """What a worker says of its work on its result line (the dispatch seed's)."""

    kind: ResultKind
    summary: str = ""
    branch: str = ""
    rev: str = ""


class Score(Record, frozen=True):
    value: float
    max: float | None = None
    notes: str | None = None


class Receipt(Record, frozen=True):
    """A scored task: the record of its last attempt."""

    run_id: str
    task_id: str
    worker_id: str
    completed_at: str
    result: TaskResult
    artifacts: list[ArtifactRef] = []
    score: Score | None = None
    attempt_id: str | None = None
    """fleet's extension: the attempt scored."""
    attempts: int = 0
    """fleet's extension: how many attempts the task took."""
    exit_code: int | None = None
    """fleet's extension: the worker's exit status."""
    outcome: ResultMessage | None = None
    """fleet's extension: the worker's result line, if it printed one."""
    pending: bool = False
    """fleet's extension: a manual scorer's receipt not scored yet (its result is `skip`)."""


RESULT_PREFIX = "fleet-result: "

_RESULT_DECODER = msgspec.json.Decoder(ResultMessage)


def format_result(msg: ResultMessage) -> str:
    """The result line for `msg`, without a line ending."""
    return RESULT_PREFIX + msgspec.json.encode(msg).decode()


def parse_result(line: str) -> ResultMessage | None:
    """The message of a result line (a line ending is allowed); None for any other text."""
    body = line.removesuffix("\n").removesuffix("\r")
    if not body.startswith(RESULT_PREFIX):
        return None
    try:
        return _RESULT_DECODER.decode(body[len(RESULT_PREFIX) :])
    except (msgspec.DecodeError, UnicodeEncodeError):  # not JSON, a wrong shape, lone surrogates
        return None


def last_result(text: str) -> ResultMessage | None:
    """The last result line of a worker's output. Lines are split at "\\n" only: a summary
    may hold other line separators (U+2028...) that JSON leaves raw."""
    for line in reversed(text.split("\n")):
        if (found := parse_result(line)) is not None:
            return found
    return None


def worker_flags(
    *,
    run_id: str,
    task_id: str,
    attempt_id: str,
    title: str,
    workspace: str,
    instructions_file: str,
) -> list[str]:
    """The flags a worker's argv ends with: flags only, never environment variables (the
    dispatch seed's BuildWorkerCommand found that a worker reads its flags and nothing else)."""
    return [
        "--run-id", run_id,
        "--task-id", task_id,
        "--attempt-id", attempt_id,
        "--title", title,
        "--workspace", workspace,
        "--instructions-file", instructions_file,
    ]  # fmt: skip


# --- the JSONPath subset ----------------------------------------------------------------------

_STEP = re.compile(
    r"""\.(?P<name>[A-Za-z_][A-Za-z0-9_-]*)"""
    r"""|\[(?P<index>-?\d+)\]"""
    r"""|\['(?P<single>(?:[^'\\]|\\.)*)'\]"""
    r"""|\["(?P<double>(?:[^"\\]|\\.)*)"\]""",
    re.DOTALL,
)
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _json_path_steps(expression: str) -> tuple[str | int, ...]:
    """The keys and indices of `expression`, or InvalidRequest saying where it went wrong."""
    if not isinstance(expression, str) or not expression.startswith("$"):
        raise InvalidRequest(f"invalid JSON path {str(expression)[:80]!r}: it must start with '$'")
    steps: list[str | int] = []
    position = 1
    while position < len(expression):
        step = _STEP.match(expression, position)
        if step is None:
            raise InvalidRequest(
                f"invalid JSON path {expression[:80]!r} at character {position + 1}: use "
                "$ then .name, ['name'] or [index]"
            )
        if step["index"] is not None:
            steps.append(int(step["index"]))
        else:
            quoted = step["single"] if step["single"] is not None else step["double"]
            steps.append(step["name"] or _ESCAPE.sub(r"\1", quoted or ""))
        position = step.end()
    return tuple(steps)


def check_json_path(expression: str) -> str:
    """`expression` if it is in the JSONPath subset (see the module docstring)."""
    _json_path_steps(expression)
    return expression


def evaluate_json_path(document: Any, expression: str) -> tuple[bool, Any]:
    """(True, the value) that `expression` selects in `document` (decoded JSON), or
    (False, None) when a key or index on the way is not there."""
    value = document
    for step in _json_path_steps(expression):
        if not _has(value, step):
            return False, None
        value = value[step]
    return True, value


def _has(value: Any, step: str | int) -> bool:
    if isinstance(step, int):
        return isinstance(value, list) and -len(value) <= step < len(value)
    return isinstance(value, dict) and step in value
