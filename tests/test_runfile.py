"""protocol.runfile: a run file parses into a RunSpec, and every mistake in one is refused with
an InvalidRequest that names the file and the key (and the task or worker it is in)."""

import contextlib
import copy
import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import InvalidRequest
from protocol.runfile import RunSpec, check_run_spec, parse_run_file, render_path
from protocol.tasks import (
    DockerHost,
    LocalHost,
    RegexMatchScorer,
    RetryPolicy,
    SshHost,
    TaskSpec,
    WorkerSpec,
)
from tests.records import json_values, records_of

EXAMPLE = """\
name = "nightly"
labels = { team = "infra" }

[[task_specs]]
id = "lint"
name = "lint the tree"
instructions = "run make lint"
scorer = { kind = "regex_match", path = "lint.log", pattern = "^All checks passed" }
retry_policy = { max_attempts = 2 }

[[worker_specs]]
id = "w1"
name = "local worker"
host = { kind = "local" }
command = ["python3", "worker.py"]
max_concurrent_tasks = 4
"""

EXAMPLE_SPEC = RunSpec(
    name="nightly",
    labels={"team": "infra"},
    task_specs=[
        TaskSpec(
            id="lint",
            name="lint the tree",
            instructions="run make lint",
            scorer=RegexMatchScorer(path="lint.log", pattern="^All checks passed"),
            retry_policy=RetryPolicy(max_attempts=2),
        )
    ],
    worker_specs=[
        WorkerSpec(
            id="w1",
            name="local worker",
            host=LocalHost(),
            command=["python3", "worker.py"],
            max_concurrent_tasks=4,
        )
    ],
)

BASE: dict[str, Any] = {
    "name": "nightly",
    "task_specs": [
        {"id": "build", "name": "build", "instructions": "make", "scorer": {"kind": "exit_code"}},
        {"id": "test", "name": "test", "instructions": "make test"},
    ],
    "worker_specs": [
        {"id": "w1", "name": "one", "host": {"kind": "local"}, "command": ["worker"]},
    ],
}


REMOVE = object()


def document(**changes: Any) -> dict[str, Any]:
    """BASE with `changes`, each a key path (`task_specs__0__scorer` for
    task_specs[0].scorer) set to a value, or removed when the value is REMOVE."""
    changed = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = (int(p) if p.isdigit() else p for p in dotted.split("__"))
        target: Any = changed
        for parent in parents:
            target = target[parent]
        if value is REMOVE:
            del target[last]
        else:
            target[last] = value
    return changed


def parse_json(doc: Any, **options: Any) -> RunSpec:
    return parse_run_file(json.dumps(doc), source="run.json", fmt="json", **options)


def refusal(doc: Any) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_json(doc)
    return caught.value.message


def toml_refusal(text: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        parse_run_file(text, source="run.toml", fmt="toml")
    return caught.value.message


# --- what parses ------------------------------------------------------------------------------


def test_the_example_parses() -> None:
    assert parse_run_file(EXAMPLE, source="run.toml", fmt="toml") == EXAMPLE_SPEC


def test_the_same_run_in_json_parses_the_same() -> None:
    as_json = msgspec.json.encode(EXAMPLE_SPEC).decode()
    assert parse_run_file(as_json, source="run.json", fmt="json") == EXAMPLE_SPEC


def test_ssh_and_docker_hosts_parse() -> None:
    spec = parse_json(
        document(
            worker_specs=[
                {"id": "r", "name": "r", "host": {"kind": "ssh", "host": "b2", "port": 22}},
                {"id": "d", "name": "d", "host": {"kind": "docker", "image": "w:1"}},
            ]
        )
    )
    assert [w.host for w in spec.worker_specs] == [
        SshHost(host="b2", port=22),
        DockerHost(image="w:1"),
    ]


def test_a_run_without_workers_parses() -> None:
    assert parse_json(document(worker_specs=REMOVE)).worker_specs == []


def test_json_null_for_an_optional_key_is_absent() -> None:
    spec = parse_json(document(task_specs__0__timeout_seconds=None))
    assert spec.task_specs[0].timeout_seconds is None


def test_a_task_without_a_workspace_works_in_the_files_directory() -> None:
    spec = parse_json(BASE, directory="/srv/runs")
    assert spec.task_specs[0].workspace == "/srv/runs"


def test_a_relative_workspace_is_under_the_files_directory() -> None:
    spec = parse_json(document(task_specs__0__workspace="build/a"), directory="/srv/runs")
    assert spec.task_specs[0].workspace == "/srv/runs/build/a"


def test_an_absolute_workspace_stays() -> None:
    spec = parse_json(document(task_specs__0__workspace="/work/a"), directory="/srv/runs")
    assert spec.task_specs[0].workspace == "/work/a"


def test_without_a_directory_workspaces_stay_as_written() -> None:
    spec = parse_json(document(task_specs__0__workspace="build/a"))
    assert [t.workspace for t in spec.task_specs] == ["build/a", None]


def test_an_error_carries_the_key_in_its_details() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_json(document(task_specs__1__scorer={"kind": "file_exists", "path": "/etc/x"}))
    assert caught.value.details == {"key": "task_specs[1].scorer.path"}


def test_an_error_names_the_task_it_is_in() -> None:
    message = refusal(document(task_specs__1__timeout_seconds=-1))
    assert message.endswith("(in task 'test')")


def test_a_key_that_is_not_a_word_is_quoted_in_the_path() -> None:
    assert render_path(["task_specs", 0, "labels", "a b"]) == "task_specs[0].labels['a b']"


# --- the text ---------------------------------------------------------------------------------


def test_text_that_is_not_toml_is_refused() -> None:
    assert toml_refusal("name = \n").startswith("run.toml: not valid TOML: ")


def test_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"^run\.json: not valid JSON"):
        parse_run_file("{", source="run.json", fmt="json")


