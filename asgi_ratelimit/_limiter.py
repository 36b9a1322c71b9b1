"""The guarded decision that the middleware and the service share: a time budget and a circuit breaker around
backend.submit(), with metrics and rate-limited logging.

A backend call that does not answer within ``timeout`` is abandoned, not awaited: awaiting a
cancelled redis-py call can take the socket's whole timeout, so the request returns at the
budget and the call finishes, or fails, in the background, counted in ``abandoned`` until then.

Abandoned calls cannot pile up: after ``breaker_threshold`` consecutive failures (or once
``max_abandoned`` abandoned calls are still running) the breaker opens and no new call is made
for ``breaker_cooldown`` seconds.  Then one call goes through as a probe (half-open) while every
other request fails at once; the probe's success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from functools import partial
from typing import Any, Final, Literal, NoReturn, TypeVar

from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors

from ._deny_cache import DenyCache
from ._keys import digest
from ._metrics import ErrorKind, LimiterMetrics, ReleaseResult, Result, metrics_for
from ._releases import PendingReleases
from .backends.base import Backend, Call, Claim, Hit
from .errors import BackendError, ConfigurationError
from .policies import Decision, Policy

__all__ = ["BUG_KINDS", "Limiter", "error_kind"]

logger = logging.getLogger("asgi_ratelimit")

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
_STATE_VALUES: Final[dict[str, int]] = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}

#: (rule name, identity, number of policies) for each rule a request applied, in the order of its hits.
Span = tuple[str, str, int]


class _Abandoned(BackendError):
    """The backend did not answer within the budget."""


class _BreakerOpen(BackendError):
    """The breaker is open (or a probe is in flight): the backend was not called."""


def error_kind(exc: BaseException) -> ErrorKind:
    """The bounded kind of a backend failure, for the errors metric: timeout, connection, server, script or other."""
    if isinstance(exc, _Abandoned):
        return "timeout"
    if isinstance(exc, _BreakerOpen):
        return "breaker_open"
    seen: BaseException | None = exc
    for _ in range(8):  # follow ``raise ... from`` a few levels, never a cycle
        if seen is None:
            break
        # Timeouts first: the builtin TimeoutError is also an OSError.
        if isinstance(seen, (redis_errors.TimeoutError, TimeoutError, asyncio.TimeoutError)):
            return "timeout"
        if isinstance(seen, (redis_errors.ConnectionError, ConnectionError, OSError)):
            return "connection"
        if isinstance(seen, redis_errors.ResponseError):
            # A refusal that reflects the server's state (full, a replica during failover, loading after a
            # restart, busy, a cluster without a quorum) is an outage; any other (a Lua error in our script,
            # NOSCRIPT, CROSSSLOT, WRONGTYPE) is a bug in what we sent.
            if isinstance(seen, _SERVER_STATE_CLASSES) or str(seen).split(" ", 1)[0] in _SERVER_STATE_ERRORS:
                return "server"
            return "script"
        seen = seen.__cause__
    return "other"


# What Redis answers about its own state, not about the command: redis-py's classes for those replies
# (which drop the code from the message), and the codes of the others (the reply's first word).
_SERVER_STATE_CLASSES: Final = (
    redis_errors.ReadOnlyError,
    redis_errors.OutOfMemoryError,
    redis_errors.MasterDownError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
)
_SERVER_STATE_ERRORS: Final = frozenset(
    {"OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "MISCONF"}
)

#: Failures that are bugs (ours, or a backend's), not outages: logged with their traceback, and the
#: backend reported unhealthy until a call succeeds.  Requests still fail open or closed as configured.
BUG_KINDS: Final[frozenset[ErrorKind]] = frozenset({"script", "other"})


def _follow(awaitable: Awaitable[Any]) -> tuple[Call, Callable[[], object] | None]:
    """A Call that follows ``awaitable``: a coroutine run as a task of ours (stop: its cancel), or a future."""
    inner = asyncio.ensure_future(awaitable)
    call = Call()
    inner.add_done_callback(partial(_settle, call))
    return call, (None if inner is awaitable else inner.cancel)


def _given_up(call: Call) -> bool:
    """Whether the caller stopped waiting for ``call`` (so its end is still to come, or has come)."""
    return call.cancelled() or isinstance(call.exception(), _Abandoned)


def _settle(call: Call, inner: asyncio.Future[Any]) -> None:
    error = BackendError("the backend call was cancelled") if inner.cancelled() else inner.exception()
    if call.done():
        call.end(error is not None)  # given up already: the call has now ended
    elif error is not None:
        call.set_exception(error)
    else:
        call.set_result(inner.result())


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, got {value!r}.")
    return value


def _check_number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise ConfigurationError(
            f"{name} must be a number of seconds above {low:g} and at most {high:g}, got {value!r}."
        )
    return float(value)


class Limiter:
    """Decides hits on a backend within a time budget, behind a circuit breaker.

    Args:
        backend: the storage.
        timeout: seconds a decision may take before the backend counts as failed (default 0.05).
        breaker_threshold: consecutive failures that open the circuit breaker (default 5).
        breaker_cooldown: seconds the open breaker waits before letting one probe through (default 1.0).
        registry: the Prometheus registry to count on; None (the default here) counts nothing.
        log_interval: the least number of seconds between two log lines about a failing backend.
        max_abandoned: abandoned calls still running that open the breaker, whatever the failure count.
        clock: a monotonic clock in seconds for the breaker and the log throttle (tests inject one).
        deny_cache: answer a hit that was just denied from memory until Redis could first allow it
            (exact: see _deny_cache.py); True by default, unused with the in-memory backend.
        deny_cache_size: the most denials remembered at once.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        timeout: float = 0.05,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 1.0,
        registry: CollectorRegistry | None = None,
        log_interval: float = 10.0,
        max_abandoned: int = 256,
        clock: Callable[[], float] = time.monotonic,
        deny_cache: bool = True,
        deny_cache_size: int = 10_000,
    ) -> None:
        self.backend = backend
        self.timeout = _check_number("timeout", timeout, 0, 60)
        self.breaker_threshold = _check_count("breaker_threshold", breaker_threshold)
        self.breaker_cooldown = _check_number("breaker_cooldown", breaker_cooldown, 0, 3600)
        self.log_interval = _check_number("log_interval", log_interval, 0, 86400)
        self.max_abandoned = _check_count("max_abandoned", max_abandoned)
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable returning seconds, got {clock!r}.")
        self._clock = clock
        self.registry = registry
        self.metrics: LimiterMetrics | None = None if registry is None else metrics_for(registry)
        if self.metrics is not None and hasattr(backend, "evictions"):
            self.metrics.memory_evictions.backends.add(backend)  # a backend that drops keys at a cap counts them
        self._in_process = backend.in_process
        #: Slot releases that did not get through within the budget, retried until their lease ends.
        self.releases = PendingReleases(
            backend, clock=clock, log_interval=self.log_interval, on_result=self._count_release
        )
        deny_cache_size = _check_count("deny_cache_size", deny_cache_size)
        self.deny_cache: DenyCache | None = (
            DenyCache(deny_cache_size, clock) if deny_cache and not self._in_process and backend.real_time else None
        )

        self._state: BreakerState = CLOSED
        self._failures = 0  # consecutive
        self._opened_at = 0.0
        self._probing = False
        self._abandoned = 0
        self._ping_running = False  # a ping not answered yet (one abandoned at the budget included)
        # Logging: one line per state change, and at most one "still failing" line per interval.
        self._failing_since: float | None = None
        self._lost_logged = False
        self._failed_calls = 0
        self._unlogged = 0
        self._last_log = -math.inf
        self._bug: BackendError | None = None  # the last failure that was a bug, until a call succeeds
        self._last_bug_log = -math.inf
        if self.metrics is not None:
            self.metrics.breaker_state.set(0)

    def _count_release(self, result: ReleaseResult) -> None:
        if self.metrics is not None:
            self.metrics.release_retries[result].inc()

    @property
    def state(self) -> BreakerState:
        """The circuit breaker's state: ``"closed"``, ``"open"`` or ``"half_open"``."""
        return self._state

    @property
    def bug(self) -> BackendError | None:
        """The last backend failure that was a bug rather than an outage, until a call succeeds again."""
        return self._bug

    @property
    def abandoned(self) -> int:
        """Backend calls abandoned at the timeout that have not finished yet."""
        return self._abandoned

    # -- deciding ------------------------------------------------------------------------
    # Every backend call goes through _begin(): through the breaker, then either decided at once
    # (MemoryBackend) or waited on in _wait() within the budget.  Success, failure and abandoned
    # calls are counted there and nowhere else.

    async def decide(
        self, hits: Sequence[Hit], check: Callable[[Sequence[Hit]], Awaitable[list[Decision]]] | None = None
    ) -> list[Decision]:
        """Decisions for ``hits``, or BackendError when the backend fails, is too slow, or the breaker is open.

        With ``check`` (a backend's check method, which spends nothing), ``check(hits)`` instead of a hit.
        Refused hits are answered from the deny cache while they stay refused; a refused check is
        remembered there as a refused hit is: a check refuses exactly when a hit of the same cost
        would, so a flood on a key out of quota costs no round trips either.
        """
        cache = self.deny_cache
        signature: tuple[Hit, ...] = ()
        sent_at = 0.0
        if cache is not None:
            signature = tuple(hits)
            cached = cache.get(signature)
            if cached is not None:
                return cached
            sent_at = self._clock()
        outcome = self._begin(self.backend.submit, hits, (), "") if check is None else self._begin(check, hits)
        decisions: list[Decision] = outcome if isinstance(outcome, list) else await outcome
        if cache is not None and not all(decision.allowed for decision in decisions):
            cache.put(signature, decisions, sent_at)
        return decisions

    def check_in_process(
        self, method: Callable[[Sequence[Hit]], list[Decision]], hits: Sequence[Hit]
    ) -> list[Decision]:
        """check() for a backend's synchronous check (MemoryBackend.check_now): behind the breaker, at once."""
        outcome = self._begin(method, hits)
        if not isinstance(outcome, list):
            outcome.close()
            raise BackendError(f"{method!r} did not decide at once")
        return outcome

    async def acquire(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> list[Decision]:
        """Decide ``hits`` and take the claimed slots in one backend call, within the budget, behind the breaker.

        One Decision per hit, then one per claim; only one per hit when the deny cache answers (the
        rate limits refuse, so no slot is looked at).  When the call fails, is abandoned or is
        cancelled after it may have been sent, its slots are released in the background, as a late
        acquire would otherwise hold them for the whole lease.
        """
        cache = self.deny_cache if hits else None
        sent_at = 0.0
        if cache is not None:
            cached = cache.get(tuple(hits))
            if cached is not None:
                return cached  # the rate limits refuse, whatever the slots: no call, one Decision per hit
            sent_at = self._clock()
        try:
            outcome = self._begin(self.backend.submit, hits, claims, token)
            decisions = outcome if isinstance(outcome, list) else await outcome
        except _BreakerOpen:
            raise  # nothing was sent
        except BaseException:
            self.releases.add(claims, token)
            raise
        if cache is not None and not all(decision.allowed for decision in decisions[: len(hits)]):
            # Exact as for decide(): the same hits are refused until the earliest wait is over.
            cache.put(tuple(hits), decisions[: len(hits)], sent_at)
        return decisions

    async def release(self, claims: Sequence[Claim], token: str) -> None:
        """Give slots back: tried within the budget, not through the breaker, then retried within the lease.

        Returns within the budget, or at once when cancelled; the release goes on in the background
        until it succeeds or the lease has passed (the slot has expired by then).
        """
        if self._in_process:  # decided at once: nothing to wait for, but a failure is retried all the same
            try:
                await self.backend.release(claims, token)
            except Exception:
                self.releases.add(claims, token)
            return
        attempt = asyncio.ensure_future(self.backend.release(claims, token))
        try:
            await asyncio.wait([attempt], timeout=self.timeout)
        except asyncio.CancelledError:
            self.releases.add(claims, token, attempt)
            raise
        if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
            return
        self.releases.add(claims, token, attempt if not attempt.done() else None)

    async def reset(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget ``key``'s state under ``policies`` in the backend and in this process's deny cache."""
        outcome = self._begin(self.backend.reset, key, policies)
        if not isinstance(outcome, list):  # always so: reset() is a coroutine
            await outcome
        if self.deny_cache is not None:
            self.deny_cache.forget(key)

    def _begin(self, start: Callable[..., Any], *args: Any) -> list[Decision] | Coroutine[Any, Any, Any]:
        """Call ``start`` through the breaker: its decisions when it decides at once, else a coroutine to await.

        Not timed in the latency histogram when decided at once: there is no I/O to watch.
        """
        probe = (self._state is not CLOSED or self._abandoned >= self.max_abandoned) and self._admit()
        try:
            outcome = start(*args)
        except Exception as exc:
            self._raise_failure(exc, probe, None)
        if isinstance(outcome, list):
            if self._failures or probe or self._failing_since is not None:
                self._succeeded(probe)
            return outcome
        if isinstance(outcome, Call):  # the backend's own: waited on directly
            return self._wait(outcome, probe, time.perf_counter(), None)
        call, stop = _follow(outcome)
        return self._wait(call, probe, time.perf_counter(), stop)

    async def _wait(self, call: Call, probe: bool, started: float, stop: Callable[[], object] | None) -> Any:
        """Wait for a backend call within the budget, then count its outcome."""
        timer = asyncio.get_running_loop().call_later(self.timeout, self._abandon, call, probe, stop)
        try:
            result = await call
        except asyncio.CancelledError:  # the request went away: the call is abandoned all the same
            self._abandon(call, probe, stop)
            raise
        except Exception as exc:  # the backend's failure, or _Abandoned from _abandon at the budget
            self._raise_failure(exc, probe, started)
        finally:
            timer.cancel()
        if self.metrics is not None:
            self.metrics.backend_latency.observe(time.perf_counter() - started)
        if self._failures or probe or self._failing_since is not None:
            self._succeeded(probe)
        return result

    def _abandon(self, call: Call, probe: bool, stop: Callable[[], object] | None) -> None:
        """Stop waiting for ``call`` and count it abandoned until the backend has ended it.

        ``stop`` (our own task's cancel) is called at once, or, for the probe, once the cooldown has
        passed: the breaker waits for a probe's outcome, not just one request's budget, as a cold
        first call after a restart (connect, load the script) may take longer than one budget.
        """
        if call.done() and not call.cancelled():
            return  # the backend has answered (or this call was abandoned already): nothing runs for it
        if not call.done():
            call.set_exception(_Abandoned(f"the backend did not answer within {self.timeout * 1000:.0f} ms"))
        self._abandoned += 1
        call.on_end(partial(self._abandoned_done, probe))
        if stop is not None:
            if probe:
                asyncio.get_running_loop().call_later(max(self.breaker_cooldown, self.timeout), stop)
            else:
                stop()

    def _ping_ended(self, failed: bool) -> None:
        self._ping_running = False

    def _abandoned_done(self, probe: bool, failed: bool) -> None:
        self._abandoned -= 1
        if not probe:
            return
        self._probing = False
        if self._state is not HALF_OPEN:
            return
        if failed:
            self._open("the probe failed")
        else:
            self._succeeded(probe=True)

    def _raise_failure(self, exc: Exception, probe: bool, started: float | None) -> NoReturn:
        """Count a failed call, move the breaker, and raise it as a BackendError (a backend bug included)."""
        if isinstance(exc, BackendError):
            self._failed(exc, probe, started)
            raise exc
        error = _wrap(exc)
        self._failed(error, probe, started)
        raise error from exc

    async def ping(self) -> float:
        """Ping the backend within the timeout; the latency in seconds, or BackendError.

        Bypasses the breaker (a health check must see the backend itself), but never runs two
        pings at once: while an abandoned ping is still running, the next one fails at once.
        """
        if self._ping_running:
            raise _Abandoned("the previous ping has not answered yet")
        started = time.perf_counter()
        call, stop = _follow(self.backend.ping())
        self._ping_running = True
        timer = asyncio.get_running_loop().call_later(self.timeout, self._abandon, call, False, stop)
        try:
            await call
        except (asyncio.CancelledError, _Abandoned):
            self._abandon(call, False, stop)  # at the budget already, or the request went away now
            if _given_up(call):
                call.on_end(self._ping_ended)
            else:
                self._ping_running = False  # it had answered
            raise
        except BackendError:
            self._ping_running = False
            raise
        except Exception as exc:
            self._ping_running = False
            raise _wrap(exc) from exc
        finally:
            timer.cancel()
        self._ping_running = False
        return time.perf_counter() - started

    # -- the breaker -----------------------------------------------------------------------

    def _admit(self) -> bool:
        """Whether this call may go to the backend as the half-open probe; raises _BreakerOpen otherwise."""
        if self._state is CLOSED:
            # Too many abandoned calls still running: stop making new ones.
            self._open(f"{self._abandoned} abandoned backend calls are still running")
        if not self._probing and self._clock() - self._opened_at >= self.breaker_cooldown:
            self._set_state(HALF_OPEN)
            self._probing = True
            logger.debug("asgi_ratelimit: circuit breaker half-open, probing the backend")
            return True
        error = _BreakerOpen("the circuit breaker is open: the backend is not called")
        self._count_failure("breaker_open", error)
        raise error

    def _open(self, why: str) -> None:
        was = self._state
        self._opened_at = self._clock()
        self._set_state(OPEN)
        if was is CLOSED:
            logger.warning(
                "asgi_ratelimit: circuit breaker opened (%s); the backend is not called for %.3g s at a time",
                why,
                self.breaker_cooldown,
            )
        else:
            logger.debug("asgi_ratelimit: the probe failed, circuit breaker open again")

    def _set_state(self, state: BreakerState) -> None:
        self._state = state
        if self.metrics is not None:
            self.metrics.breaker_state.set(_STATE_VALUES[state])

    def _failed(self, error: BackendError, probe: bool, started: float | None) -> None:
        """Count a failed call (timed since ``started`` unless it is None) and move the breaker."""
        if self.metrics is not None and started is not None:
            self.metrics.backend_latency.observe(time.perf_counter() - started)
        kind = error_kind(error)
        self._count_failure(kind, error)
        if kind in BUG_KINDS and _raised_by_code(error):
            self._report_bug(error)
        if probe and isinstance(error, _Abandoned):
            return  # the probe goes on in the background; _abandoned_done decides
        if probe:
            self._probing = False
            self._open("the probe failed")
            return
        if self._state is CLOSED:
            self._failures += 1
            if self._failures >= self.breaker_threshold:
                self._open(f"{self._failures} consecutive failures, the last: {kind}")
        # A call started before the breaker opened changes nothing once it is open.

    def _report_bug(self, error: BackendError) -> None:
        """Log a failure that is a bug with its traceback (at most once per log interval), and remember it."""
        self._bug = error
        now = self._clock()
        if now - self._last_bug_log < self.log_interval:
            return
        self._last_bug_log = now
        logger.error(
            "asgi_ratelimit: a backend call failed with an error that is a bug, not an outage (%s); requests "
            "fail open or closed as configured, and the health route reports the backend unhealthy until a "
            "call succeeds",
            error,
            exc_info=error,
        )

    def _succeeded(self, probe: bool) -> None:
        self._bug = None
        if probe:
            self._probing = False
        if self._state is not CLOSED and not probe:
            return  # a call from before the breaker opened: only the probe may close it
        self._failures = 0
        if self._state is not CLOSED:
            self._set_state(CLOSED)
        if self._failing_since is not None:
            if self._lost_logged:
                logger.info(
                    "asgi_ratelimit: backend recovered after %.1f s (%d calls failed meanwhile); limiting again",
                    self._clock() - self._failing_since,
                    self._failed_calls,
                )
                self._lost_logged = False
            self._failing_since = None
            self._failed_calls = 0

    def _count_failure(self, kind: ErrorKind, error: BackendError) -> None:
        if self.metrics is not None:
            self.metrics.errors[kind].inc()
        self._failed_calls += 1
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._last_log < self.log_interval:
            self._unlogged += 1  # a flapping backend logs once per interval, never once per request
            return
        if not self._lost_logged:
            logger.warning("asgi_ratelimit: backend lost (%s: %s)", kind, error)
            self._lost_logged = True
        else:
            logger.warning(
                "asgi_ratelimit: backend still failing: %d calls failed in the last %.0f s (last: %s: %s)",
                self._unlogged + 1,
                now - self._last_log,
                kind,
                error,
            )
        self._last_log = now
        self._unlogged = 0

    # -- counting outcomes -----------------------------------------------------------------

    def count_decisions(self, spans: Sequence[Span], decisions: Sequence[Decision], dry_run: bool) -> None:
        """Count each applied rule's result (allowed, denied or dry_run_denied) and log denials at DEBUG."""
        metrics = self.metrics
        start = 0
        for name, identity, size in spans:
            end = start + size
            allowed = True
            for index in range(start, end):
                if not decisions[index].allowed:
                    allowed = False
                    break
            start = end
            if allowed:
                if metrics is not None:
                    metrics.count(name, "allowed")
                continue
            result: Result = "dry_run_denied" if dry_run else "denied"
            if metrics is not None:
                metrics.count(name, result)
            if logger.isEnabledFor(logging.DEBUG):
                # The identity is hashed as in the storage keys: never a raw IP, API key or token.
                logger.debug("asgi_ratelimit: %s by rule %r for key %s", result, name, digest(identity))

    def count_failure(self, spans: Sequence[Span], failed_open: bool) -> None:
        """Count a request the backend could not decide, under each rule it applied."""
        metrics = self.metrics
        if metrics is None:
            return
        result: Result = "failed_open" if failed_open else "failed_closed"
        for name, _, _ in spans:
            metrics.count(name, result)


def _raised_by_code(error: BackendError) -> bool:
    """Whether a failure comes from an exception in code (ours, or a driver's), not a backend's own BackendError.

    A backend that raises BackendError itself, with no cause, reports an outage it has recognised.
    """
    cause = error.__cause__
    return cause is not None and not isinstance(cause, BackendError)


def _wrap(exc: BaseException) -> BackendError:
    # A backend bug must fail like a backend outage, never as a 500.
    error = BackendError(f"the backend failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc  # error_kind() follows it before the caller's ``raise ... from``
    return error
