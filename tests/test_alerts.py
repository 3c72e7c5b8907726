"""Alerts: each channel's request as a pure function, and the Alerter posting to a local HTTP
server (never the internet: Slack's and PagerDuty's URLs are only built, or pointed here)."""

import hashlib
import hmac
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from fleetd.tasks import alerts
from fleetd.tasks.alerts import (
    ATTEMPTS,
    MAX_PENDING,
    PAGERDUTY_EVENTS_URL,
    Alert,
    Alerter,
    pagerduty_post,
    slack_post,
    task_alert,
    webhook_post,
)
from protocol.tasks import AlertPolicy, PagerDutyChannel, SlackChannel, WebhookChannel

ALERT = Alert(
    alert_id="run-2/t3/attempts/3",
    run_id="run-2",
    task_id="t3",
    reason="attempts",
    attempts=3,
    summary="task t3 of run-2 failed 3 attempts: exited with code 1",
    at="2026-06-12T17:00:00Z",
)
ALERT_JSON = (
    b'{"alert_id":"run-2/t3/attempts/3","run_id":"run-2","task_id":"t3","reason":"attempts",'
    b'"attempts":3,"summary":"task t3 of run-2 failed 3 attempts: exited with code 1",'
    b'"at":"2026-06-12T17:00:00Z"}'
)
SECRET = "s3cret"
QUICK = 0.01
"""first_retry in tests: ATTEMPTS tries take about 0.3 s."""


# --- alerts and requests, pure ----------------------------------------------------------------


def test_an_alert_after_attempts_says_so_in_one_line_with_a_stable_id() -> None:
    alert = task_alert(
        "run-2", "t3", reason="attempts", attempts=3, detail="exited with code 1", now=1781283600
    )
    assert alert == ALERT


def test_a_stale_alert_names_its_attempt() -> None:
    alert = task_alert(
        "run-2", "t3", reason="stale", attempts=1, detail="no heartbeat for 5 minutes", now=0
    )
    assert alert.alert_id == "run-2/t3/stale/1"
    assert alert.summary == "task t3 of run-2 stale on attempt 1: no heartbeat for 5 minutes"
    assert alert.at == "1970-01-01T00:00:00Z"


def test_a_detail_from_worker_output_is_folded_to_one_line() -> None:
    alert = task_alert("r", "t", reason="attempts", attempts=1, detail="a\nb\r\n\tc", now=0)
    assert alert.summary == "task t of r failed 1 attempt: a b c"


def test_a_webhook_post_is_the_alerts_json_named_by_its_id() -> None:
    post = webhook_post(WebhookChannel(url="https://example.test/hook"), ALERT)
    assert post.url == "https://example.test/hook"
    assert post.body == ALERT_JSON
    assert msgspec.json.decode(post.body, type=Alert) == ALERT
    assert post.headers["Content-Type"] == "application/json"
    assert post.headers["X-Fleet-Alert-Id"] == ALERT.alert_id
    assert "X-Fleet-Signature-256" not in post.headers


def test_a_webhook_with_a_secret_is_signed_as_github_signs_its_webhooks() -> None:
    post = webhook_post(WebhookChannel(url="https://example.test/hook", secret=SECRET), ALERT)
    expected = hmac.new(SECRET.encode(), ALERT_JSON, hashlib.sha256).hexdigest()
    assert post.headers["X-Fleet-Signature-256"] == f"sha256={expected}"


def test_an_empty_secret_signs_nothing() -> None:
    post = webhook_post(WebhookChannel(url="https://example.test/hook", secret=""), ALERT)
    assert "X-Fleet-Signature-256" not in post.headers


def test_a_slack_post_is_an_incoming_webhook_message() -> None:
    post = slack_post(SlackChannel(webhook_url="https://hooks.slack.com/services/T/B/X"), ALERT)
    assert post.url == "https://hooks.slack.com/services/T/B/X"
    assert post.body == (
        b'{"text":"fleetd: task t3 of run-2 failed 3 attempts: exited with code 1'
        b' (alert run-2/t3/attempts/3)"}'
    )
    assert post.headers["Content-Type"] == "application/json"


