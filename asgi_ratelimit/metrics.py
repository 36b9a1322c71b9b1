"""The limiter's Prometheus metrics, on an explicit registry.

Every label value comes from a bounded set: rule names (fixed when the middleware is built),
decision results and error kinds.  Keys, IPs and tokens never become labels.

The metric objects of one registry are built once and shared, so building a second middleware
on the same registry reuses them instead of failing on duplicated names.  Labelled children are
cached, so a request costs a dict lookup and an ``inc()``, never a ``labels()`` call.
"""

from __future__ import annotations

import threading
import weakref
from typing import Final, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BREAKER_STATES",
    "ERROR_KINDS",
    "RESULTS",
    "ErrorKind",
    "LimiterMetrics",
    "Result",
    "metrics_for",
]

Result = Literal["allowed", "denied", "dry_run_denied", "failed_open", "failed_closed"]
ErrorKind = Literal["timeout", "connection", "script", "breaker_open", "other"]

RESULTS: Final[tuple[Result, ...]] = ("allowed", "denied", "dry_run_denied", "failed_open", "failed_closed")
ERROR_KINDS: Final[tuple[ErrorKind, ...]] = ("timeout", "connection", "script", "breaker_open", "other")
#: Values of asgi_ratelimit_breaker_state.
BREAKER_STATES: Final[dict[str, int]] = {"closed": 0, "open": 1, "half_open": 2}

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


class LimiterMetrics:
    """The four metric families of one registry, with cached labelled children."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "asgi_ratelimit_decisions",
            "Rate-limit decisions, by rule and result.",
            ["rule", "result"],
            registry=registry,
        )
        self.backend_latency = Histogram(
            "asgi_ratelimit_backend_latency_seconds",
            "Time the backend took to decide a hit (a call abandoned at the timeout counts as the timeout).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
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
        self._children: dict[tuple[str, str], Counter] = {}
        self._lock = threading.Lock()

    def decision(self, rule: str, result: Result) -> Counter:
        """The counter child for ``rule`` and ``result`` (created on first use, then cached)."""
        child = self._children.get((rule, result))
        if child is None:
            with self._lock:
                child = self._children.get((rule, result))
                if child is None:
                    child = self._children[(rule, result)] = self.decisions.labels(rule, result)
        return child

    def add_rule(self, rule: str) -> None:
        """Export every result of ``rule`` at zero, so alerts on rate() see the series from the start."""
        for result in RESULTS:
            self.decision(rule, result)


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