def test_a_json_top_level_that_is_not_an_object_is_refused() -> None:
    assert "top level must be an object" in refusal([BASE])


def test_a_lone_surrogate_in_toml_is_refused() -> None:
    text = EXAMPLE.replace("lint the tree", "lint \ud800")
    assert "task_specs[0].name: not valid Unicode" in toml_refusal(text)


def test_an_integer_past_64_bits_is_refused() -> None:
    assert "task_specs[0].priority: " in refusal(document(task_specs__0__priority=2**64))


# --- keys and shapes --------------------------------------------------------------------------


def test_an_unknown_top_level_key_is_refused() -> None:
    message = refusal(document(tasks=[]))
    assert message.startswith("run.json: tasks: unknown key: use name, labels, task_specs")


def test_an_unknown_key_in_a_task_is_refused() -> None:
    message = refusal(document(task_specs__1__instrutions="x"))
    assert "task_specs[1].instrutions: unknown key" in message


def test_an_unknown_key_in_a_scorer_is_refused() -> None:
    scorer = {"kind": "regex_match", "path": "a.log", "patern": "ok"}
    message = refusal(document(task_specs__0__scorer=scorer))
    assert "task_specs[0].scorer.patern: unknown key: use kind, path, pattern" in message


def test_an_unknown_key_in_a_host_is_refused() -> None:
    message = refusal(document(worker_specs__0__host={"kind": "local", "address": "x"}))
    assert "worker_specs[0].host.address: unknown key" in message


def test_an_unknown_key_in_an_alert_channel_is_refused() -> None:
    policy = {"channels": [{"kind": "webhook", "url": "http://h/", "secrets": "s"}]}
    message = refusal(document(task_specs__0__alert_policy=policy))
    assert "task_specs[0].alert_policy.channels[0].secrets: unknown key" in message


def test_an_unknown_scorer_kind_is_refused() -> None:
    message = refusal(document(task_specs__0__scorer={"kind": "vibes"}))
    assert "task_specs[0].scorer.kind: unknown kind 'vibes': use one of exit_code," in message


def test_a_scorer_without_a_kind_is_refused() -> None:
    message = refusal(document(task_specs__0__scorer={"path": "a"}))
    assert "task_specs[0].scorer: missing required key 'kind'" in message


def test_an_unknown_host_kind_is_refused() -> None:
    message = refusal(document(worker_specs__0__host={"kind": "vm"}))
    assert "worker_specs[0].host.kind: unknown kind 'vm': use one of local, ssh, docker" in message


def test_a_missing_required_key_is_refused() -> None:
    message = refusal(document(task_specs__1__instructions=REMOVE))
    assert "task_specs[1]: missing required key 'instructions'" in message


def test_a_run_without_a_name_is_refused() -> None:
    assert "run.json: (top level): missing required key 'name'" in refusal(document(name=REMOVE))


def test_a_key_of_the_wrong_type_is_refused() -> None:
    message = refusal(document(task_specs__0__timeout_seconds="5m"))
    assert "task_specs[0].timeout_seconds: expected a number or null, got a string" in message


def test_a_label_that_is_not_a_string_is_refused_by_its_key() -> None:
    message = refusal(document(task_specs__1__labels={"pool": "fast", "size": 3}))
    assert "task_specs[1].labels.size: expected a string, got an integer" in message