def test_a_slack_message_escapes_what_slack_reads_as_markup() -> None:
    alert = msgspec.structs.replace(ALERT, summary="failed: <!channel> & a>b")
    text = json.loads(slack_post(SlackChannel(webhook_url="https://x.test"), alert).body)["text"]
    assert text == "fleetd: failed: &lt;!channel&gt; &amp; a&gt;b (alert run-2/t3/attempts/3)"


def test_a_pagerduty_post_is_an_events_v2_trigger_deduplicated_by_the_alert_id() -> None:
    post = pagerduty_post(PagerDutyChannel(routing_key="R0UT1NG", severity="critical"), ALERT)
    assert post.url == PAGERDUTY_EVENTS_URL == "https://events.pagerduty.com/v2/enqueue"
    assert post.body == (
        b'{"routing_key":"R0UT1NG","event_action":"trigger","dedup_key":"run-2/t3/attempts/3",'
        b'"payload":{"summary":"task t3 of run-2 failed 3 attempts: exited with code 1",'
        b'"source":"fleetd","severity":"critical","timestamp":"2026-06-12T17:00:00Z",'
        b'"custom_details":' + ALERT_JSON + b"}}"
    )
    assert post.headers["Content-Type"] == "application/json"


def test_a_pagerduty_summary_is_cut_to_pagerdutys_limit() -> None:
    alert = msgspec.structs.replace(ALERT, summary="x" * 2000)
    post = pagerduty_post(PagerDutyChannel(routing_key="R", severity="error"), alert)
    assert json.loads(post.body)["payload"]["summary"] == "x" * 1024


def test_importing_alerts_loads_no_http_client() -> None:
    """fleetd imports the module at start; urllib.request waits for the first alert."""
    probe = (
        "import sys, fleetd.tasks.alerts; "
        "print(sorted({'urllib.request', 'http.client', 'tempfile', 'email'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"


# --- the Alerter against a local HTTP server --------------------------------------------------


@pytest.fixture(autouse=True)
def no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The opener honours $https_proxy as fleetd should; a test's loopback server is never
    reached through one."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Endpoint:
    """A local HTTP server in a thread: it records each request and answers with the next of
    `statuses` (the last one repeated); while `held`, it holds each request unanswered."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[Received] = []
        self.answer = threading.Event()
        self.answer.set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def hold(self) -> None:
        self.answer.clear()

    def release(self) -> None:
        self.answer.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        self.received.append(Received(handler.path, dict(handler.headers), body))
        status = self.statuses[min(len(self.received), len(self.statuses)) - 1]
        self.answer.wait(timeout=30)
        handler.send_response(status)
        if 300 <= status < 400:
            handler.send_header("Location", "/moved")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                endpoint._respond(self)

            def do_GET(self) -> None:
                endpoint._respond(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def endpoint() -> Iterator[Callable[..., Endpoint]]:
    """Endpoints answering `statuses` (200 by default), all closed at the end."""
    opened: list[Endpoint] = []

    def start(*statuses: int) -> Endpoint:
        opened.append(Endpoint(list(statuses) or [200]))
        return opened[-1]

    yield start
    for each in opened:
        each.close()


class Deliveries:
    """An on_delivered that records its calls and lets a test wait for them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Alert, str, str]] = []

    async def __call__(self, alert: Alert, kind: str, alert_id: str) -> None:
        self.calls.append((alert, kind, alert_id))


