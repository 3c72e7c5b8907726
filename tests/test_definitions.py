"""Member definitions: the strict fleet.toml parser, its file loader, the wire decoding.

The grammars of names and durations have tests of their own (test_names, test_durations)."""

import os
import re

import pytest

from fleetctl.definitions import load_toml
from protocol.definitions import (
    INFINITY,
    ClusterSpec,
    MemberSpec,
    cluster_from_dict,
    parse_env_file,
    parse_toml,
)
from protocol.errors import InvalidRequest, UnknownOp
from protocol.framing import encode
from protocol.members import AddMember, Status, decode_member_request

BRIEF_EXAMPLE = """\
name = "demo"

[members.web]
command = ["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"]
ready = "tcp"                 # tcp | notify | unix:PATH | log:REGEX | none
restart = "on-failure"
env = { PYTHONUNBUFFERED = "1" }
stop_signal = "TERM"
stop_timeout = "5s"
start_timeout = "10s"

[members.db]
command = ["sleep", "100"]
"""


def problem_in(text: str) -> str:
    with pytest.raises(InvalidRequest) as raised:
        parse_toml(text)
    return raised.value.message


def test_the_brief_example_loads() -> None:
    spec = parse_toml(BRIEF_EXAMPLE)
    assert spec.name == "demo"
    web, db = spec.members
    assert web == MemberSpec(
        name="web",
        command=["python3", "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
        ready="tcp",
        restart="on-failure",
        env={"PYTHONUNBUFFERED": "1"},
        stop_signal="TERM",
        stop_timeout=5.0,
        start_timeout=10.0,
    )
    assert (db.ready, db.restart, db.stop_timeout) == ("none", "no", 5.0)


def test_limits_user_and_group_load_as_a_holder_takes_them() -> None:
    text = BRIEF_EXAMPLE + 'limits = { nofile = 4096, core = "infinity", nproc = [64, 128] }\n'
    text += 'user = "nobody"\ngroup = 100\n'
    db = parse_toml(text).member("db")
    assert db is not None
    assert db.limits == {"nofile": [4096, 4096], "core": [INFINITY, INFINITY], "nproc": [64, 128]}
    assert (db.user, db.group) == ("nobody", "100")


def test_a_limit_in_a_table_of_its_own_is_reported_with_its_line() -> None:
    text = BRIEF_EXAMPLE + "[members.db.limits]\nnofile = 10\nmemlock = -5\n"
    assert problem_in(text).startswith("fleet.toml:16: members.db.limits.memlock: ")


def test_a_misspelt_key_is_reported_with_its_line() -> None:
    text = BRIEF_EXAMPLE.replace('stop_signal = "TERM"', 'stop_signnal = "TERM"')
    assert problem_in(text) == "fleet.toml:8: members.web.stop_signnal: unknown key"


def test_an_unknown_top_level_table_is_reported_with_its_line() -> None:
    assert problem_in("\n[memberz.web]\ncommand = ['x']\n") == "fleet.toml:2: memberz: unknown key"


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('stop_timeout = "5 s"', "stop_timeout", "invalid duration '5 s'"),
        ('start_timeout = "-1s"', "start_timeout", "invalid duration"),
        ('ready = "http"', "ready", "invalid ready 'http'"),
        ('ready = "log:(unclosed"', "ready", "bad regular expression"),
        ('restart = "sometimes"', "restart", "invalid restart 'sometimes'"),
        ('stop_signal = "SIGTERM"', "stop_signal", "invalid stop_signal 'SIGTERM'"),
        ("env = { A = 1 }", "env", "expected str, got int"),
        ("prepare = []", "prepare", "non-empty list"),
        ('cwd = "/tmp/a\\u0000b"', "cwd", "cwd must not contain a NUL byte"),
        ('cwd = ""', "cwd", "cwd must be a non-empty path"),
        ('ready = "unix:/run/a\\u0000.sock"', "ready", "must not contain a NUL byte"),
        ('env = { A = "a\\u0000b" }', "env", "without NUL"),
        ('prepare = ["a\\u0000b"]', "prepare", "without NUL"),
        ("limits = { nofile = -1 }", "limits.nofile", "must not be negative: -1"),
        ("limits = { core = 1.5 }", "limits.core", 'an integer or "infinity", not 1.5'),
        ('limits = { core = "lots" }', "limits.core", "not 'lots'"),
        ("limits = { open_files = 10 }", "limits.open_files", "unknown limit 'open_files'"),
        ("limits = { nofile = [2048, 1024] }", "limits.nofile", "soft 2048 is above hard 1024"),
        ('limits = { nproc = ["infinity", 5] }', "limits.nproc", "soft infinity is above hard 5"),
        ("limits = { nofile = [1, 2, 3] }", "limits.nofile", "a value or [soft, hard]"),
        ("limits = 5", "limits", "expected object, got int"),
        ("user = 1.5", "user", "expected int | str | null, got float"),
        ('user = ""', "user", "user must be a name or a number"),
        ("group = -3", "group", "group -3 is not a valid id"),
    ],
)
def test_a_bad_value_is_reported_with_its_key_and_line(line: str, key: str, words: str) -> None:
    text = BRIEF_EXAMPLE + line + "\n"
    message = problem_in(text)
    assert message.startswith(f"fleet.toml:14: members.db.{key}: "), message
    assert words in message


def test_a_command_must_be_an_argv_list_not_a_shell_string() -> None:
    message = problem_in('[members.web]\ncommand = "python3 -m http.server"\n')
    assert message.startswith("fleet.toml:2: members.web.command: ")


