"""Coverage-guided fuzzing with atheris (libFuzzer): `make fuzz`, not part of `make test`.

    python -m tests.fuzz_targets TARGET [libFuzzer options]     TARGET: frames, responses,
                                                                 toml or argv

Each target runs the checks of a tests/test_fuzz.py property on the bytes libFuzzer mutates,
with protocol/ and fleetctl/ instrumented so that it learns which inputs reach new code:

    frames     a byte stream through FrameSplitter, each frame through decode_request and
               decode_member_request: decoded (and re-encoded to itself) or the documented
               FleetError
    responses  a byte stream into a client connection (protocol.connection), each answer
               through decode_result
    toml       text through the fleet.toml loader: a cluster that the wire carries as it is
               and the dict form gives alike, or an InvalidRequest naming where
    argv       NUL-separated arguments (as the kernel hands them, not UTF-8 included) through
               fleetctl's command line, against a fake fleetd: a documented exit code, and
               one envelope with --json

The corpus and what libFuzzer finds live in .fuzz/ (ignored by git): a crash is written to
.fuzz/crashes/TARGET-crash-…, and `python -m tests.fuzz_targets TARGET FILE` replays it. Each
crash found becomes a regression test in tests/test_fuzz.py.
"""

import functools
import os
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["protocol", "fleetctl"]):
    # Instrumented, the modules the targets reach (fleetctl.cli imports most lazily):
    import fleetctl._fast
    import fleetctl.cli
    import fleetctl.logs
    import fleetctl.output
    import fleetctl.sync  # noqa: F401
    import protocol.claims
    import protocol.connection
    import protocol.definitions
    import protocol.errors
    import protocol.framing
    import protocol.leases
    import protocol.members
    import protocol.paths

from protocol.outcomes import Outcome
from tests import test_fuzz as checks

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".fuzz")


def frames(data: bytes) -> None:
    splitter = protocol.framing.FrameSplitter(max_frame=4096)
    try:
        found = splitter.feed(data)
    except protocol.errors.FrameTooLarge:
        return
    for frame in found:
        checks.check_decodes_or_refuses(protocol.framing.decode_request, frame)
        checks.check_decodes_or_refuses(protocol.members.decode_member_request, frame)


def responses(data: bytes) -> None:
    checks.check_conversation([data])


def toml(data: bytes) -> None:
    checks.check_fleet_toml(data.decode(errors="replace"))  # as load_toml reads a file


_ANSWERS = [*Outcome, "absent", "contested", "internal", "x"]


def argv(data: bytes) -> None:
    fake = _fake()
    provider = atheris.FuzzedDataProvider(data)
    fake.answer = provider.PickValueInList(_ANSWERS)
    stdin = provider.ConsumeBytes(provider.ConsumeIntInRange(0, 64))
    arguments = [os.fsdecode(arg) for arg in provider.ConsumeBytes(4096).split(b"\0")]
    if "coord-run" in arguments:  # runs its COMMAND: tests/test_coord_run.py covers it
        return
    checks.check_command_line(fake, ["--socket", fake.path, *arguments], stdin)


@functools.cache
def _fake() -> "checks.FakeFleetd":
    directory = os.path.join(FUZZ_DIR, "argv")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "fake.sock")
    if os.path.exists(path):
        os.unlink(path)
    with open(os.path.join(directory, "fleet.toml"), "w") as f:
        f.write('[members.a]\ncommand = ["true"]\n')
    return checks.FakeFleetd(path)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": frames,
    "responses": responses,
    "toml": toml,
    "argv": argv,
}


# -- seeds: valid inputs for libFuzzer to start from ----------------------------------------


def _seeds(target: str) -> list[bytes]:
    if target == "frames":
        return [
            b'{"op":"hello","id":1,"version":1,"client":"fleetctl"}\n{"op":"ping","id":2}\n',
            b'{"op":"lease_acquire","id":3,"name":"build","owner":"a","ttl":15.0,"pid":0}\n',
            b'{"op":"claim_acquire","id":4,"kind":"file","key":"k","owner":"o","content":"eA=="}\n',
            b'{"op":"cluster_up","id":5,"spec":{"name":"c","members":[{"name":"a","command":'
            b'["sleep","1"],"ready":"log:up","stop_signal":"TERM","stop_timeout":5.0}]}}\n',
            b'{"op":"addmember","id":6,"spec":{"name":"b","command":["x"],"env":{"A":"1"}}}\n',
            b'{"op":"member_status","id":7,"names":["c/a"]}\n{"op":"watch","id":8}\n',
            checks.OVERFLOWING_READY + b"\n",
        ]
    if target == "responses":
        return [
            b'{"id":1,"ok":true,"result":{}}\n{"id":2,"ok":false,"error":{"code":"absent",'
            b'"message":"no","details":{"name":"x"}}}\n',
            b'{"id":1,"ok":true,"result":{"outcome":"acquired","lease":{"name":"a","owner":"o",'
            b'"token":3,"ttl":15.0,"state":"held","identity":{"host":"h","boot_id":"b","pid":1,'
            b'"start_time":2}}}}\n',
            b'{"id":2,"ok":true,"result":{"members":[{"name":"a","state":"running","pid":4}]}}\n',
            checks.DETAILS_NAMED_MESSAGE + b"\n",
        ]
    if target == "toml":
        from tests.test_definitions import BRIEF_EXAMPLE

        return [
            BRIEF_EXAMPLE.encode(),
            b'name = "x"\nmembers.a.command = ["a"]\n'
            b'members.b = {command = ["b"], ready = "tcp"}\n',
            b'[members.a]\ncommand = ["x"]\nready = "log:a{4294967296}"\nstop_signal = "_DFL"\n',
        ]
    return [
        b"\0".join(argv)
        for argv in (
            [b"--json", b"lease", b"acquire", b"x", b"--owner", b"o", b"--ttl", b"15s"],
            [b"claims", b"acquire", b"--kind", b"file", b"--key", b"k", b"--owner", b"o"],
            [b"--json", b"status", b"a", b"c/b"],
            [b"up", b"-f", os.path.join(FUZZ_DIR, "argv", "fleet.toml").encode(), b"--wait"],
            [b"--timeout", b"nan", b"wait", b"a", b"--timeout", b"30s"],
            [b"lease", b"inspect", b"\xff"],
        )
    ]


def _dictionary() -> str:
    """Every command and option name of fleetctl, for libFuzzer to splice into argv."""
    words = {"--json", "--socket", "--timeout", "--help", "--", "nan", "inf", "15s", "1e400"}
    for path, command in checks.COMMANDS:
        words.update(path)
        for param in command.params:
            words.update(getattr(param, "opts", []))
    path = os.path.join(FUZZ_DIR, "argv.dict")
    with open(path, "w") as f:
        for word in sorted(words):
            f.write(f'"{word}\\x00"\n')
    return path


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz_targets {{{','.join(TARGETS)}}} [libFuzzer options]")
    target, options = sys.argv[1], sys.argv[2:]
    corpus = os.path.join(FUZZ_DIR, "corpus", target)
    crashes = os.path.join(FUZZ_DIR, "crashes")
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(crashes, exist_ok=True)
    for number, seed in enumerate(_seeds(target)):
        with open(os.path.join(corpus, f"seed-{number}"), "wb") as f:
            f.write(seed)
    replaying = any(not option.startswith("-") for option in options)
    arguments = [sys.argv[0], f"-artifact_prefix={crashes}/{target}-", "-timeout=10", *options]
    if target == "argv":
        arguments.append(f"-dict={_dictionary()}")
    if not replaying:
        arguments.append(corpus)
    atheris.Setup(arguments, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
