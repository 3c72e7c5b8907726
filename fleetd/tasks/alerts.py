"""Alerts: a task's alert policy posted to its channels, never in the dispatcher's way.

    Alert           what happened to a task (`task_alert` makes one); a webhook's JSON body
    HttpPost        one POST, built without I/O
    webhook_post, slack_post, pagerduty_post   an alert as each channel's request (pure)
    Alerter         `fire` queues a delivery per channel and returns; `serve` posts them

A webhook's body is the alert's JSON. With the channel's `secret` set, it carries
``X-Fleet-Signature-256: sha256=<hex HMAC-SHA256 of the body under the secret>``, GitHub's
X-Hub-Signature-256 convention, so that existing verifiers work as they are. Slack gets its
incoming-webhook shape, ``{"text": …}``; PagerDuty an Events API v2 trigger whose dedup_key
is the alert id. An alert id is `RUN/TASK/REASON/ATTEMPTS`: the same event gives the same id
(after a fleetd restart too), so that receivers and PagerDuty can count it once.

Delivery is at most ATTEMPTS tries, retried on a network error or an answer other than 2xx
after 1 s, then x2 up to 60 s, then logged (`alert_undelivered`) and dropped: an alert is not
durable, and at most MAX_PENDING deliveries wait; beyond that a new one is dropped with a
warning rather than holding dispatch up.

Why the standard library's urllib in threads, not an HTTP client package: alerts are rare and
small (one POST per channel when a task crosses its policy's threshold), so a connection pool or
HTTP/2 buys nothing, and a client package (httpx: httpcore, h11, certifi, idna) would be a
dependency and memory in fleetd for its whole life. urllib.request blocks, so each POST runs
in a worker thread under our own CapacityLimiter(4): a stalled endpoint holds at most four
threads, never the event loop, and never anyio's default thread pool, which the store and the
holders use. urllib.request (with http.client, ssl, email and tempfile) is imported by the
first POST, not when fleetd starts: a daemon that never alerts never loads it
(tests/test_layering.py keeps tempfile out of fleetd). The opener has the HTTP and HTTPS
handlers only: no redirects (a 3xx is a failed try, where urllib would resend a POST as a GET)
and no file: or ftp: URLs. The 10 s timeout is urllib's, per connect and per read.

URLs and bodies are never logged: a Slack URL is its own credential, a PagerDuty body holds
the routing key. A log line names the channel's kind and host.
"""

import hashlib
import hmac
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus

from fleetd.core.timers import Alarm
from protocol import RELEASE
from protocol.tasks import (
    AlertChannel,
    AlertPolicy,
    PagerDutyChannel,
    RetryPolicy,
    SlackChannel,
    WebhookChannel,
    timestamp,
)

if TYPE_CHECKING:
    import urllib.request

log = structlog.get_logger("fleetd.tasks.alerts")

PAGERDUTY_EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
ATTEMPTS = 6
"""Tries per delivery: with 1 s, x2, they span about 31 s of an endpoint being down."""
MAX_BACKOFF = 60.0
MAX_PENDING = 1000
"""Deliveries queued, posting or waiting to retry, at most."""
TIMEOUT = 10.0
CONCURRENT_POSTS = 4
SIGNATURE_HEADER = "X-Fleet-Signature-256"
ALERT_ID_HEADER = "X-Fleet-Alert-Id"
SUMMARY_LIMIT = 1024
"""PagerDuty's limit on a summary, the longest any channel takes."""
_HEADERS = {"Content-Type": "application/json", "User-Agent": f"fleetd/{RELEASE}"}
"""A User-Agent of our own: some firewalls refuse urllib's default one."""

Reason = Literal["attempts", "stale"]


class Alert(msgspec.Struct, frozen=True):
    """A task failed its policy's `after_attempts` times (`attempts`), or its worker stayed
    stale `after_minutes_stale` minutes (`stale`): what the dispatcher fires."""

    alert_id: str
    run_id: str
    task_id: str
    reason: Reason
    attempts: int
    summary: str
    at: str


