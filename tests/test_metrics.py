"""fleetd's metrics: the Prometheus text format as Prometheus's own parser reads it, over the
control socket (`fleetctl metrics`) and over HTTP (`fleetd --metrics-listen`)."""

import json
import os
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetctl import SyncClient
from fleetd.core.metrics import Counter, Histogram, Registry, gauge
from fleetd.metrics_http import MAX_CONNECTIONS
from tests.processes import Fleetd, fleetctl, run_fleetd, wait_until

Families = dict[str, list[tuple[str, dict[str, str], float]]]


def parsed(text: str) -> Families:
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


async def test_counters_histograms_and_gauges_render_as_prometheus_parses_them() -> None:
    requests = Counter("t_requests_total", "Requests.", ("op", "outcome"))
    latency = Histogram("t_seconds", "Latency.", ("op",), buckets=(0.001, 0.01))
    requests.inc("ping", "ok")
    requests.inc("ping", "ok")
    requests.inc("lease_acquire", "contested")
    for value in (0.0005, 0.001, 0.005, 5.0):
        latency.observe(value, "ping")
    registry = Registry([requests, latency])

    async def members() -> list:  # type: ignore[type-arg]
        return [gauge("t_members", "Members by state.", [({"state": "running"}, 3)])]

    registry.add(members)
    families = parsed(await registry.render())

    assert families["t_requests"] == [
        ("t_requests_total", {"op": "ping", "outcome": "ok"}, 2.0),
        ("t_requests_total", {"op": "lease_acquire", "outcome": "contested"}, 1.0),
    ]
    assert families["t_seconds"] == [
        ("t_seconds_bucket", {"op": "ping", "le": "0.001"}, 2.0),
        ("t_seconds_bucket", {"op": "ping", "le": "0.01"}, 3.0),
        ("t_seconds_bucket", {"op": "ping", "le": "+Inf"}, 4.0),
        ("t_seconds_count", {"op": "ping"}, 4.0),
        ("t_seconds_sum", {"op": "ping"}, pytest.approx(5.0065)),
    ]
    assert families["t_members"] == [("t_members", {"state": "running"}, 3.0)]


@pytest.mark.parametrize("value", ['a "quoted" name', "back\\slash", "two\nlines", "ünïcode"])
async def test_label_values_are_escaped_so_that_they_parse_back(value: str) -> None:
    counter = Counter("t_total", "With a \\ and a\nnewline in its help.", ("name",))
    counter.inc(value)
    families = parsed(await Registry([counter]).render())
    assert families["t"] == [("t_total", {"name": value}, 1.0)]


async def test_an_empty_metric_still_says_what_it_is() -> None:
    text = await Registry([Counter("t_total", "Nothing yet.", ("op",))]).render()
    assert text == "# HELP t_total Nothing yet.\n# TYPE t_total counter\n"
    assert parsed(text) == {"t": []}


async def test_a_counter_without_labels_is_zero_before_anything_happened() -> None:
    text = await Registry([Counter("t_total", "Nothing yet.")]).render()
    assert parsed(text) == {"t": [("t_total", {}, 0.0)]}


# -- from fleetd ---------------------------------------------------------------------------------


def scrape(daemon: Fleetd) -> Families:
    result = fleetctl("metrics", env=daemon.env)
    assert result.returncode == 0, result.stderr
    return parsed(result.stdout)


def value(families: Families, name: str, **labels: str) -> float:
    """The sum of the samples called `name` that carry `labels` (among others)."""
    return sum(
        v
        for samples in families.values()
        for n, given, v in samples
        if n == name and labels.items() <= given.items()
    )


def test_fleetctl_metrics_counts_requests_leases_claims_and_store_batches(fleetd: Fleetd) -> None:
    with SyncClient(fleetd.socket_path) as client:
        client.lease_acquire("build", "agent", ttl=60)
        client.lease_acquire("build", "other", ttl=60)  # contested
        client.claim_acquire("file", "notes", "agent", b"x")
    families = scrape(fleetd)

    assert value(families, "fleet_requests_total", op="lease_acquire", outcome="acquired") == 1
    assert value(families, "fleet_requests_total", op="lease_acquire", outcome="contested") == 1
    assert value(families, "fleet_request_duration_seconds_count", op="lease_acquire") == 2
    assert value(families, "fleet_leases", state="held") == 1
    assert value(families, "fleet_claims", kind="file", state="held") == 1
    assert value(families, "fleet_store_batch_jobs_count") >= 2
    assert value(families, "fleet_store_commit_seconds_sum") > 0
    assert 0 <= value(families, "fleet_lease_heartbeat_age_max_seconds") < 60


