"""protocol.tasks: the control-plane seed's records keep the seed's JSON shapes, pinned by
golden files (tests/golden/tasks/: the seed's own test examples, one file per event state, one
per record with every field set); the result line, the retry backoff, the times and the
JSONPath subset as the dispatcher relies on them.

FLEET_UPDATE_GOLDEN=1 rewrites the golden files from the records below."""

import os
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import InvalidRequest
from protocol.tasks import (
    ARTIFACT_KINDS,
    DEFAULT_RETRY,
    EVENT_STATES,
    RESULT_PREFIX,
    AlertChannel,
    AlertPolicy,
    Artifact,
    ArtifactRef,
    Cancelled,
    Completed,
    DockerHost,
    Escalated,
    ExitCodeScorer,
    Failed,
    FileExistsScorer,
    Heartbeat,
    InboxEntry,
    Interrupted,
    JsonPathScorer,
    Leased,
    LocalHost,
    ManualScorer,
    ModelWait,
    PagerDutyChannel,
    Queued,
    Receipt,
    RegexMatchScorer,
    Restarted,
    ResultMessage,
    RetryPolicy,
    Run,
    Running,
    RunningTool,
    Score,
    Scorer,
    SlackChannel,
    SshHost,
    Stale,
    Starting,
    TaskSpec,
    WebhookChannel,
    WorkerEvent,
    WorkerSpec,
    check_json_path,
    epoch,
    evaluate_json_path,
    format_result,
    last_result,
    parse_result,
    timestamp,
    worker_flags,
)
from tests.records import records_of

GOLDEN = Path(__file__).parent / "golden" / "tasks"
UPDATE = os.environ.get("FLEET_UPDATE_GOLDEN") == "1"

ENVELOPE: dict[str, Any] = {
    "seq": 7,
    "run_id": "run-002",
    "worker_id": "worker-a",
    "task_id": "task-1",
    "timestamp": "2026-06-12T17:01:00Z",
    "extra": {"host": "build-1", "pid": 4242},
}
"""The envelope of every event-state golden file, `extra` set."""

EVENTS: dict[str, WorkerEvent] = {
    "queued": Queued(**ENVELOPE),
    "leased": Leased(**ENVELOPE, lease_expires_at="2026-06-12T17:01:30Z"),
    "starting": Starting(**ENVELOPE),
    "running": Running(**ENVELOPE),
    "model_wait": ModelWait(**ENVELOPE, model="claude"),
    "running_tool": RunningTool(**ENVELOPE, tool="bash", call_id="call-1"),
    "heartbeat": Heartbeat(**ENVELOPE, cpu_percent=12.5, memory_mb=256),
    "artifact": Artifact(
        **ENVELOPE,
        kind="patch",
        path="out/fix.patch",
        checksum="sha256:abc",
        mime_type="text/x-diff",
        size_bytes=2048,
    ),
    "completed": Completed(**ENVELOPE, exit_code=0, summary="ok"),
    "failed": Failed(**ENVELOPE, reason="tests failed", recoverable=True),
    "cancelled": Cancelled(**ENVELOPE, cancelled_by="alice"),
    "interrupted": Interrupted(**ENVELOPE, signal="SIGTERM"),
    "stale": Stale(**ENVELOPE, last_heartbeat_at="2026-06-12T17:00:30Z"),
    "restarted": Restarted(**ENVELOPE, restart_count=2),
    "escalated": Escalated(**ENVELOPE, channel="webhook", alert_id="alert-9"),
}


def lifecycle(seq: int, at: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "run_id": "run-002",
        "worker_id": "worker-a",
        "task_id": "task-1",
        "timestamp": at,
    }


FULL_TASK = TaskSpec(
    id="task-1",
    name="lint",
    instructions="run cargo clippy",
    description="lint the tree",
    expected_artifacts=["log", "coverage.xml"],
    scorer=JsonPathScorer(path="report.json", expression="$.summary['passed']"),
    retry_policy=RetryPolicy(
        max_attempts=4, initial_backoff_seconds=0.5, max_backoff_seconds=60, backoff_multiplier=3
    ),
    alert_policy=AlertPolicy(
        channels=[WebhookChannel(url="http://127.0.0.1:9/hook", secret="s3cret")],
        after_attempts=2,
    ),
    timeout_seconds=300,
    metadata={"ticket": "FLT-15", "weight": 1.5, "tags": ["ci"]},
    priority=10,
    capabilities=["rust"],
    labels={"pool": "fast"},
    workspace="/srv/work/task-1",
)

