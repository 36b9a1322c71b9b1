"""Limiter: the time budget, the circuit breaker, error kinds, metrics and the log throttle, on scripted backends."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors

from asgi_ratelimit import BackendError, ConfigurationError, MemoryBackend
from asgi_ratelimit._keys import digest
from asgi_ratelimit._limiter import Limiter, error_kind
from asgi_ratelimit.backends.base import Backend, Hit
from asgi_ratelimit.policies import Decision, FixedWindow

POLICY = FixedWindow(10, 60)
HITS: list[Hit] = [("rule\x1fclient", POLICY, 1)]


class Clock:
    """A monotonic clock moved by hand, in seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Scripted(Backend):
    """A backend whose next calls succeed, fail, or hang until released."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.calls = 0
        self.pings = 0
        self.error: Exception = BackendError("down")
        self.release = asyncio.Event()

    async def _act(self) -> None:
        if self.mode == "fail":
            raise self.error
        if self.mode == "hang":
            await self.release.wait()

    async def hit(self, key: str, policies: Sequence[object], cost: int = 1) -> list[Decision]:
        raise NotImplementedError

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        self.calls += 1
        await self._act()
        return [Decision(allowed=True, limit=10, remaining=9, retry_after=0.0, reset_after=1.0) for _ in hits]

    async def ping(self) -> None:
        self.pings += 1
        await self._act()

    async def aclose(self) -> None:
        self.release.set()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def backend() -> Scripted:
    return Scripted()


@pytest.fixture
def limiter(backend: Scripted, clock: Clock, registry: CollectorRegistry) -> Limiter:
    return Limiter(backend, timeout=0.05, breaker_threshold=3, breaker_cooldown=1.0, registry=registry, clock=clock)


async def settle() -> None:
    """Let started tasks run up to their first real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def fail(limiter: Limiter, times: int) -> None:
    for _ in range(times):
        with pytest.raises(BackendError):
            await limiter.decide(HITS)


class TestTimeBudget:
    @pytest.mark.timing
    async def test_a_hanging_backend_is_abandoned_at_the_timeout(self, limiter: Limiter, backend: Scripted) -> None:
        backend.mode = "hang"
        started = time.perf_counter()
        with pytest.raises(BackendError, match="did not answer within 50 ms"):
            await limiter.decide(HITS)
        assert 0.045 <= time.perf_counter() - started < 0.2
        assert error_kind(BackendError()) == "other"

    async def test_abandoned_calls_are_cancelled_and_forgotten(self, limiter: Limiter, backend: Scripted) -> None:
        backend.mode = "hang"
        await fail(limiter, 2)
        assert limiter.abandoned <= 2
        await asyncio.sleep(0.01)  # the cancellations land
        assert limiter.abandoned == 0

    async def test_too_many_abandoned_calls_open_the_breaker(self, backend: Scripted, clock: Clock) -> None:
        never_cancelled = asyncio.Event()

        class Stubborn(Scripted):
            async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
                self.calls += 1
                while not never_cancelled.is_set():  # ignores cancellation, like a driver stuck in its socket timeout
                    try:
                        await never_cancelled.wait()
                    except asyncio.CancelledError:
                        continue
                raise BackendError("finally failed")

        stubborn = Stubborn()
        limiter = Limiter(stubborn, timeout=0.01, breaker_threshold=1000, max_abandoned=3, clock=clock)
        await asyncio.gather(*(fail(limiter, 1) for _ in range(3)))
        assert limiter.abandoned == 3 and limiter.state == "closed"
        await fail(limiter, 5)
        assert stubborn.calls == 3  # the breaker stopped new calls
        assert limiter.state == "open"
        never_cancelled.set()
        await settle()
        assert limiter.abandoned == 0

    async def test_the_memory_backend_is_called_directly(self, registry: CollectorRegistry) -> None:
        limiter = Limiter(MemoryBackend(), registry=registry)
        (decision,) = await limiter.decide(HITS)
        assert decision.allowed
        # Decided in process, with no I/O to watch: not timed.
        assert sample(registry, "asgi_ratelimit_backend_latency_seconds_count") == 0

    async def test_a_backend_bug_fails_like_an_outage(self, limiter: Limiter, backend: Scripted) -> None:
        backend.mode, backend.error = "fail", KeyError("boom")
        with pytest.raises(BackendError, match="KeyError") as caught:
            await limiter.decide(HITS)
        assert isinstance(caught.value.__cause__, KeyError)

    async def test_a_cancelled_request_abandons_its_call(self, limiter: Limiter, backend: Scripted) -> None:
        backend.mode = "hang"
        task = asyncio.ensure_future(limiter.decide(HITS))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.005)
        assert limiter.abandoned == 0


