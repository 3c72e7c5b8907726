"""The tree shows the architecture: these imports are the contract between the packages."""

import json
import subprocess
import sys

import pytest


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


@pytest.mark.parametrize("module", ["protocol.framing", "protocol.messages", "protocol.errors"])
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


@pytest.mark.parametrize("module", ["fleetctl", "fleetctl.cli", "fleetctl.client", "fleetctl.sync"])
def test_fleetctl_never_imports_fleetd(module: str) -> None:
    assert "fleetd" not in top_level(modules_after(f"import {module}"))


def test_sync_client_does_not_load_anyio() -> None:
    assert "anyio" not in top_level(modules_after("import fleetctl.sync"))


def test_fast_commands_load_neither_click_nor_msgspec() -> None:
    loaded = modules_after("from fleetctl import _fast")
    assert not top_level(loaded) & {"click", "msgspec", "anyio", "structlog", "json", "typing"}
    # Outcome (an enum) is imported only to exit with a failure; paths needs no collections.abc.
    assert not loaded & {"protocol.outcomes", "collections.abc"}