def task_alert(
    run_id: str, task_id: str, *, reason: Reason, attempts: int, detail: str, now: float
) -> Alert:
    """The alert about attempt `attempts` of a task; `detail` says what went wrong ("exited
    with code 1", "no heartbeat for 5 minutes") and is kept to one line, as worker output
    may end up in it."""
    if reason == "attempts":
        what = f"failed {attempts} attempt{'' if attempts == 1 else 's'}"
    else:
        what = f"stale on attempt {attempts}"
    summary = " ".join(f"task {task_id} of {run_id} {what}: {detail}".split())
    return Alert(
        alert_id=f"{run_id}/{task_id}/{reason}/{attempts}",
        run_id=run_id,
        task_id=task_id,
        reason=reason,
        attempts=attempts,
        summary=summary[:SUMMARY_LIMIT],
        at=timestamp(now),
    )


# --- requests, without I/O --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpPost:
    url: str
    body: bytes
    headers: dict[str, str]


def _signature(secret: str, body: bytes) -> str:
    """The signature header's value: what a receiver recomputes and compares (in constant
    time, hmac.compare_digest) to know the body is ours and whole."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def webhook_post(channel: WebhookChannel, alert: Alert) -> HttpPost:
    """The alert's JSON, signed when the channel has a secret (an empty one signs nothing)."""
    body = msgspec.json.encode(alert)
    headers = {**_HEADERS, ALERT_ID_HEADER: alert.alert_id}
    if channel.secret:
        headers[SIGNATURE_HEADER] = _signature(channel.secret, body)
    return HttpPost(channel.url, body, headers)


def slack_post(channel: SlackChannel, alert: Alert) -> HttpPost:
    """Slack's incoming-webhook message. `&`, `<` and `>` are escaped, as Slack asks: a
    summary holding `<!channel>` must not notify a whole channel."""
    text = f"fleetd: {alert.summary} (alert {alert.alert_id})"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return HttpPost(channel.webhook_url, msgspec.json.encode({"text": text}), dict(_HEADERS))


def pagerduty_post(channel: PagerDutyChannel, alert: Alert) -> HttpPost:
    """A PagerDuty Events API v2 trigger; the alert id as dedup_key makes a repeat one
    incident. protocol.runfile checks the severity (critical, error, warning, info)."""
    event = {
        "routing_key": channel.routing_key,
        "event_action": "trigger",
        "dedup_key": alert.alert_id,
        "payload": {
            "summary": alert.summary[:SUMMARY_LIMIT],
            "source": "fleetd",
            "severity": channel.severity,
            "timestamp": alert.at,
            "custom_details": msgspec.structs.asdict(alert),
        },
    }
    return HttpPost(PAGERDUTY_EVENTS_URL, msgspec.json.encode(event), dict(_HEADERS))


def _channel_post(channel: AlertChannel, alert: Alert) -> tuple[str, HttpPost]:
    """The channel's kind (its tag) and its request."""
    match channel:
        case WebhookChannel():
            return "webhook", webhook_post(channel, alert)
        case SlackChannel():
            return "slack", slack_post(channel, alert)
        case PagerDutyChannel():
            return "pager_duty", pagerduty_post(channel, alert)


# --- posting, in a worker thread --------------------------------------------------------------