def test_a_command_given_as_a_string_is_refused() -> None:
    message = refusal(document(worker_specs__0__command="python3 worker.py"))
    assert "worker_specs[0].command: expected an array, got a string" in message


def test_a_wrong_type_in_toml_is_said_in_toml_words() -> None:
    message = toml_refusal(EXAMPLE.replace('host = { kind = "local" }', 'host = "local"'))
    assert "worker_specs[0].host: expected a table, got a string" in message


# --- values -----------------------------------------------------------------------------------


def test_a_run_without_tasks_is_refused() -> None:
    assert toml_refusal('name = "x"\n').startswith(
        "run.toml: task_specs: no tasks: add a [[task_specs]] table"
    )


def test_duplicate_task_ids_are_refused() -> None:
    message = refusal(document(task_specs__1__id="build"))
    assert "task_specs[1].id: duplicate task id 'build' (task_specs[0] has it)" in message


def test_duplicate_worker_ids_are_refused() -> None:
    worker = {"id": "w1", "name": "two", "host": {"kind": "local"}, "command": ["w"]}
    message = refusal(document(worker_specs=[*BASE["worker_specs"], worker]))
    assert "worker_specs[1].id: duplicate worker id 'w1' (worker_specs[0] has it)" in message


def test_a_task_id_that_is_not_a_safe_name_is_refused() -> None:
    message = refusal(document(task_specs__0__id="../Build"))
    assert "task_specs[0].id: invalid task id '../Build': use 1 to 63 characters" in message


def test_a_worker_id_that_is_not_a_safe_name_is_refused() -> None:
    message = refusal(document(worker_specs__0__id="W 1"))
    assert "worker_specs[0].id: invalid worker id 'W 1'" in message


def test_an_invalid_regex_is_refused() -> None:
    scorer = {"kind": "regex_match", "path": "a.log", "pattern": "(unclosed"}
    message = refusal(document(task_specs__0__scorer=scorer))
    assert "task_specs[0].scorer.pattern: invalid regular expression '(unclosed'" in message


def test_a_regex_too_large_to_compile_is_refused() -> None:
    scorer = {"kind": "regex_match", "path": "a.log", "pattern": "a{4294967296}"}
    assert "task_specs[0].scorer.pattern: " in refusal(document(task_specs__0__scorer=scorer))


def test_an_absolute_scorer_path_is_refused() -> None:
    scorer = {"kind": "file_exists", "path": "/etc/passwd"}
    message = refusal(document(task_specs__0__scorer=scorer))
    assert "task_specs[0].scorer.path: '/etc/passwd' is absolute" in message


def test_a_scorer_path_leaving_the_workspace_is_refused() -> None:
    scorer = {"kind": "json_path", "path": "out/../../secrets.json", "expression": "$"}
    message = refusal(document(task_specs__0__scorer=scorer))
    assert "task_specs[0].scorer.path: 'out/../../secrets.json' leaves the task's" in message


def test_an_empty_scorer_path_is_refused() -> None:
    message = refusal(document(task_specs__0__scorer={"kind": "file_exists", "path": ""}))
    assert "task_specs[0].scorer.path: must be a non-empty path" in message


def test_a_json_path_outside_the_subset_is_refused() -> None:
    scorer = {"kind": "json_path", "path": "r.json", "expression": "$.tests[*].ok"}
    message = refusal(document(task_specs__0__scorer=scorer))
    assert "task_specs[0].scorer.expression: invalid JSON path" in message


def test_max_concurrent_tasks_below_one_is_refused() -> None:
    message = refusal(document(worker_specs__0__max_concurrent_tasks=0))
    assert "worker_specs[0].max_concurrent_tasks: must be at least 1" in message


def test_a_negative_timeout_is_refused() -> None:
    message = refusal(document(task_specs__0__timeout_seconds=-5))
    assert "task_specs[0].timeout_seconds: must be positive" in message


def test_a_zero_timeout_is_refused() -> None:
    message = refusal(document(task_specs__0__timeout_seconds=0))
    assert "task_specs[0].timeout_seconds: must be positive" in message


def test_an_infinite_timeout_is_refused() -> None:
    text = EXAMPLE.replace("retry_policy =", "timeout_seconds = inf\nretry_policy =")
    assert "task_specs[0].timeout_seconds: must be a finite number" in toml_refusal(text)


def test_zero_max_attempts_is_refused() -> None:
    message = refusal(document(task_specs__0__retry_policy={"max_attempts": 0}))
    assert "task_specs[0].retry_policy.max_attempts: must be at least 1" in message


def test_a_negative_backoff_is_refused() -> None:
    message = refusal(document(task_specs__0__retry_policy={"initial_backoff_seconds": -1}))
    assert "task_specs[0].retry_policy.initial_backoff_seconds: must not be negative" in message


