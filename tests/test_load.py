"""The load run's short form (`make load` runs the long one: 200 clients, 500 members).

As `make load` runs it, a real process: fleetd with one cluster of members, concurrent
`fleetctl.Client`s mixing status, lease and claims operations; no error, and every
acknowledged write read back afterwards.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.load import OPS

SHORT = ["--clients", "50", "--members", "100", "--seconds", "6"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_load_has_no_error_and_loses_no_acknowledged_write(tempdir: str) -> None:
    """The short form of `make load`."""
    report_path = os.path.join(tempdir, "load.json")
    done = subprocess.run(
        [sys.executable, "-m", "tests.load", *SHORT, "--json", report_path],
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with open(report_path) as f:
        report = json.load(f)
    assert (report["errors"], report["lost"]) == (0, [])
    assert report["checked"] == {
        "leases": 100,
        "claims": report["checked"]["claims"],
        "members": 100,
    }
    assert report["checked"]["claims"] > 0
    assert set(report["ops"]) == {*OPS, "all"}, report["ops"]