# Each golden file's record, as (the type it decodes to, the record).
CASES: dict[str, tuple[Any, Any]] = {
    # the seed's own tests (shared/seeds/002), translated
    "fleet_run_round_trip": (
        Run,
        Run(
            id="run-001",
            name="dogfood smoke",
            status="running",
            task_specs=[
                TaskSpec(
                    id="task-1",
                    name="lint",
                    instructions="run cargo clippy",
                    expected_artifacts=["log"],
                    scorer=ExitCodeScorer(),
                    retry_policy=RetryPolicy(),
                    timeout_seconds=300,
                )
            ],
            created_at="2026-06-12T17:00:00Z",
        ),
    ),
    "worker_event_lifecycle_round_trip": (
        list[WorkerEvent],
        [
            Queued(**lifecycle(1, "2026-06-12T17:01:00Z")),
            RunningTool(**lifecycle(2, "2026-06-12T17:01:05Z"), tool="bash", call_id="call-1"),
            Completed(**lifecycle(3, "2026-06-12T17:02:00Z"), exit_code=0, summary="ok"),
        ],
    ),
    "alert_policy_round_trip": (
        AlertPolicy,
        AlertPolicy(
            channels=[SlackChannel(webhook_url="https://hooks.slack.com/test")],
            after_attempts=2,
            after_minutes_stale=10,
        ),
    ),
    "artifact_other_kind_round_trip": (
        ArtifactRef,
        ArtifactRef(
            kind="coverage.xml",
            path="/tmp/coverage.xml",
            checksum="sha256:abc",
            mime_type="application/xml",
            size_bytes=1024,
        ),
    ),
    "artifact_kind_uses_flat_string_json": (
        list[ArtifactRef],
        [
            ArtifactRef(kind="test_result", path="junit.xml"),
            ArtifactRef(kind="coverage.xml", path="coverage.xml"),
        ],
    ),
    "retry_policy_missing_fields_use_nonzero_defaults": (
        list[RetryPolicy],
        [RetryPolicy(), RetryPolicy(max_attempts=5)],
    ),
    "sparse_worker_events_omit_absent_optional_fields": (
        list[WorkerEvent],
        [
            Heartbeat(**lifecycle(4, "2026-06-12T17:01:10Z")),
            Completed(**lifecycle(5, "2026-06-12T17:02:00Z")),
        ],
    ),
    "receipt_round_trip": (
        Receipt,
        Receipt(
            run_id="run-003",
            task_id="task-1",
            worker_id="worker-b",
            completed_at="2026-06-12T17:03:00Z",
            result="pass",
            score=Score(value=0.95, max=1.0),
        ),
    ),
    # every event state, every field set
    **{f"event_{state}": (WorkerEvent, event) for state, event in EVENTS.items()},
    # every other record, every field set
    "task_spec_full": (TaskSpec, FULL_TASK),
    "scorers": (
        list[Scorer],
        [
            ExitCodeScorer(),
            FileExistsScorer(path="out/done"),
            RegexMatchScorer(path="test.log", pattern=r"^\d+ passed$"),
            JsonPathScorer(path="report.json", expression="$.ok"),
            ManualScorer(),
        ],
    ),
    "alert_channels": (
        list[AlertChannel],
        [
            SlackChannel(webhook_url="https://hooks.slack.com/services/T/B/X"),
            WebhookChannel(url="https://alerts.example/hook", secret="s3cret"),
            PagerDutyChannel(routing_key="R0UTING", severity="critical"),
        ],
    ),
    "worker_spec_local": (
        WorkerSpec,
        WorkerSpec(
            id="w1",
            name="local worker",
            host=LocalHost(),
            labels={"pool": "fast"},
            capabilities=["rust", "python"],
            max_concurrent_tasks=4,
            command=["python3", "worker.py", "--verbose"],
            lease_seconds=15,
            env={"PYTHONUNBUFFERED": "1"},
        ),
    ),
    "worker_spec_ssh": (
        WorkerSpec,
        WorkerSpec(
            id="w2",
            name="remote worker",
            host=SshHost(host="build-2", port=2222, user="ci", identity="/etc/fleet/id_ed25519"),
            command=["worker"],
        ),
    ),
    "worker_spec_docker": (
        WorkerSpec,
        WorkerSpec(
            id="w3",
            name="container worker",
            host=DockerHost(image="fleet/worker:1", args=["--network", "none"]),
        ),
    ),
    "run_full": (
        Run,
        Run(
            id="run-004",
            name="nightly",
            status="completed",
            created_at="2026-06-12T17:00:00Z",
            task_specs=[FULL_TASK],
            worker_specs=[WorkerSpec(id="w1", name="w", host=LocalHost(), command=["w"])],
            labels={"team": "infra"},
            updated_at="2026-06-12T17:10:00.250000Z",
            completed_at="2026-06-12T17:10:00.250000Z",
        ),
    ),
    "inbox_entry_full": (
        InboxEntry,
        InboxEntry(
            run_id="run-004",
            task_id="task-1",
            priority=10,
            enqueued_at="2026-06-12T17:00:00Z",
            lease_deadline="2026-06-12T17:00:30Z",
            attempts=1,
            state="leased",
            worker_id="w1",
            attempt_id="task-1.1",
            not_before="2026-06-12T17:00:05Z",
        ),
    ),
    "receipt_full": (
        Receipt,
        Receipt(
            run_id="run-004",
            task_id="task-1",
            worker_id="w1",
            completed_at="2026-06-12T17:05:00Z",
            result="fail",
            artifacts=[ArtifactRef(kind="log", path="task-1.log", size_bytes=10)],
            score=Score(value=0.0, max=1.0, notes="2 of 3 tests failed"),
            attempt_id="task-1.3",
            attempts=3,
            exit_code=1,
            outcome=ResultMessage(kind="fail", summary="2 failed", branch="fix-1", rev="4f2a9c1"),
            pending=False,
        ),
    ),
    "receipt_pending_manual": (
        Receipt,
        Receipt(
            run_id="run-004",
            task_id="task-2",
            worker_id="w1",
            completed_at="2026-06-12T17:06:00Z",
            result="skip",
            attempt_id="task-2.1",
            attempts=1,
            exit_code=0,
            pending=True,
        ),
    ),
}