def test_a_negative_backoff_cap_is_refused() -> None:
    message = refusal(document(task_specs__0__retry_policy={"max_backoff_seconds": -1}))
    assert "task_specs[0].retry_policy.max_backoff_seconds: must not be negative" in message


def test_a_shrinking_backoff_multiplier_is_refused() -> None:
    message = refusal(document(task_specs__0__retry_policy={"backoff_multiplier": 0.5}))
    assert "task_specs[0].retry_policy.backoff_multiplier: must be at least 1" in message


def test_alerting_after_zero_attempts_is_refused() -> None:
    message = refusal(document(task_specs__0__alert_policy={"after_attempts": 0}))
    assert "task_specs[0].alert_policy.after_attempts: must be at least 1" in message


def test_negative_stale_minutes_are_refused() -> None:
    message = refusal(document(task_specs__0__alert_policy={"after_minutes_stale": -1}))
    assert "task_specs[0].alert_policy.after_minutes_stale: must not be negative" in message


def test_a_webhook_url_that_is_not_http_is_refused() -> None:
    policy = {"channels": [{"kind": "webhook", "url": "file:///etc/passwd"}]}
    message = refusal(document(task_specs__0__alert_policy=policy))
    assert "task_specs[0].alert_policy.channels[0].url: 'file:///etc/passwd' is not" in message


def test_a_slack_url_that_is_not_http_is_refused() -> None:
    policy = {"channels": [{"kind": "slack", "webhook_url": "hooks.slack.com/x"}]}
    message = refusal(document(task_specs__0__alert_policy=policy))
    assert "task_specs[0].alert_policy.channels[0].webhook_url: " in message


def test_an_unknown_pagerduty_severity_is_refused() -> None:
    policy = {"channels": [{"kind": "pager_duty", "routing_key": "k", "severity": "meh"}]}
    message = refusal(document(task_specs__0__alert_policy=policy))
    assert "channels[0].severity: unknown severity 'meh': use critical, error" in message


def test_a_local_worker_without_a_command_is_refused() -> None:
    message = refusal(document(worker_specs__0__command=REMOVE))
    assert "worker_specs[0].command: a local worker needs a command" in message


def test_a_command_with_an_empty_program_is_refused() -> None:
    message = refusal(document(worker_specs__0__command=["", "x"]))
    assert "worker_specs[0].command: command[0], the program, is empty" in message


def test_a_bad_environment_variable_name_is_refused() -> None:
    message = refusal(document(worker_specs__0__env={"A=B": "x"}))
    assert "worker_specs[0].env: invalid environment variable name 'A=B'" in message


def test_a_zero_lease_is_refused() -> None:
    message = refusal(document(worker_specs__0__lease_seconds=0))
    assert "worker_specs[0].lease_seconds: must be positive" in message


def test_an_ssh_port_out_of_range_is_refused() -> None:
    host = {"kind": "ssh", "host": "b2", "port": 70000}
    message = refusal(document(worker_specs__0__host=host))
    assert "worker_specs[0].host.port: must be a port number" in message


def test_a_spec_from_the_wire_is_checked_the_same() -> None:
    task = TaskSpec(id="a", name="a", instructions="x")
    spec = RunSpec(name="r", task_specs=[task, task])
    with pytest.raises(InvalidRequest, match=r"^run: task_specs\[1\]\.id: duplicate task id"):
        check_run_spec(spec)


# --- any input --------------------------------------------------------------------------------


@settings(deadline=None)
@given(records_of(RunSpec))
def test_a_run_spec_written_as_json_reads_back_or_is_refused_for_a_value(spec: RunSpec) -> None:
    try:
        parsed = parse_run_file(msgspec.json.encode(spec).decode(), source="r", fmt="json")
    except InvalidRequest as exc:
        assert not any(
            shape in exc.message for shape in ("unknown key", "expected ", "missing required")
        ), exc.message
    else:
        assert parsed == spec


@settings(deadline=None)
@given(json_values() | st.dictionaries(st.sampled_from(["name", "task_specs"]), json_values()))
def test_any_json_document_parses_or_is_refused(doc: Any) -> None:
    with contextlib.suppress(InvalidRequest):
        parse_json(doc)


@settings(deadline=None)
@given(st.text())
def test_any_text_parses_or_is_refused(text: str) -> None:
    with contextlib.suppress(InvalidRequest):
        parse_run_file(text, source="r", fmt="toml")
    with contextlib.suppress(InvalidRequest):
        parse_run_file(text, source="r", fmt="json")