class TestBreaker:
    async def test_opens_after_threshold_consecutive_failures(
        self, limiter: Limiter, backend: Scripted, registry: CollectorRegistry
    ) -> None:
        backend.mode = "fail"
        await fail(limiter, 2)
        assert limiter.state == "closed"
        await fail(limiter, 1)
        assert limiter.state == "open"
        assert sample(registry, "asgi_ratelimit_breaker_state") == 1
        await fail(limiter, 10)
        assert backend.calls == 3
        assert sample(registry, "asgi_ratelimit_backend_errors_total", kind="breaker_open") == 10
        assert sample(registry, "asgi_ratelimit_backend_errors_total", kind="other") == 3

    async def test_a_success_resets_the_count(self, limiter: Limiter, backend: Scripted) -> None:
        for _ in range(3):
            backend.mode = "fail"
            await fail(limiter, 2)
            backend.mode = "ok"
            await limiter.decide(HITS)
        assert limiter.state == "closed"

    @pytest.mark.timing
    async def test_an_open_breaker_adds_no_latency(self, limiter: Limiter, backend: Scripted) -> None:
        backend.mode = "hang"
        await asyncio.gather(*(fail(limiter, 1) for _ in range(3)))
        started = time.perf_counter()
        await fail(limiter, 100)
        assert time.perf_counter() - started < 0.05  # 100 refusals, no timer among them

    async def test_one_probe_after_the_cooldown_closes_it(
        self, limiter: Limiter, backend: Scripted, clock: Clock, registry: CollectorRegistry
    ) -> None:
        backend.mode = "fail"
        await fail(limiter, 3)
        clock.advance(0.999)
        await fail(limiter, 1)
        assert backend.calls == 3
        clock.advance(0.001)
        backend.mode = "hang"
        probe = asyncio.ensure_future(limiter.decide(HITS))
        await settle()
        assert limiter.state == "half_open"
        assert sample(registry, "asgi_ratelimit_breaker_state") == 2
        await fail(limiter, 5)  # while the probe is in flight, everyone else fails at once
        assert backend.calls == 4
        backend.release.set()
        assert (await probe)[0].allowed
        assert limiter.state == "closed"
        assert sample(registry, "asgi_ratelimit_breaker_state") == 0
        backend.mode = "ok"
        await limiter.decide(HITS)
        assert backend.calls == 5

    async def test_a_failed_probe_opens_it_for_another_cooldown(
        self, limiter: Limiter, backend: Scripted, clock: Clock
    ) -> None:
        backend.mode = "fail"
        await fail(limiter, 3)
        clock.advance(1.0)
        await fail(limiter, 1)  # the probe
        assert backend.calls == 4 and limiter.state == "open"
        clock.advance(0.5)
        await fail(limiter, 3)
        assert backend.calls == 4
        clock.advance(0.5)
        backend.mode = "ok"
        await limiter.decide(HITS)
        assert limiter.state == "closed"

    @pytest.mark.timing
    async def test_a_slow_probe_answers_its_request_at_the_budget_and_decides_later(
        self, limiter: Limiter, backend: Scripted, clock: Clock
    ) -> None:
        backend.mode = "fail"
        await fail(limiter, 3)
        clock.advance(1.0)
        backend.mode = "hang"
        started = time.perf_counter()
        await fail(limiter, 1)  # the probe's own request fails at the budget...
        assert time.perf_counter() - started < 0.2
        assert limiter.state == "half_open"  # ...while the breaker waits for the probe's outcome
        await fail(limiter, 3)
        assert backend.calls == 4
        backend.release.set()  # a cold first call (connect, load the script) answers late
        await settle()
        assert limiter.state == "closed"

    async def test_a_probe_that_never_answers_is_cancelled_after_the_cooldown(
        self, backend: Scripted, clock: Clock
    ) -> None:
        limiter = Limiter(backend, timeout=0.01, breaker_threshold=1, breaker_cooldown=0.05, clock=clock)
        backend.mode = "fail"
        await fail(limiter, 1)
        clock.advance(0.06)
        backend.mode = "hang"
        await fail(limiter, 1)
        assert limiter.state == "half_open"
        await asyncio.sleep(0.1)
        assert limiter.state == "open" and limiter.abandoned == 0

    async def test_a_cancelled_probe_request_leaves_the_probe_running(
        self, limiter: Limiter, backend: Scripted, clock: Clock
    ) -> None:
        backend.mode = "fail"
        await fail(limiter, 3)
        clock.advance(1.0)
        backend.mode = "hang"
        probe = asyncio.ensure_future(limiter.decide(HITS))
        await settle()
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        backend.release.set()
        await settle()
        assert limiter.state == "closed"

    async def test_late_success_of_an_old_call_does_not_close_it(
        self, limiter: Limiter, backend: Scripted, clock: Clock
    ) -> None:
        backend.mode = "hang"
        slow = asyncio.ensure_future(limiter.decide(HITS))
        await settle()  # started while the breaker is closed
        backend.mode = "fail"
        await fail(limiter, 3)
        backend.release.set()
        await slow
        assert limiter.state == "open"