def canonical(value: Any) -> bytes:
    """A golden file's bytes: msgspec's encoding (its field order), indented to be read."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_encoding_is_the_golden_file(name: str) -> None:
    path = GOLDEN / f"{name}.json"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        path.write_bytes(canonical(CASES[name][1]))
    assert canonical(CASES[name][1]) == path.read_bytes()


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_file_decodes_to_the_record(name: str) -> None:
    kind, record = CASES[name]
    assert msgspec.json.decode((GOLDEN / f"{name}.json").read_bytes(), type=kind) == record


def test_every_golden_file_has_a_case() -> None:
    assert {path.stem for path in GOLDEN.glob("*.json")} == set(CASES)


def test_event_states_are_the_union_tags_in_the_seed_order() -> None:
    info = msgspec.inspect.type_info(WorkerEvent)
    assert isinstance(info, msgspec.inspect.UnionType)
    tags = tuple(t.tag for t in info.types if isinstance(t, msgspec.inspect.StructType))
    assert tags == EVENT_STATES == tuple(EVENTS)


def test_the_seed_artifact_kinds_are_known() -> None:
    assert ARTIFACT_KINDS == ("log", "patch", "test_result", "report", "checkpoint", "receipt")


def test_an_event_state_is_flattened_beside_the_envelope() -> None:
    encoded = msgspec.json.decode(msgspec.json.encode(EVENTS["running_tool"]))
    assert encoded["state"] == "running_tool"
    assert encoded["tool"] == "bash"
    assert encoded["seq"] == 7


def test_an_artifact_event_gives_the_artifact_a_receipt_lists() -> None:
    event = EVENTS["artifact"]
    assert isinstance(event, Artifact)
    assert event.ref() == ArtifactRef(
        kind="patch",
        path="out/fix.patch",
        checksum="sha256:abc",
        mime_type="text/x-diff",
        size_bytes=2048,
    )


def test_unknown_fields_are_ignored_on_decode() -> None:
    data = b'{"kind":"coverage.xml","path":"c.xml","from_the_future":{"x":1}}'
    assert msgspec.json.decode(data, type=ArtifactRef) == ArtifactRef(
        kind="coverage.xml", path="c.xml"
    )


def test_explicit_null_decodes_as_an_absent_optional_field() -> None:
    data = b'{"state":"completed","seq":3,"run_id":"run-002","worker_id":"worker-a",'
    data += b'"task_id":"task-1","timestamp":"2026-06-12T17:02:00Z","exit_code":null}'
    assert msgspec.json.decode(data, type=WorkerEvent) == Completed(
        **lifecycle(3, "2026-06-12T17:02:00Z")
    )


SEED_SERDE_OUTPUT: dict[str, tuple[Any, bytes, Any]] = {
    "run": (
        Run,
        b'{"id":"run-001","name":"dogfood smoke","status":"running","task_specs":[{"id":"task-1",'
        b'"name":"lint","instructions":"run cargo clippy","expected_artifacts":["log"],'
        b'"scorer":{"kind":"exit_code"},"retry_policy":{"max_attempts":3,'
        b'"initial_backoff_seconds":5,"max_backoff_seconds":300,"backoff_multiplier":2},'
        b'"timeout_seconds":300,"metadata":{}}],"worker_specs":[],"labels":{},'
        b'"created_at":"2026-06-12T17:00:00Z"}',
        CASES["fleet_run_round_trip"][1],
    ),
    "event": (
        WorkerEvent,
        b'{"seq":2,"run_id":"run-002","worker_id":"worker-a","task_id":"task-1",'
        b'"timestamp":"2026-06-12T17:01:05Z","state":"running_tool","tool":"bash",'
        b'"call_id":"call-1"}',
        CASES["worker_event_lifecycle_round_trip"][1][1],
    ),
    "receipt": (
        Receipt,
        b'{"run_id":"run-003","task_id":"task-1","worker_id":"worker-b",'
        b'"completed_at":"2026-06-12T17:03:00Z","result":"pass","artifacts":[],'
        b'"score":{"value":0.95,"max":1.0}}',
        CASES["receipt_round_trip"][1],
    ),
}
"""What the seed's Rust types write (serde_json: every field in order, the tag where serde's
flatten puts it), for the seed's own examples."""


