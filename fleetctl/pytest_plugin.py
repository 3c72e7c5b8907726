"""pytest plugin: the `fleet_cluster` fixture, a factory of bound clusters torn down at test end.

    def test_api(fleet_cluster):
        web = fleet_cluster({"members": {"web": {"command": [...], "ready": "tcp"}}})
        url = "http://" + web.address("web")

Each call starts a cluster (see fleetctl.bound.cluster) and, unless `wait=False`, waits until
every member runs. Whatever the test does, its clusters are stopped when it ends; if the
test process dies, the holders stop them on their own. `fleet_cluster_module` and
`fleet_cluster_session` are the same factory, whose clusters last for the module or the
session. A definitions file given by a relative path is found beside the test file (the
session's: under the rootdir).

When a test fails, the report gets a section per cluster it used, with the end of each
member's stdout and stderr, and the cluster's runtime directory (logs, state files) is kept
and named there; it is removed once every test that used it passed.

When a collected test asks for a fleet_cluster fixture, this process's holder template (see
fleetctl.template) starts as collection ends: it loads the holder program while the first
tests run, and every cluster of the session is forked from it.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from fleetctl.bound import DEFAULT_TIMEOUT, Definitions, SyncCluster, cluster, runtime_base
from fleetctl.template import bound_template
from protocol.members import member_log_path

FIXTURES = ("fleet_cluster", "fleet_cluster_module", "fleet_cluster_session")
LOG_LINES = 50
"""Lines of each member's stdout and stderr a failed test's report shows (the whole logs
stay in the kept runtime directory)."""


class ClusterFactory:
    """`factory(definitions, *, name=None, wait=True, timeout=30.0, **options)` starts a
    cluster and returns its blocking handle (a SyncCluster); `clusters` are those started."""

    def __init__(self, clusters: ExitStack, here: Path) -> None:
        self._stack = clusters
        self._here = here
        self.clusters: list[SyncCluster] = []
        self.failed = False
        """A test that used it failed: its runtime directories are kept."""

    def __call__(
        self,
        definitions: Definitions,
        *,
        name: str | None = None,
        wait: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> SyncCluster:
        if isinstance(definitions, str | os.PathLike):
            definitions = self._here / definitions  # an absolute path stays as it is
        runtime_dir = options.pop("runtime_dir", None) or _fresh_runtime_dir()
        self._stack.callback(self._remove_unless_failed, runtime_dir)
        started = self._stack.enter_context(
            cluster(definitions, name=name, runtime_dir=runtime_dir, **options)
        )
        self.clusters.append(started)
        if wait:
            started.wait_running(timeout=timeout)
        return started

    def _remove_unless_failed(self, runtime_dir: str) -> None:
        if not self.failed:
            shutil.rmtree(runtime_dir, ignore_errors=True)

    def report_sections(self) -> list[tuple[str, str]]:
        return [
            (f"fleet cluster {c.name} (kept: {c.runtime_dir})", _logs_of(c)) for c in self.clusters
        ]


def _fresh_runtime_dir() -> str:
    return tempfile.mkdtemp(prefix="fleet-", dir=runtime_base())


def _logs_of(started: SyncCluster) -> str:
    parts = []
    for member in started.members:
        for stream, stderr in (("stdout", False), ("stderr", True)):
            text = _tail(member_log_path(started.runtime_dir, member, stderr=stderr))
            if text:
                parts.append(f"--- {member} {stream} ---\n{text}")
    return "\n".join(parts) or "(no member printed anything)"


def _tail(path: str) -> str:
    with contextlib.suppress(OSError), open(path, errors="replace") as f:
        return "".join(f.readlines()[-LOG_LINES:]).rstrip("\n")
    return ""


FACTORIES = pytest.StashKey[dict[str, ClusterFactory]]()
"""On the node a factory lasts for (the test, its module, the session), by fixture name: a
failed test finds those it used there, also through a fixture of its own that failed."""


@contextlib.contextmanager
def _factory(request: pytest.FixtureRequest, here: Path) -> Iterator[ClusterFactory]:
    with ExitStack() as clusters:
        factory = ClusterFactory(clusters, here)
        request.node.stash.setdefault(FACTORIES, {})[request.fixturename] = factory
        yield factory


@pytest.fixture
def fleet_cluster(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Clusters bound to the test: see the module."""
    with _factory(request, request.path.parent) as factory:
        yield factory


@pytest.fixture(scope="module")
def fleet_cluster_module(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Clusters that last for the module's tests."""
    with _factory(request, request.path.parent) as factory:
        yield factory


@pytest.fixture(scope="session")
def fleet_cluster_session(request: pytest.FixtureRequest) -> Iterator[ClusterFactory]:
    """Clusters that last for the session; relative files are found under the rootdir."""
    with _factory(request, request.config.rootpath) as factory:
        yield factory


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        used = getattr(item, "fixturenames", ())
        for node in item.listchain():
            for fixture, factory in node.stash.get(FACTORIES, {}).items():
                if fixture in used and factory.clusters:
                    factory.failed = True
                    report.sections.extend(factory.report_sections())
    return report


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(
        name in getattr(item, "fixturenames", ()) for item in session.items for name in FIXTURES
    ):
        with contextlib.suppress(OSError):  # the first cluster will try again, or exec
            bound_template()