def test_members_by_state_and_their_exits_by_code(holders: Fleetd) -> None:
    text = (
        'name = "m"\n'
        '[members.up]\ncommand = ["sleep", "60"]\n'
        '[members.crash]\ncommand = ["sh", "-c", "sleep 0.2; exit 3"]\nrestart = "always"\n'
    )
    path = os.path.join(holders.root, "fleet.toml")
    with open(path, "w") as f:
        f.write(text)
    assert fleetctl("up", "-f", path, "--wait", env=holders.env).returncode == 0
    wait_until(lambda: value(scrape(holders), "fleet_member_restarts_total") >= 2, timeout=20)
    families = scrape(holders)

    assert value(families, "fleet_member_exits_total", code="3") >= 1
    assert value(families, "fleet_members", state="running") >= 1
    assert value(families, "fleet_clusters", state="live") == 1
    assert value(families, "fleet_holders", reached="yes") == 1
    assert value(families, "fleet_holders", reached="no") == 0


def test_metrics_listen_serves_the_same_text_over_http(tempdir: str) -> None:
    daemon = Fleetd(tempdir, extra_env={"FLEET_METRICS_LISTEN": "127.0.0.1:0"}).start()
    try:
        lines = daemon.log().splitlines()
        (line,) = [json.loads(text) for text in lines if "metrics_listening" in text]
        url = f"http://{line['address']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            families = parsed(answer.read().decode())
        assert "fleet_requests" in families and "fleet_members" in families
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"http://{line['address']}/nope", timeout=10)
    finally:
        daemon.stop()
        daemon.close()


def test_a_broken_scraper_leaves_fleetd_serving(tempdir: str) -> None:
    daemon = Fleetd(tempdir, extra_env={"FLEET_METRICS_LISTEN": "127.0.0.1:0"}).start()
    try:
        lines = daemon.log().splitlines()
        (line,) = [json.loads(text) for text in lines if "metrics_listening" in text]
        host, port = line["address"].rsplit(":", 1)
        for garbage in (b"", b"\xff\xfe garbage\r\n\r\n", b"GET /metrics", b"x" * 20_000):
            with socket.create_connection((host, int(port)), timeout=10) as conn:
                conn.sendall(garbage)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(65536)
        with urllib.request.urlopen(f"http://{line['address']}/metrics", timeout=10) as answer:
            assert answer.status == 200
        assert fleetctl("ping", env=daemon.env).returncode == 0
    finally:
        daemon.stop()
        daemon.close()


def test_connections_over_the_cap_are_answered_503_and_the_rest_still_served(
    tempdir: str,
) -> None:
    daemon = Fleetd(tempdir, extra_env={"FLEET_METRICS_LISTEN": "127.0.0.1:0"}).start()
    try:
        lines = daemon.log().splitlines()
        (line,) = [json.loads(text) for text in lines if "metrics_listening" in text]
        host, port = line["address"].rsplit(":", 1)
        address = (host, int(port))
        idle = [socket.create_connection(address, timeout=10) for _ in range(MAX_CONNECTIONS)]
        try:
            wait_until(lambda: _answer_to_one_more(host, int(port)).startswith(b"HTTP/1.0 503"))
        finally:
            for conn in idle:
                conn.close()
        wait_until(lambda: _answer_to_one_more(host, int(port)).startswith(b"HTTP/1.0 200"))
    finally:
        daemon.stop()
        daemon.close()


def _answer_to_one_more(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("listen", ["9101", "localhost", "127.0.0.1:http", ":0", "127.0.0.1:70000"])
def test_a_bad_metrics_address_stops_fleetd_with_one_line(tempdir: str, listen: str) -> None:
    result = run_fleetd({**Fleetd(tempdir).env, "FLEET_METRICS_LISTEN": listen})
    assert result.returncode == 78
    assert result.stderr.startswith("fleetd: --metrics-listen wants HOST:PORT"), result.stderr
