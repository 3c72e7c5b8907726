"""The socket unit's group: with SocketGroup= and SocketMode=0660, its members may use fleetd
as root's own processes do; anyone else the socket lets connect is still refused."""

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.processes import FLEETCTL, Fleetd, short_tempdir

SETPRIV = shutil.which("setpriv")
pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="needs root, to run fleetctl as another user"),
    pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux): CI installs it"),
]

NOBODY = 65534
FLEET_GROUP = 4242


def fleetctl_as_nobody(daemon: Fleetd, *groups: int) -> subprocess.CompletedProcess[str]:
    assert SETPRIV is not None
    supplementary = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    argv = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", *supplementary, *FLEETCTL]
    return subprocess.run(
        [*argv, "ping"],
        cwd=daemon.root,
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def grouped() -> Iterator[Fleetd]:
    """fleetd on a socket of group FLEET_GROUP that everyone may connect to (0666): what
    fleetd admits is then fleetd's decision, not the file's."""
    root = short_tempdir()
    os.chmod(root, 0o755)
    daemon = Fleetd(root).start_activated(mode=0o666, group=FLEET_GROUP)
    try:
        yield daemon
    finally:
        daemon.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_member_of_the_sockets_group_is_admitted(grouped: Fleetd) -> None:
    done = fleetctl_as_nobody(grouped, FLEET_GROUP)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("pong from fleetd")


def test_anyone_else_the_socket_lets_connect_is_refused(grouped: Fleetd) -> None:
    done = fleetctl_as_nobody(grouped)
    assert done.returncode == 1
    assert f"uid {NOBODY} may not use this socket" in done.stderr
    assert f"and group {FLEET_GROUP}" in done.stderr


def test_a_socket_that_grants_its_group_nothing_admits_no_group(tempdir: str) -> None:
    os.chmod(tempdir, 0o755)
    daemon = Fleetd(tempdir).start_activated(mode=0o606, group=FLEET_GROUP)
    try:
        done = fleetctl_as_nobody(daemon)
    finally:
        daemon.close()
    assert done.returncode == 1
    assert "may not use this socket (it serves uid 0 and root)" in done.stderr
