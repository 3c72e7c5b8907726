"""pytest plugin: the `fleet_cluster` fixture, a factory of bound clusters torn down at test end.

    def test_api(fleet_cluster):
        web = fleet_cluster({"members": {"web": {"command": [...], "ready": "tcp"}}})
        url = "http://" + web.address("web")

Each call starts a cluster (see fleetctl.bound.cluster) and, unless `wait=False`, waits until
every member runs. Whatever the test does, its clusters are stopped when it ends; if the
test process dies, the holders stop them on their own.

When a collected test asks for `fleet_cluster`, this process's holder template (see
fleetctl.template) starts as collection ends: it loads the holder program while the first
tests run, and every cluster of the session is forked from it.
"""

import contextlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from fleetctl.bound import DEFAULT_TIMEOUT, Definitions, SyncCluster, cluster
from fleetctl.template import bound_template

ClusterFactory = Callable[..., SyncCluster]


@pytest.fixture
def fleet_cluster() -> Iterator[ClusterFactory]:
    """`fleet_cluster(definitions, *, name=None, wait=True, timeout=30.0, **options)` starts a
    cluster bound to the test and returns its blocking handle (a SyncCluster)."""
    with ExitStack() as clusters:

        def start(
            definitions: Definitions,
            *,
            name: str | None = None,
            wait: bool = True,
            timeout: float = DEFAULT_TIMEOUT,
            **options: Any,
        ) -> SyncCluster:
            started = clusters.enter_context(cluster(definitions, name=name, **options))
            if wait:
                started.wait_running(timeout=timeout)
            return started

        yield start


def pytest_collection_finish(session: pytest.Session) -> None:
    if any("fleet_cluster" in getattr(item, "fixturenames", ()) for item in session.items):
        with contextlib.suppress(OSError):  # the first cluster will try again, or exec
            bound_template()
