"""The limiter's Prometheus metrics, on an explicit registry.

Every label value comes from a bounded set: rule names (fixed when the middleware is built),
decision results and error kinds.  Keys, IPs and tokens never become labels.

The metric objects of one registry are built once and shared, so building a second middleware
on the same registry reuses them instead of failing on duplicated names.  The two metrics every
request touches (decisions, backend latency) are plain integers read when the registry is scraped,
so a request costs a dict increment, never a ``labels()`` call or a lock.  They are counted on the
event loop's thread, where the middleware runs.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any, Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = [
    "ERROR_KINDS",
    "RELEASE_RESULTS",
    "RESULTS",
    "ErrorKind",
    "LimiterMetrics",
    "ReleaseResult",
    "Result",
    "metrics_for",
]

Result = Literal["allowed", "denied", "dry_run_denied", "failed_open", "failed_closed"]
ErrorKind = Literal["timeout", "connection", "server", "script", "breaker_open", "other"]
ReleaseResult = Literal["released", "expired", "dropped"]

RESULTS: Final[tuple[Result, ...]] = ("allowed", "denied", "dry_run_denied", "failed_open", "failed_closed")
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = ("timeout", "connection", "server", "script", "breaker_open", "other")
#: How a slot release that did not get through within the budget ended.
RELEASE_RESULTS: Final[tuple[ReleaseResult, ...]] = ("released", "expired", "dropped")

# From a local Redis round trip (~0.1 ms) to well past any sane budget (1 s).
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
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
)


class DecisionCounts(Collector):
    """asgi_ratelimit_decisions_total by rule and result, counted in plain integers.

    Every request counts one decision per rule, so this is the hottest metric: a dict increment
    on the event loop's thread costs a quarter of a prometheus Counter child's locked ``inc()``.
    The registry reads the integers when it is scraped.
    """

    NAME: Final = "asgi_ratelimit_decisions"
    DOC: Final = "Rate-limit decisions, by rule and result."

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}  # (rule, result) -> count, for every result but "allowed"
        #: rule -> allowed decisions: the result of nearly every request, counted without building a tuple key.
        self.allowed: dict[str, int] = {}

    def count(self, rule: str, result: Result) -> None:
        """Count one decision of ``rule``."""
        if result == "allowed":
            self.allowed[rule] = self.allowed.get(rule, 0) + 1
            return
        try:
            self.counts[(rule, result)] += 1
        except KeyError:  # the first decision of this rule and result
            self.counts[(rule, result)] = 1

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.NAME, self.DOC, labels=["rule", "result"])]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.NAME, self.DOC, labels=["rule", "result"])
        for rule, value in list(self.allowed.items()):
            family.add_metric([rule, "allowed"], value)
        for (rule, result), value in list(self.counts.items()):
            family.add_metric([rule, result], value)
        return [family]


class LatencyHistogram(Collector):
    """asgi_ratelimit_backend_latency_seconds, a histogram kept in plain numbers for the same reason."""

    NAME: Final = "asgi_ratelimit_backend_latency_seconds"
    DOC: Final = "Time the backend took to decide a hit (a call abandoned at the timeout counts as the timeout)."

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one call that took ``seconds``."""
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le, "less or equal").
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.NAME, self.DOC)]

    def collect(self) -> Iterable[Metric]:
        counts = list(self.counts)
        cumulative = list(accumulate(counts))
        # Bucket labels formatted as prometheus_client's own Histogram formats them ("0.0001", "1.0").
        labels = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        buckets = [(label, total) for label, total in zip(labels, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        return [HistogramMetricFamily(self.NAME, self.DOC, buckets=buckets, sum_value=self.sum)]


class MemoryEvictions(Collector):
    """asgi_ratelimit_memory_evictions_total: keys the MemoryBackends counted here dropped at their max_keys."""

    NAME: Final = "asgi_ratelimit_memory_evictions"
    DOC: Final = (
        "Keys MemoryBackend dropped at max_keys, by kind: at_rest (back to a full allowance: no answer changes) "
        "or live (an identity's consumption forgotten: it starts over)."
    )

    def __init__(self) -> None:
        self.backends: weakref.WeakSet[Any] = weakref.WeakSet()  # objects with an ``evictions`` dict

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.NAME, self.DOC, labels=["kind"])]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.NAME, self.DOC, labels=["kind"])
        backends = list(self.backends)
        for kind in ("at_rest", "live"):
            family.add_metric([kind], sum(backend.evictions[kind] for backend in backends))
        return [family]


class LimiterMetrics:
    """The four metric families of one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = DecisionCounts()
        registry.register(self.decisions)
        self.backend_latency = LatencyHistogram()
        registry.register(self.backend_latency)
        self.backend_errors = Counter(
            "asgi_ratelimit_backend_errors",
            "Backend calls that failed, or were not made because the circuit breaker was open, by kind.",
            ["kind"],
            registry=registry,
        )
        self.breaker_state = Gauge(
            "asgi_ratelimit_breaker_state",
            "The circuit breaker in front of the backend: 0 closed, 1 open, 2 half-open.",
            registry=registry,
        )
        # Every kind is exported from the start, so rate() and absent() work before the first error.
        self.errors = {kind: self.backend_errors.labels(kind) for kind in ERROR_KINDS}
        self.slot_release_retries = Counter(
            "asgi_ratelimit_slot_release_retries",
            "Concurrency slot releases that did not get through within the time budget and were retried, by how "
            "they ended: released, expired (given up at the end of the lease) or dropped (too many pending).",
            ["result"],
            registry=registry,
        )
        self.release_retries = {result: self.slot_release_retries.labels(result) for result in RELEASE_RESULTS}
        self.memory_evictions = MemoryEvictions()
        registry.register(self.memory_evictions)
        #: count(rule, result): count one decision of ``rule`` (the counter's own method: one call less per request).
        self.count = self.decisions.count

    def add_rule(self, rule: str) -> None:
        """Export every result of ``rule`` at zero, so alerts on rate() see the series from the start."""
        self.decisions.allowed.setdefault(rule, 0)
        for result in RESULTS[1:]:  # after "allowed"
            self.decisions.counts.setdefault((rule, result), 0)


_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, LimiterMetrics] = weakref.WeakKeyDictionary()
_BY_REGISTRY_LOCK = threading.Lock()


def metrics_for(registry: CollectorRegistry | None = None) -> LimiterMetrics:
    """The limiter's metrics on ``registry`` (the global REGISTRY by default), built once per registry."""
    if registry is None:
        registry = REGISTRY
    with _BY_REGISTRY_LOCK:
        metrics = _BY_REGISTRY.get(registry)
        if metrics is None:
            metrics = _BY_REGISTRY[registry] = LimiterMetrics(registry)
        return metrics