@pytest.mark.parametrize("name", sorted(SEED_SERDE_OUTPUT))
def test_what_the_seed_writes_decodes_to_the_same_record(name: str) -> None:
    kind, data, record = SEED_SERDE_OUTPUT[name]
    assert msgspec.json.decode(data, type=kind) == record


def test_an_unknown_artifact_kind_is_kept_as_written() -> None:
    ref = msgspec.json.decode(b'{"kind":"flamegraph.svg","path":"f.svg"}', type=ArtifactRef)
    assert ref.kind == "flamegraph.svg"


def test_a_known_artifact_kind_is_a_flat_string() -> None:
    assert msgspec.json.encode(ArtifactRef(kind="test_result", path="j.xml")) == (
        b'{"kind":"test_result","path":"j.xml"}'
    )


def test_whole_seconds_encode_as_integers_like_the_seed() -> None:
    decoded = msgspec.json.decode(b'{"initial_backoff_seconds":10}', type=RetryPolicy)
    assert msgspec.json.encode(decoded) == b'{"initial_backoff_seconds":10}'


def test_an_unknown_event_state_is_refused() -> None:
    data = b'{"state":"teleported","seq":1,"run_id":"r","worker_id":"w","task_id":"t",'
    data += b'"timestamp":"2026-06-12T17:00:00Z"}'
    with pytest.raises(msgspec.ValidationError, match="teleported"):
        msgspec.json.decode(data, type=WorkerEvent)


# --- the retry policy -------------------------------------------------------------------------


def test_the_default_retry_policy_is_the_seeds() -> None:
    assert (
        DEFAULT_RETRY.max_attempts,
        DEFAULT_RETRY.initial_backoff_seconds,
        DEFAULT_RETRY.backoff_multiplier,
        DEFAULT_RETRY.max_backoff_seconds,
    ) == (3, 5, 2, 300)


def test_backoff_starts_at_the_initial_delay_and_multiplies() -> None:
    assert [DEFAULT_RETRY.backoff(n) for n in (1, 2, 3, 4)] == [5, 10, 20, 40]


def test_backoff_is_capped_at_the_maximum() -> None:
    assert DEFAULT_RETRY.backoff(7) == 300


def test_backoff_after_countless_attempts_is_the_cap() -> None:
    assert DEFAULT_RETRY.backoff(10**9) == 300


def test_backoff_before_any_failure_is_the_initial_delay() -> None:
    assert DEFAULT_RETRY.backoff(0) == 5