class TestErrorKinds:
    @pytest.mark.parametrize(
        ("cause", "kind"),
        [
            (redis_errors.TimeoutError("Timeout reading from socket"), "timeout"),
            (TimeoutError(), "timeout"),
            (redis_errors.ConnectionError("Connection refused"), "connection"),
            (ConnectionResetError(), "connection"),
            (redis_errors.BusyLoadingError("loading"), "connection"),
            (redis_errors.NoScriptError("NOSCRIPT"), "script"),
            (redis_errors.ResponseError("OOM command not allowed"), "server"),
            (redis_errors.ReadOnlyError("You can't write against a read only replica."), "server"),
            (redis_errors.ResponseError("MISCONF Redis is configured to save RDB snapshots"), "server"),
            (redis_errors.ResponseError("CLUSTERDOWN The cluster is down"), "server"),
            (redis_errors.ResponseError("ERR user_script:12: attempt to compare nil with number"), "script"),
            (redis_errors.ResponseError("CROSSSLOT Keys"), "script"),
            (KeyError("x"), "other"),
        ],
    )
    async def test_classified_through_the_cause(self, cause: Exception, kind: str) -> None:
        try:
            raise BackendError("wrapped") from cause
        except BackendError as exc:
            assert error_kind(exc) == kind

    async def test_counted_by_kind(self, limiter: Limiter, backend: Scripted, registry: CollectorRegistry) -> None:
        backend.mode = "fail"
        try:
            raise BackendError("Redis failed") from redis_errors.ConnectionError("refused")
        except BackendError as exc:
            backend.error = exc
        await fail(limiter, 1)
        backend.mode = "hang"
        await fail(limiter, 1)
        errors = {
            kind: sample(registry, "asgi_ratelimit_backend_errors_total", kind=kind)
            for kind in ("timeout", "connection", "server", "script", "breaker_open", "other")
        }
        assert errors == {"timeout": 1, "connection": 1, "server": 0, "script": 0, "breaker_open": 0, "other": 0}


