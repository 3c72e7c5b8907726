"""A full disk never kills fleetd: writes fail with no_space, reads and holders keep being
served, what could not be written is written once space returns, with no restart."""

import json
import os
import time

from tests.processes import Fleetd, fill_disk, fleetctl

SPEC = '[members.m]\ncommand = ["sleep", "1000"]\nready = "none"\n'


def _json(*args: str, env: dict[str, str]) -> tuple[int, dict[str, object]]:
    result = fleetctl("--json", *args, env=env)
    return result.returncode, json.loads(result.stdout)


def _holder_detail(env: dict[str, str]) -> object:
    _, envelope = _json("claims", "inspect", "--kind", "holder", "--key", "web", env=env)
    claim = envelope.get("claim")
    return claim["detail"] if isinstance(claim, dict) else None


def test_a_holder_leaving_on_a_full_disk_keeps_fleetd_serving_until_space_returns(
    on_small_disk: Fleetd, tempdir: str
) -> None:
    daemon, env = on_small_disk, on_small_disk.env
    spec = os.path.join(tempdir, "fleet.toml")
    with open(spec, "w") as f:
        f.write(SPEC)
    assert fleetctl("up", "-f", spec, "--name", "web", "--wait", env=env).returncode == 0
    filler = fill_disk(daemon.state_dir)

    code, down = _json("down", "web", env=env)
    assert (code, down["outcome"]) == (0, "released")
    code, refused = _json("lease", "acquire", "build", "--owner", "a", env=env)
    assert code == 1 and refused["error"]["code"] == "no_space"  # type: ignore[index]
    assert fleetctl("ping", env=env).returncode == 0
    code, status = _json("status", "web/m", env=env)
    assert status["members"][0]["state"] == "stopped"  # type: ignore[index]
    assert _holder_detail(env) == "live", "the journal could not say it exited yet"
    assert "journal_write_postponed" in daemon.log()

    os.unlink(filler)
    deadline = time.monotonic() + 10
    while _holder_detail(env) != "exited" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _holder_detail(env) == "exited"
    assert "journal_written_late" in daemon.log()
    assert fleetctl("lease", "acquire", "build", "--owner", "a", env=env).returncode == 0
    assert daemon.process is not None and daemon.process.poll() is None, "never restarted"


def test_start_up_on_a_full_disk_serves_reads(on_small_disk: Fleetd) -> None:
    daemon, env = on_small_disk, on_small_disk.env
    assert fleetctl("lease", "acquire", "build", "--owner", "a", env=env).returncode == 0
    daemon.stop()
    filler = fill_disk(daemon.state_dir)
    daemon.start()
    code, envelope = _json("lease", "inspect", "build", env=env)
    assert (code, envelope["outcome"]) == (0, "ok")
    os.unlink(filler)


def test_a_lease_expiring_on_a_full_disk_is_recorded_once_space_returns(
    on_small_disk: Fleetd,
) -> None:
    daemon, env = on_small_disk, on_small_disk.env
    code = fleetctl("lease", "acquire", "brief", "--owner", "a", "--ttl", "1s", env=env)
    assert code.returncode == 0
    filler = fill_disk(daemon.state_dir)
    deadline = time.monotonic() + 10
    while "lease_expiry_postponed" not in daemon.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "lease_expiry_postponed" in daemon.log()
    os.unlink(filler)
    time.sleep(2.5)  # the retry lands
    daemon.stop()
    daemon.start()  # a record still `held` on disk would come back held, for its full TTL
    _, envelope = _json("lease", "inspect", "brief", env=env)
    assert envelope["lease"]["state"] == "expired"  # type: ignore[index]