def test_backoff_with_no_initial_delay_is_zero() -> None:
    assert RetryPolicy(initial_backoff_seconds=0).backoff(10**9) == 0


def test_attempts_are_exhausted_at_max_attempts() -> None:
    exhausted = [DEFAULT_RETRY.exhausted(n) for n in (0, 1, 2, 3, 4)]
    assert exhausted == [False, False, False, True, True]


@settings(deadline=None)
@given(
    st.builds(
        RetryPolicy,
        max_attempts=st.integers(1, 10),
        initial_backoff_seconds=st.floats(0, 1e6),
        max_backoff_seconds=st.floats(0, 1e6),
        backoff_multiplier=st.floats(1, 1e3),
    ),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)
def test_backoff_is_monotone_and_capped(policy: RetryPolicy, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert policy.backoff(low) <= policy.backoff(high) <= policy.max_backoff_seconds


# --- times --------------------------------------------------------------------------------------


def test_a_timestamp_of_whole_seconds_has_no_fraction() -> None:
    assert timestamp(1781283600) == "2026-06-12T17:00:00Z"


def test_a_timestamp_keeps_microseconds() -> None:
    assert timestamp(1781283600.123456) == "2026-06-12T17:00:00.123456Z"


def test_epoch_reads_a_timestamp() -> None:
    assert epoch("2026-06-12T17:00:00.5Z") == 1781283600.5


def test_epoch_reads_an_offset() -> None:
    assert epoch("2026-06-12T19:00:00+02:00") == 1781283600


@pytest.mark.parametrize(
    "text", ["2026-06-12", "2026-06-12T17:00:00", "yesterday", "2026-13-01T00:00:00Z"]
)
def test_epoch_refuses_what_is_not_rfc3339(text: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid time"):
        epoch(text)


@given(st.integers(0, 2**42).map(lambda micros: micros / 1_000_000))
def test_epoch_reads_back_a_timestamp(moment: float) -> None:
    assert abs(epoch(timestamp(moment)) - moment) < 1e-6


# --- the result line ----------------------------------------------------------------------------


def test_a_result_line_is_the_prefix_and_compact_json() -> None:
    line = format_result(ResultMessage(kind="success", summary="all green", rev="4f2a9c1"))
    assert line == 'fleet-result: {"kind":"success","summary":"all green","rev":"4f2a9c1"}'


def test_a_multi_line_summary_stays_on_one_line() -> None:
    assert "\n" not in format_result(ResultMessage(kind="fail", summary="one\ntwo\r\n"))


def test_parse_result_takes_a_line_ending() -> None:
    line = format_result(ResultMessage(kind="fork", branch="b")) + "\r\n"
    assert parse_result(line) == ResultMessage(kind="fork", branch="b")


@pytest.mark.parametrize(
    "line",
    [
        "all done",
        'fleet-result {"kind":"success"}',
        ' fleet-result: {"kind":"success"}',
        "fleet-result: {not json",
        'fleet-result: {"kind":"maybe"}',
        'fleet-result: {"summary":"no kind"}',
        'fleet-result: ["success"]',
        "fleet-result: \ud800",
    ],
)
def test_parse_result_of_anything_else_is_none(line: str) -> None:
    assert parse_result(line) is None


def test_last_result_takes_the_last_result_line() -> None:
    output = "\n".join(
        [
            "building",
            format_result(ResultMessage(kind="fail", summary="first try")),
            "retrying",
            format_result(ResultMessage(kind="success", summary="second try")),
            "bye",
            "",
        ]
    )
    assert last_result(output) == ResultMessage(kind="success", summary="second try")


def test_last_result_skips_a_malformed_result_line() -> None:
    output = format_result(ResultMessage(kind="success")) + "\n" + RESULT_PREFIX + "{oops\n"
    assert last_result(output) == ResultMessage(kind="success")


def test_last_result_of_output_without_one_is_none() -> None:
    assert last_result("just\noutput\n") is None


def test_a_summary_with_a_unicode_line_separator_is_one_line() -> None:
    message = ResultMessage(kind="success", summary="a\u2028b\x85c\x1cd")
    assert last_result("before\n" + format_result(message) + "\nafter") == message


text_without_surrogates = st.text(st.characters(exclude_categories=["Cs"]))


@given(
    st.builds(
        ResultMessage,
        kind=st.sampled_from(["success", "fork", "fail"]),
        summary=text_without_surrogates,
        branch=text_without_surrogates,
        rev=text_without_surrogates,
    )
)
def test_a_result_line_reads_back_as_its_message(message: ResultMessage) -> None:
    assert parse_result(format_result(message)) == message


@given(st.text())
def test_parse_result_of_any_text_never_raises(text: str) -> None:
    parse_result(text)
    parse_result(RESULT_PREFIX + text)
    last_result(text)


# --- the worker's flags -------------------------------------------------------------------------


def test_worker_flags_carry_the_task_as_flags_only() -> None:
    flags = worker_flags(
        run_id="run-1",
        task_id="lint",
        attempt_id="lint.2",
        title="lint the tree",
        workspace="/srv/w",
        instructions_file="/srv/w/.fleet/lint.md",
    )
    assert flags == [
        "--run-id", "run-1",
        "--task-id", "lint",
        "--attempt-id", "lint.2",
        "--title", "lint the tree",
        "--workspace", "/srv/w",
        "--instructions-file", "/srv/w/.fleet/lint.md",
    ]  # fmt: skip


# --- the JSONPath subset ------------------------------------------------------------------------

REPORT = {
    "summary": {"passed": 3, "failed": 0, "rate": None},
    "tests": [{"name": "a"}, {"name": "b"}],
    "odd key": {"it's": True},
}


def test_json_path_dollar_is_the_document() -> None:
    assert evaluate_json_path(REPORT, "$") == (True, REPORT)


def test_json_path_follows_dotted_names() -> None:
    assert evaluate_json_path(REPORT, "$.summary.passed") == (True, 3)


def test_json_path_follows_indices() -> None:
    assert evaluate_json_path(REPORT, "$.tests[1].name") == (True, "b")


def test_json_path_counts_negative_indices_from_the_end() -> None:
    assert evaluate_json_path(REPORT, "$.tests[-2].name") == (True, "a")


def test_json_path_follows_quoted_names_with_escapes() -> None:
    assert evaluate_json_path(REPORT, r"$['odd key']['it\'s']") == (True, True)
    assert evaluate_json_path(REPORT, '$["summary"]["failed"]') == (True, 0)


def test_json_path_finds_a_null_value() -> None:
    assert evaluate_json_path(REPORT, "$.summary.rate") == (True, None)


@pytest.mark.parametrize(
    "expression",
    [
        "$.missing",
        "$.summary.passed.deeper",
        "$.tests[2]",
        "$.tests[-3]",
        "$.summary[0]",
        "$.tests.name",
    ],
)
def test_json_path_to_nothing_is_not_found(expression: str) -> None:
    assert evaluate_json_path(REPORT, expression) == (False, None)


@pytest.mark.parametrize(
    "expression", ["summary", "$.", "$..x", "$.a b", "$[", "$['a]", "$[1.5]", "$[*]", "$.9a", ""]
)
def test_check_json_path_refuses_what_is_outside_the_subset(expression: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid JSON path"):
        check_json_path(expression)


def test_evaluate_json_path_refuses_an_invalid_expression() -> None:
    with pytest.raises(InvalidRequest, match="at character 2"):
        evaluate_json_path(REPORT, "$$")


# --- every record round-trips ----------------------------------------------------------------


def assert_round_trips(kind: Any, value: Any) -> None:
    assert msgspec.json.decode(msgspec.json.encode(value), type=kind) == value


@settings(deadline=None)
@given(records_of(WorkerEvent))
def test_every_worker_event_round_trips(event: WorkerEvent) -> None:
    assert_round_trips(WorkerEvent, event)


@settings(deadline=None)
@given(records_of(Receipt))
def test_every_receipt_round_trips(receipt: Receipt) -> None:
    assert_round_trips(Receipt, receipt)


@settings(deadline=None, max_examples=50)
@given(records_of(Run))
def test_every_run_round_trips(run: Run) -> None:
    assert_round_trips(Run, run)


@settings(deadline=None)
@given(records_of(InboxEntry))
def test_every_inbox_entry_round_trips(entry: InboxEntry) -> None:
    assert_round_trips(InboxEntry, entry)


def test_a_float_given_stays_a_float_on_the_wire() -> None:
    assert msgspec.json.encode(RetryPolicy(max_backoff_seconds=60.0)) == (
        b'{"max_backoff_seconds":60.0}'
    )
