"""fleetd's metrics, rendered in the Prometheus text exposition format (version 0.0.4).

    Counter, Histogram   kept as things happen (a request answered, a batch committed): a
                         dict lookup and an addition or two each, on the event loop
    Gauge                read when scraped: a collector computes it from what fleetd holds
    Registry             the metrics and the collectors; `render` is the scrape

`fleetctl metrics` asks for the text over the control socket; `fleetd --metrics-listen
HOST:PORT` also serves it over HTTP (fleetd.metrics_http).

Not prometheus_client: importing it costs ~56 ms (http.server, wsgiref, urllib), which
fleetd would pay at every start, and each observation takes a lock that one event loop does
not need. The format is a page of text; tests/test_metrics.py parses ours with
prometheus_client's own parser.
"""

import bisect
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

Labels = tuple[str, ...]

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds: from a fast request (~100 µs) to a slow cluster start."""

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Jobs in a store batch (the store's queue holds at most 1,024)."""


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float
    suffix: str = ""


@dataclass(slots=True)
class Family:
    """One metric as scraped: its samples under its name."""

    name: str
    help: str
    type: str
    samples: list[Sample] = field(default_factory=list)


class Counter:
    """Without labels it starts at 0, as prometheus_client's does: a series that shows up only
    once something happened leaves rate() and absent() alerts with nothing to read."""

    def __init__(self, name: str, help: str, labels: Labels = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.values: dict[Labels, float] = {} if labels else {(): 0.0}

    def inc(self, *values: str, amount: float = 1.0) -> None:
        self.values[values] = self.values.get(values, 0.0) + amount

    def family(self) -> Family:
        return Family(
            self.name,
            self.help,
            "counter",
            [Sample(dict(zip(self.labels, k, strict=True)), v) for k, v in self.values.items()],
        )


class Histogram:
    """Observations counted into `buckets` (upper bounds); rendered cumulative, as the format
    wants, only when scraped."""

    def __init__(
        self, name: str, help: str, labels: Labels = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        self.name, self.help, self.labels = name, help, labels
        self.buckets = tuple(buckets)
        self.values: dict[Labels, list[float]] = {}
        """Per label values: a count per bucket, then +Inf's, then the sum."""

    def observe(self, value: float, *values: str) -> None:
        counts = self.values.get(values)
        if counts is None:
            counts = self.values[values] = [0.0] * (len(self.buckets) + 2)
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def family(self) -> Family:
        family = Family(self.name, self.help, "histogram")
        for key, counts in self.values.items():
            labels = dict(zip(self.labels, key, strict=True))
            running = 0.0
            for bound, count in zip((*self.buckets, math.inf), counts, strict=False):
                running += count
                family.samples.append(Sample({**labels, "le": _bound(bound)}, running, "_bucket"))
            family.samples.append(Sample(labels, running, "_count"))
            family.samples.append(Sample(labels, counts[-1], "_sum"))
        return family


def gauge(name: str, help: str, samples: Iterable[tuple[dict[str, str], float]]) -> Family:
    return Family(name, help, "gauge", [Sample(labels, value) for labels, value in samples])


Collector = Callable[[], Awaitable[list[Family]]]
"""Gauges computed from what fleetd holds now, when scraped."""


class Registry:
    def __init__(self, metrics: Sequence[Counter | Histogram] = ()) -> None:
        self._metrics = list(metrics)
        self._collectors: list[Collector] = []

    def add(self, collector: Collector) -> None:
        self._collectors.append(collector)

    async def render(self) -> str:
        families = [metric.family() for metric in self._metrics]
        for collector in self._collectors:
            families += await collector()
        return "".join(_render(family) for family in families)


def _render(family: Family) -> str:
    lines = [
        f"# HELP {family.name} {_escape_help(family.help)}",
        f"# TYPE {family.name} {family.type}",
    ]
    for sample in family.samples:
        lines.append(
            f"{family.name}{sample.suffix}{_labels(sample.labels)} {_number(sample.value)}"
        )
    return "\n".join(lines) + "\n"


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels.items()) + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def _number(value: float) -> str:
    value = float(value)
    if value == math.inf:
        return "+Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


# What fleetd counts as it goes -------------------------------------------------------------------

REQUESTS = Counter(
    "fleet_requests_total",
    "Requests answered on the control socket, by op and outcome.",
    ("op", "outcome"),
)
REQUEST_SECONDS = Histogram(
    "fleet_request_duration_seconds", "Time from a request's frame to its answer, by op.", ("op",)
)
STORE_COMMIT_SECONDS = Histogram(
    "fleet_store_commit_seconds",
    "Time the store took to run and commit one batch (its fsyncs included).",
)
STORE_BATCH_JOBS = Histogram(
    "fleet_store_batch_jobs", "Jobs (writes and reads) in one store batch.", buckets=SIZE_BUCKETS
)
LEASES_EXPIRED = Counter("fleet_leases_expired_total", "Leases that expired without a release.")
MEMBER_EXITS = Counter(
    "fleet_member_exits_total",
    "Member exits seen by fleetd, by exit code (negative: killed by that signal).",
    ("code",),
)
MEMBER_RESTARTS = Counter("fleet_member_restarts_total", "Member restarts seen by fleetd.")

KEPT: tuple[Counter | Histogram, ...] = (
    REQUESTS,
    REQUEST_SECONDS,
    STORE_COMMIT_SECONDS,
    STORE_BATCH_JOBS,
    LEASES_EXPIRED,
    MEMBER_EXITS,
    MEMBER_RESTARTS,
)
