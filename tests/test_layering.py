"""The tree shows the architecture: these imports are the contract between the packages.

    protocol        pure data, framing and the client's I/O-free core; imports nothing of ours
    fleetctl        the CLI and client library; imports protocol
    fleetd.core     what both fleetd programs stand on; imports protocol, public fleetctl
    fleetd.holder   the holder program; imports fleetd.core
    fleetd (rest)   the daemon program; imports fleetd.core, never fleetd.holder

Every edge points one way, and is checked from both ends: statically over every module's
imports (wherever they are written, inside functions too), and at run time by importing an
entry point in a fresh interpreter and looking at `sys.modules`.
"""

import ast
import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.processes import Fleetd

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "fleetctl", "fleetd")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> Iterator[tuple[str, pathlib.Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield module_name(path), path


def imports_of(module: str, path: pathlib.Path) -> set[str]:
    """The absolute names `module` imports; for `from X import y`, both X and X.y (y may be a
    submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


EDGES = {module: imports_of(module, path) for module, path in sources()}
MODULES = set(EDGES)


def layer(module: str) -> str:
    top = module.split(".", maxsplit=1)[0]
    if top != "fleetd":
        return top
    if module.startswith(("fleetd.core", "fleetd.holder")):
        return ".".join(module.split(".")[:2])
    return "fleetd daemon"


ALLOWED = {
    "protocol": {"protocol"},
    "fleetctl": {"protocol", "fleetctl"},
    "fleetd.core": {"protocol", "fleetctl", "fleetd.core"},
    "fleetd.holder": {"protocol", "fleetctl", "fleetd.core", "fleetd.holder"},
    "fleetd daemon": {"protocol", "fleetctl", "fleetd.core", "fleetd daemon"},
}


def crossings() -> Iterator[tuple[str, str]]:
    for module, imported in EDGES.items():
        for name in imported:
            if name in MODULES:
                yield module, name


def test_every_module_sits_in_a_known_layer() -> None:
    assert {layer(module) for module in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("importer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_beneath_it(importer: str) -> None:
    wrong = sorted(
        f"{module} imports {name}"
        for module, name in crossings()
        if layer(module) == importer and layer(name) not in ALLOWED[importer]
    )
    assert wrong == []


def is_private(name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in name.split("."))


def owner(name: str) -> str:
    """The package a private module belongs to: only its siblings may import it."""
    parts = name.split(".")
    first_private = next(i for i, part in enumerate(parts) if part.startswith("_"))
    return ".".join(parts[:first_private])


def test_no_package_imports_another_packages_private_module() -> None:
    wrong = sorted(
        f"{module} imports {name}"
        for module, name in crossings()
        if name in MODULES and is_private(name) and not (module + ".").startswith(owner(name) + ".")
    )
    assert wrong == []


# --- at run time: what an entry point really loads ----------------------------------------


def modules_after(statement: str) -> set[str]:
    probe = f"import sys; {statement}; import json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    baseline = subprocess.run(
        [sys.executable, "-c", "import sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(result.stdout)) - set(json.loads(baseline.stdout))


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


@pytest.mark.parametrize(
    "module",
    [
        "protocol.framing",
        "protocol.messages",
        "protocol.errors",
        "protocol.tasks",
        "protocol.runfile",
    ],
)
def test_protocol_imports_only_msgspec(module: str) -> None:
    third_party = top_level(modules_after(f"import {module}")) & {
        "anyio",
        "click",
        "structlog",
        "uvloop",
        "fleetd",
        "fleetctl",
        "socket",
        "asyncio",
    }
    assert third_party == set()


@pytest.mark.parametrize(
    "module", ["fleetctl", "fleetctl.cli", "fleetctl.client", "fleetctl.sync", "fleetctl.template"]
)
def test_fleetctl_never_imports_fleetd(module: str) -> None:
    assert "fleetd" not in top_level(modules_after(f"import {module}"))


@pytest.mark.parametrize("program", ["fleetd.holder.program", "fleetd.holder.template"])
def test_the_holder_program_loads_none_of_the_daemon(program: str) -> None:
    loaded = modules_after(f"import {program}")
    assert {
        name for name in loaded if name.startswith("fleetd.") and layer(name) == "fleetd daemon"
    } == set()


def test_the_daemon_loads_none_of_the_holder_program() -> None:
    loaded = modules_after("import fleetd.daemon, fleetd.cli")
    assert not {name for name in loaded if name.startswith("fleetd.holder")}


DAEMON_AT_RUN_TIME = (
    "import fleetd.cli, fleetd.daemon, fleetd.core.startup as s; "
    "s.load_what_anyio_loads_as_it_runs(); "
    "fleetd.cli.plain_start(['--socket', 'fleetd.sock', '--log-level', 'debug'])"
)
"""What a plainly started daemon has loaded once it serves: its modules, and what anyio loads
as it runs (its asyncio backend, its signal receiver, uvloop)."""
HOLDER_AT_RUN_TIME = (
    "import fleetd.holder.template, fleetd.holder.program, fleetd.core.startup as s; "
    "s.load_what_anyio_loads_as_it_runs()"
)
"""What the template loads before it forks a holder: all that a forked holder has."""
KEPT_OUT = {
    "click": "only fleetd.commands reads a line with click: help, --version, reset-state",
    "ctypes.util": "find_library ran ldconfig, and brought tempfile, random and shutil",
    "tempfile": "ctypes.util's",
    "grpc": "only the etcd store loads gRPC (~19 MB): fleetd.store.etcd, for --store etcd://",
    "aetcd": "the etcd store's client",
}
"""Modules no long-running program loads, each a part of its memory for its whole life."""


@pytest.mark.parametrize(
    "program", [DAEMON_AT_RUN_TIME, HOLDER_AT_RUN_TIME], ids=["daemon", "holder"]
)
def test_the_long_running_programs_keep_out_what_they_never_use(program: str) -> None:
    assert modules_after(program) & set(KEPT_OUT) == set()


def test_sync_client_does_not_load_anyio() -> None:
    assert "anyio" not in top_level(modules_after("import fleetctl.sync"))


SLOW_TO_IMPORT = {"click", "msgspec", "anyio", "structlog", "json", "typing"}


def test_fast_commands_load_neither_click_nor_msgspec() -> None:
    loaded = modules_after("from fleetctl import _fast")
    assert not top_level(loaded) & SLOW_TO_IMPORT
    # Outcome (an enum) is imported only to exit with another outcome than ok; paths needs
    # no collections.abc.
    assert not loaded & {"protocol.outcomes", "collections.abc"}


FAST_COMMANDS = [
    ["ping"],
    ["--json", "version"],
    ["status"],
    ["--json", "--timeout", "5s", "status"],
    ["--json", "wait", "nobody", "--timeout", "1s"],
    ["up", "-f", "/nonexistent/fleet.toml", "--wait", "--timeout", "1s"],
    ["lease", "acquire", "build", "--owner", "a", "--ttl", "30s"],
    ["lease", "heartbeat", "build", "--owner", "a", "--token", "1"],
    ["lease", "release", "build", "--owner", "a"],
    ["lease", "inspect", "build"],
    ["claims", "acquire", "--kind", "file", "--key", "k", "--owner", "a"],
    ["claims", "inspect", "--kind", "file", "--key", "k"],
    ["claims", "release", "--kind", "file", "--key", "k", "--owner", "a"],
    ["runs", "show", "run-1"],
    ["tasks", "list"],
]


@pytest.mark.parametrize("argv", FAST_COMMANDS, ids=" ".join)
def test_each_fast_command_runs_without_click_msgspec_or_typing(
    argv: list[str], fleetd: Fleetd
) -> None:
    assert not top_level(loaded_by(argv, fleetd)) & SLOW_TO_IMPORT, argv


@pytest.mark.parametrize(
    "argv",
    [["runs", "show", "run-1"], ["tasks", "list"], ["--json", "tasks", "list", "--run", "run-1"]],
    ids=" ".join,
)
def test_the_run_commands_read_a_run_without_click_msgspec_or_typing(
    argv: list[str], fleetd: Fleetd
) -> None:
    from fleetctl.sync import SyncClient
    from protocol.runs import Drain, RunSubmit

    run = {
        "name": "r",
        "task_specs": [{"id": f"t{n}", "name": "t", "instructions": "x"} for n in range(3)],
        "worker_specs": [{"id": "w", "name": "w", "host": {"kind": "local"}, "command": ["true"]}],
    }
    with SyncClient(fleetd.socket_path) as client:
        client.request(Drain)
        client.request(RunSubmit, text=json.dumps(run), format="json")
    assert not top_level(loaded_by(argv, fleetd)) & SLOW_TO_IMPORT, argv


def loaded_by(argv: list[str], fleetd: Fleetd) -> set[str]:
    """What a fast command loaded, run to its end against `fleetd`."""
    probe = (
        "import sys; from fleetctl import _fast; "
        f"code = _fast.run(_fast.parse({argv!r})); loaded = sorted(sys.modules); import json; "
        "print(json.dumps(loaded), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env=fleetd.env,
        input=b"content",
        capture_output=True,
        check=True,
    )
    return set(json.loads(done.stderr.decode().splitlines()[-1]))