@cache
def _opener() -> "urllib.request.OpenerDirector":
    import urllib.request

    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),  # honours https_proxy, as an operator expects
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def _post_blocking(post: HttpPost) -> str | None:
    """POST it: None when answered 2xx, else what went wrong, for the log. Any exception is
    a failed try (urllib raises OSErrors, http.client's own errors, ValueErrors)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(post.url, post.body, post.headers, method="POST")
    try:
        with _opener().open(request, timeout=TIMEOUT):
            return None
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"answered {exc.code}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


# --- the alerter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertStatistics:
    pending: int
    """Queued, posting, or waiting to retry."""
    delivered: int
    undelivered: int
    """Given up after ATTEMPTS tries."""
    dropped: int
    """Refused by a full queue."""


@dataclass(frozen=True)
class _Delivery:
    alert: Alert
    kind: str
    post: HttpPost


OnDelivered = Callable[[Alert, str, str], Awaitable[None]]


class Alerter:
    """Delivers alerts in the background: `fire` never blocks nor fails, `serve` posts.

    on_delivered: awaited with (alert, channel kind, alert id) once a channel took the alert
        (the dispatcher records an `escalated` event); its exceptions are logged.
    first_retry: seconds before the second try, doubling after; tests make it short.
    """

    def __init__(self, on_delivered: OnDelivered | None = None, first_retry: float = 1.0) -> None:
        self._on_delivered = on_delivered
        self._retry = RetryPolicy(
            max_attempts=ATTEMPTS,
            initial_backoff_seconds=first_retry,
            max_backoff_seconds=MAX_BACKOFF,
            backoff_multiplier=2,
        )
        self._limiter = anyio.CapacityLimiter(CONCURRENT_POSTS)
        self._queue: deque[_Delivery] = deque()
        self._alarm = Alarm()
        self._pending = self._delivered = self._undelivered = self._dropped = 0

    def statistics(self) -> AlertStatistics:
        return AlertStatistics(self._pending, self._delivered, self._undelivered, self._dropped)

    def fire(self, policy: AlertPolicy, alert: Alert) -> None:
        """Queue one delivery per channel of `policy`, and return at once (call it on the
        event loop's thread)."""
        for channel in policy.channels:
            kind, post = _channel_post(channel, alert)
            self._enqueue(_Delivery(alert, kind, post))

    def _enqueue(self, delivery: _Delivery) -> None:
        if self._pending >= MAX_PENDING:
            self._dropped += 1
            log.warning("alert_dropped", **_fields(delivery), pending=self._pending)
            return
        self._pending += 1
        self._queue.append(delivery)
        self._alarm.wake()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver what `fire` queues (before it started too) until cancelled, which drops
        the deliveries under way: alerts are not durable."""
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                while self._queue:
                    tg.start_soon(self._deliver, self._queue.popleft())
                await self._alarm.sleep_until(None)

    async def _deliver(self, delivery: _Delivery) -> None:
        try:
            for tries in range(1, ATTEMPTS + 1):
                error = await self._post(delivery.post)
                if error is None:
                    await self._delivered_after(delivery, tries)
                    return
                if self._retry.exhausted(tries):
                    self._undelivered += 1
                    log.error("alert_undelivered", **_fields(delivery), tries=tries, error=error)
                    return
                log.info("alert_post_failed", **_fields(delivery), tries=tries, error=error)
                await anyio.sleep(self._retry.backoff(tries))
        finally:
            self._pending -= 1

    async def _post(self, post: HttpPost) -> str | None:
        """Abandoned when cancelled, so that fleetd's shutdown does not wait for a stalled
        endpoint: the thread ends at its own timeout."""
        return await anyio.to_thread.run_sync(
            _post_blocking, post, limiter=self._limiter, abandon_on_cancel=True
        )

    async def _delivered_after(self, delivery: _Delivery, tries: int) -> None:
        self._delivered += 1
        log.info("alert_delivered", **_fields(delivery), tries=tries)
        if self._on_delivered is None:
            return
        try:
            await self._on_delivered(delivery.alert, delivery.kind, delivery.alert.alert_id)
        except Exception:
            log.exception("alert_callback_failed", **_fields(delivery))


def _fields(delivery: _Delivery) -> dict[str, str | None]:
    """What a log line says of a delivery: never its URL's path nor its body (credentials)."""
    host = urlsplit(delivery.post.url).hostname
    return {"alert_id": delivery.alert.alert_id, "channel": delivery.kind, "host": host}