def test_a_missing_command_names_the_members_table() -> None:
    message = problem_in('\n\n[members.web]\nready = "tcp"\n')
    assert message == "fleet.toml:3: members.web: missing required key 'command'"


def test_a_bad_member_name_is_named_with_its_line() -> None:
    message = problem_in('[members.Web_Server]\ncommand = ["x"]\n')
    assert message.startswith("fleet.toml:1: members.Web_Server: invalid member name 'Web_Server'")


def test_keys_written_as_dotted_keys_are_located_too() -> None:
    text = '[members]\nweb.command = ["x"]\nweb.stop_timeout = "forever"\n'
    assert problem_in(text).startswith("fleet.toml:3: members.web.stop_timeout: ")


def test_a_duplicate_member_is_refused() -> None:
    message = problem_in('[members.a]\ncommand = ["x"]\n[members.a]\ncommand = ["y"]\n')
    assert "line 3" in message
    with pytest.raises(InvalidRequest, match="duplicate member name 'a'"):
        ClusterSpec(name="c", members=[MemberSpec(name="a", command=["x"])] * 2)


def test_toml_syntax_errors_carry_tomllibs_line() -> None:
    assert "line 2" in problem_in("[members.a]\ncommand = = 1\n")


def test_no_members_is_an_error() -> None:
    assert "no members defined" in problem_in('name = "empty"\n')


def test_a_file_is_named_in_its_errors(tempdir: str) -> None:
    path = os.path.join(tempdir, "fleet.toml")
    with open(path, "w") as f:
        f.write('[members.a]\ncommand = ["x"]\nbogus = 1\n')
    with pytest.raises(InvalidRequest, match=re.escape(f"{path}:3: members.a.bogus: unknown key")):
        load_toml(path)
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_toml(os.path.join(tempdir, "missing.toml"))


def test_a_dict_loads_like_the_file_and_errors_name_the_key() -> None:
    spec = cluster_from_dict({"members": {"a": {"command": ["x"], "stop_timeout": "1m"}}})
    assert spec.members[0].stop_timeout == 60.0 and spec.name == "default"
    with pytest.raises(InvalidRequest, match=r"^definitions: members\.a\.ready: invalid ready"):
        cluster_from_dict({"members": {"a": {"command": ["x"], "ready": "tcpp"}}})


def test_a_name_argument_overrides_the_files_name() -> None:
    assert parse_toml(BRIEF_EXAMPLE, name="other").name == "other"
    with pytest.raises(InvalidRequest, match="invalid cluster name"):
        parse_toml(BRIEF_EXAMPLE, name="Not OK")


def test_a_member_spec_validates_itself_when_built_in_code() -> None:
    with pytest.raises(InvalidRequest, match=re.escape("invalid member name '../etc'")):
        MemberSpec(name="../etc", command=["x"])
    with pytest.raises(InvalidRequest, match="non-empty list"):
        MemberSpec(name="a", command=[])


def test_a_nul_byte_on_the_wire_is_refused_naming_its_field() -> None:
    bad = b'{"op":"addmember","id":4,"spec":{"name":"a","command":["x"],"cwd":"/a\\u0000"}}'
    with pytest.raises(InvalidRequest, match="cwd must not contain a NUL byte"):
        decode_member_request(bad)


def test_member_requests_decode_and_a_bad_spec_is_an_invalid_request() -> None:
    frame = encode(AddMember(id=3, spec=MemberSpec(name="a", command=["x"])))
    assert decode_member_request(frame[:-1]) == AddMember(
        id=3, spec=MemberSpec(name="a", command=["x"])
    )
    bad = b'{"op":"addmember","id":4,"spec":{"name":"A B","command":["x"]}}'
    with pytest.raises(InvalidRequest, match="invalid member name 'A B'"):
        decode_member_request(bad)
    with pytest.raises(UnknownOp):
        decode_member_request(b'{"op":"hello","id":1,"version":1}')
    assert decode_member_request(b'{"op":"status","id":1,"extra":true}') == Status(id=1)


def test_members_run_in_the_files_directory_unless_their_cwd_says_otherwise() -> None:
    text = (
        '[members.a]\ncommand = ["x"]\n'
        '[members.b]\ncommand = ["x"]\ncwd = "sub/dir"\n'
        '[members.c]\ncommand = ["x"]\ncwd = "/abs"\n'
        '[members.d]\ncommand = ["x"]\ncwd = "{dir}/work"\n'
    )
    spec = parse_toml(text, directory="/project")
    assert [m.cwd for m in spec.members] == ["/project", "/project/sub/dir", "/abs", "{dir}/work"]
    assert [m.cwd for m in parse_toml(text).members] == [None, "sub/dir", "/abs", "{dir}/work"]


def test_an_env_file_is_resolved_like_cwd() -> None:
    text = '[members.a]\ncommand = ["x"]\nenv_file = ".env"\n'
    assert parse_toml(text, directory="/project").members[0].env_file == "/project/.env"
    assert parse_toml(text).members[0].env_file == ".env"


def test_an_env_file_is_key_value_lines_as_compose_reads_them() -> None:
    text = "# a comment\n\nA=1\nexport B = two words \nC=\"quoted\"\nD='single'\nE=\nF=a=b\n"
    assert parse_env_file(text) == {
        "A": "1",
        "B": "two words",
        "C": "quoted",
        "D": "single",
        "E": "",
        "F": "a=b",
    }


@pytest.mark.parametrize("line", ["JUST_A_NAME", "=value", "TWO WORDS=x"])
def test_an_env_file_line_that_is_not_key_value_is_refused_by_number(line: str) -> None:
    with pytest.raises(ValueError, match="line 2 is not KEY=VALUE"):
        parse_env_file(f"OK=1\n{line}\n")