class TestLogging:
    async def test_one_line_per_state_change_never_one_per_request(
        self, limiter: Limiter, backend: Scripted, clock: Clock, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="asgi_ratelimit")
        backend.mode = "fail"
        await fail(limiter, 500)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage().split(" (")[0] for r in warnings] == [
            "asgi_ratelimit: backend lost",
            "asgi_ratelimit: circuit breaker opened",
        ]
        caplog.clear()
        clock.advance(10)
        await fail(limiter, 50)  # includes a failed probe, at DEBUG
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "still failing" in warnings[0].getMessage()
        caplog.clear()
        clock.advance(1)
        backend.mode = "ok"
        for _ in range(50):
            await limiter.decide(HITS)
        infos = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(infos) == 1 and "recovered" in infos[0].getMessage()

    async def test_denials_are_logged_with_the_hashed_key_only(
        self, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="asgi_ratelimit")
        limiter = Limiter(MemoryBackend(), registry=registry)
        identity = "login\x1f203.0.113.7"
        hits: list[Hit] = [(identity, FixedWindow(1, 60), 1)]
        for _ in range(2):
            decisions = await limiter.decide(hits)
            limiter.count_decisions([("login", identity, 1)], decisions, dry_run=False)
        (record,) = [r for r in caplog.records if "denied" in r.getMessage()]
        assert record.levelno == logging.DEBUG
        assert "203.0.113.7" not in record.getMessage()
        assert digest(identity) in record.getMessage()


class TestCounting:
    async def test_each_rule_counts_its_own_result(self, registry: CollectorRegistry) -> None:
        limiter = Limiter(MemoryBackend(), registry=registry)
        allow = Decision(allowed=True, limit=1, remaining=0, retry_after=0.0, reset_after=1.0)
        deny = Decision(allowed=False, limit=1, remaining=0, retry_after=1.0, reset_after=1.0)
        spans = [("a", "a\x1fk", 2), ("b", "b\x1fk", 1)]
        limiter.count_decisions(spans, [allow, deny, allow], dry_run=False)
        limiter.count_decisions(spans, [allow, allow, deny], dry_run=True)
        limiter.count_failure(spans, failed_open=True)
        limiter.count_failure(spans[:1], failed_open=False)
        got = {
            (rule, result): sample(registry, "asgi_ratelimit_decisions_total", rule=rule, result=result)
            for rule in ("a", "b")
            for result in ("allowed", "denied", "dry_run_denied", "failed_open", "failed_closed")
        }
        assert {k: v for k, v in got.items() if v} == {
            ("a", "denied"): 1,
            ("b", "allowed"): 1,
            ("a", "allowed"): 1,
            ("b", "dry_run_denied"): 1,
            ("a", "failed_open"): 1,
            ("b", "failed_open"): 1,
            ("a", "failed_closed"): 1,
        }

    async def test_without_a_registry_nothing_is_counted(self, backend: Scripted) -> None:
        limiter = Limiter(backend)
        assert limiter.metrics is None
        await limiter.decide(HITS)
        limiter.count_failure([("a", "k", 1)], failed_open=True)
        limiter.count_decisions([("a", "k", 1)], await limiter.decide(HITS), dry_run=False)


class TestPing:
    @pytest.mark.timing
    async def test_latency_of_an_answer(self, limiter: Limiter) -> None:
        assert 0 <= await limiter.ping() < 0.05

    async def test_a_hanging_ping_times_out_and_is_not_repeated(self, limiter: Limiter, backend: Scripted) -> None:
        class Stubborn(Scripted):
            async def ping(self) -> None:
                self.pings += 1
                while True:
                    try:
                        await asyncio.sleep(10)
                    except asyncio.CancelledError:
                        if self.release.is_set():
                            raise

        stubborn = Stubborn()
        limiter = Limiter(stubborn, timeout=0.01)
        for _ in range(3):
            with pytest.raises(BackendError):
                await limiter.ping()
        assert stubborn.pings == 1  # one abandoned ping at a time
        stubborn.release.set()
        for _ in range(100):
            if limiter.abandoned == 0:
                break
            await asyncio.sleep(0.01)
        assert limiter.abandoned == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout": 0}, "timeout must be a number of seconds above 0"),
        ({"timeout": True}, "timeout must be"),
        ({"breaker_threshold": 0}, "breaker_threshold must be a whole number of at least 1, got 0"),
        ({"breaker_threshold": 2.5}, "breaker_threshold"),
        ({"breaker_cooldown": -1}, "breaker_cooldown must be"),
        ({"log_interval": "10"}, "log_interval must be"),
        ({"max_abandoned": 0}, "max_abandoned must be"),
        ({"clock": 3}, "clock must be a callable"),
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Limiter(MemoryBackend(), **kwargs)  # type: ignore[arg-type]