@asynccontextmanager
async def serving(alerter: Alerter) -> AsyncIterator[Alerter]:
    async with anyio.create_task_group() as tg:
        await tg.start(alerter.serve)
        yield alerter
        tg.cancel_scope.cancel()


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (state the alerter's tasks change)
            await anyio.sleep(0.005)


def webhook(url: str, secret: str | None = SECRET) -> AlertPolicy:
    return AlertPolicy(channels=[WebhookChannel(url=url, secret=secret)], after_attempts=3)


def refused_url() -> str:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


async def test_a_webhook_is_received_as_the_alert_with_a_valid_signature(
    endpoint: Callable[..., Endpoint],
) -> None:
    server, delivered = endpoint(), Deliveries()
    async with serving(Alerter(on_delivered=delivered)) as alerter:
        alerter.fire(webhook(server.url()), ALERT)
        await eventually(lambda: len(delivered.calls) == 1)
    [request] = server.received
    assert msgspec.json.decode(request.body, type=Alert) == ALERT
    expected = "sha256=" + hmac.new(SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Fleet-Signature-256"], expected)
    assert request.headers["X-Fleet-Alert-Id"] == ALERT.alert_id
    assert delivered.calls == [(ALERT, "webhook", ALERT.alert_id)]


async def test_an_endpoint_answering_500_twice_gets_three_posts_and_one_delivery(
    endpoint: Callable[..., Endpoint],
) -> None:
    server, delivered = endpoint(500, 500, 200), Deliveries()
    async with serving(Alerter(on_delivered=delivered, first_retry=QUICK)) as alerter:
        alerter.fire(webhook(server.url()), ALERT)
        await eventually(lambda: alerter.statistics().pending == 0)
        assert alerter.statistics().delivered == 1
    assert len(server.received) == 3
    assert {request.body for request in server.received} == {ALERT_JSON}
    assert delivered.calls == [(ALERT, "webhook", ALERT.alert_id)]


async def test_an_endpoint_never_answering_2xx_gets_ATTEMPTS_posts_then_the_alert_is_dropped(
    endpoint: Callable[..., Endpoint],
) -> None:
    server, delivered = endpoint(503), Deliveries()
    with capture_logs() as logs:
        async with serving(Alerter(on_delivered=delivered, first_retry=QUICK)) as alerter:
            alerter.fire(webhook(server.url()), ALERT)
            await eventually(lambda: alerter.statistics().pending == 0)
            assert alerter.statistics().undelivered == 1
    assert len(server.received) == ATTEMPTS == 6
    assert delivered.calls == []
    [given_up] = [line for line in logs if line["event"] == "alert_undelivered"]
    assert given_up["tries"] == ATTEMPTS
    assert given_up["error"] == "answered 503"
    assert given_up["log_level"] == "error"


async def test_a_redirect_is_a_failed_try_not_followed(
    endpoint: Callable[..., Endpoint],
) -> None:
    """urllib would follow a 302 with a GET, and a 200 there would pass for a delivery."""
    server = endpoint(302)
    async with serving(Alerter(first_retry=QUICK)) as alerter:
        alerter.fire(webhook(server.url()), ALERT)
        await eventually(lambda: alerter.statistics().pending == 0)
        assert alerter.statistics().undelivered == 1
    assert {request.path for request in server.received} == {"/hook"}


async def test_fire_returns_at_once_while_the_endpoint_stalls(
    endpoint: Callable[..., Endpoint],
) -> None:
    server = endpoint()
    server.hold()
    async with serving(Alerter(first_retry=QUICK)) as alerter:
        for _ in range(alerts.CONCURRENT_POSTS):
            alerter.fire(webhook(server.url()), ALERT)
        await eventually(lambda: len(server.received) == alerts.CONCURRENT_POSTS)
        started = time.perf_counter()
        alerter.fire(webhook(server.url()), ALERT)
        took = time.perf_counter() - started
        server.release()
        await eventually(lambda: alerter.statistics().delivered == alerts.CONCURRENT_POSTS + 1)
    assert took < 0.010


async def test_serve_stops_at_once_though_a_post_stalls(
    endpoint: Callable[..., Endpoint],
) -> None:
    server = endpoint()
    server.hold()
    async with serving(Alerter()) as alerter:
        alerter.fire(webhook(server.url()), ALERT)
        await eventually(lambda: len(server.received) == 1)
        started = time.perf_counter()
    assert time.perf_counter() - started < 1.0
    assert alerter.statistics().pending == 0


def test_past_MAX_PENDING_a_new_delivery_is_dropped_with_a_warning() -> None:
    alerter = Alerter()
    policy = webhook("http://127.0.0.1:9/hook")
    for _ in range(MAX_PENDING):
        alerter.fire(policy, ALERT)
    with capture_logs() as logs:
        alerter.fire(policy, ALERT)
    assert alerter.statistics().pending == MAX_PENDING
    assert alerter.statistics().dropped == 1
    [dropped] = logs
    assert dropped["event"] == "alert_dropped"
    assert dropped["log_level"] == "warning"
    assert dropped["alert_id"] == ALERT.alert_id


async def test_a_refused_connection_is_retried_and_never_raises_into_the_caller() -> None:
    with capture_logs() as logs:
        async with serving(Alerter(first_retry=QUICK)) as alerter:
            alerter.fire(webhook(refused_url()), ALERT)
            await eventually(lambda: alerter.statistics().pending == 0)
            assert alerter.statistics().undelivered == 1
    failed = [line for line in logs if line["event"] == "alert_post_failed"]
    assert [line["tries"] for line in failed] == list(range(1, ATTEMPTS))
    assert all("refused" in line["error"] for line in failed)


async def test_alerts_queued_before_serve_are_delivered_when_it_starts(
    endpoint: Callable[..., Endpoint],
) -> None:
    server, delivered = endpoint(), Deliveries()
    alerter = Alerter(on_delivered=delivered)
    alerter.fire(webhook(server.url()), ALERT)
    async with serving(alerter):
        await eventually(lambda: len(delivered.calls) == 1)
    assert len(server.received) == 1


async def test_each_channel_of_a_policy_gets_its_own_delivery(
    endpoint: Callable[..., Endpoint], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, delivered = endpoint(), Deliveries()
    monkeypatch.setattr(alerts, "PAGERDUTY_EVENTS_URL", server.url("/pagerduty"))
    policy = AlertPolicy(
        channels=[
            WebhookChannel(url=server.url("/webhook")),
            SlackChannel(webhook_url=server.url("/slack")),
            PagerDutyChannel(routing_key="R", severity="error"),
        ]
    )
    async with serving(Alerter(on_delivered=delivered)) as alerter:
        alerter.fire(policy, ALERT)
        await eventually(lambda: len(delivered.calls) == 3)
    assert sorted(kind for _, kind, _ in delivered.calls) == ["pager_duty", "slack", "webhook"]
    assert sorted(request.path for request in server.received) == [
        "/pagerduty",
        "/slack",
        "/webhook",
    ]


async def test_a_failing_on_delivered_is_logged_and_delivery_goes_on(
    endpoint: Callable[..., Endpoint],
) -> None:
    server = endpoint()

    async def broken(alert: Alert, kind: str, alert_id: str) -> None:
        raise RuntimeError("store closed")

    with capture_logs() as logs:
        async with serving(Alerter(on_delivered=broken)) as alerter:
            alerter.fire(webhook(server.url()), ALERT)
            alerter.fire(webhook(server.url()), ALERT)
            await eventually(lambda: alerter.statistics().pending == 0)
            assert alerter.statistics().delivered == 2
    failures = [line for line in logs if line["event"] == "alert_callback_failed"]
    assert len(failures) == 2
    assert all(line["exc_info"] is True for line in failures)  # logged with its traceback


async def test_logs_name_the_host_never_the_url_path_nor_the_body() -> None:
    """A Slack webhook URL is its own credential; a PagerDuty body holds the routing key."""
    url = refused_url().replace("/hook", "/services/T000/B000/T0KEN")
    with capture_logs() as logs:
        async with serving(Alerter(first_retry=QUICK)) as alerter:
            alerter.fire(AlertPolicy(channels=[SlackChannel(webhook_url=url)]), ALERT)
            await eventually(lambda: alerter.statistics().pending == 0)
    assert logs
    assert all(line["host"] == "127.0.0.1" for line in logs)
    assert "T0KEN" not in repr(logs)
