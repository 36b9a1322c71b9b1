"""Rules that charge what a request really cost: counted by outcome (``counts=``), or priced by its response.

Before the app runs, such a rule's key is checked without spending (refused only when it is out of
quota already), or its up-front estimate (``cost=`` with ``charge=``) is spent.  Once the response
shows the cost, it is charged, even past the limit: the key then owes it (a token bucket or GCRA
refuses until the refill has paid it back, a window counts it).  A charge known at the response start
(``counts=`` alone, or ``ResponseHeader``) is made before the start goes out, so the response's headers
show the state after it; one known only at the end (``BodyBytes``, ``FromState``) just before the
last body part goes out, so the client's next request meets it.

A charge is not given up on a Redis blip: the first attempt is awaited within the limiter's budget,
then retried in the background (_charge_retries.py), outside the circuit breaker, within the window of
its policies; hit.lua's charge ledger remembers each request's token, so a charge sent again after its
reply was lost takes nothing more.  The other rules a request matches spend up front and take their
concurrency slots as usual; the slots are given back once the charge at the body's end is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from prometheus_client import CollectorRegistry, Counter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._charge_retries import PendingCharge, PendingCharges, retrieve
from ._headers import rate_limit_headers
from .backends.base import Charged, ChargingBackend, Claim, Hit, new_token
from .backends.memory import MemoryBackend
from .charging import BodyBytes, ChargeSource, FromState, ResponseHeader
from .errors import BackendError, ConfigurationError
from .policies import MICROS, Decision

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from ._limiter import Span
    from .middleware import RateLimitMiddleware, _Guard
    from .rules import CompiledLimits, Rule

__all__ = ["Settlement", "Settler", "settlement_for", "settling"]

logger = logging.getLogger("asgi_ratelimit")

#: A ``counts=`` predicate, called as (status, headers) whatever the user's takes.
Counts = Callable[[int, Headers], bool]

FAILED_STATUS: Final = 500  # what a response that failed before its start is counted as
# The longest a charge is retried (seconds), however long its window: the ledger keeps each charge's token
# that long, so this bounds what the ledgers hold (a token per charge of the last ten minutes at most).
MOST_RETRY: Final = 600
# How much longer than its retries the ledger keeps a token: the last attempt may reach Redis this late.
LEDGER_MARGIN: Final = 5

_any_settling = False  # set once a Rule with counts= or charge= exists: until then no request looks


def settling() -> bool:
    """Whether any Rule counts by outcome or charges after the response (the middleware asks no more otherwise)."""
    return _any_settling


@dataclass(frozen=True)
class Settlement:
    """How one rule is charged after the response."""

    counts: Counts | None  # None: every response counts
    source: ChargeSource | None  # None: the rule's cost, for a response that counts
    estimate: bool  # cost= was given with charge=: spent up front, the difference settled after

    @property
    def known_at_start(self) -> bool:
        """Whether the charge is known once the response starts (else: when its body ends)."""
        return self.source is None or isinstance(self.source, ResponseHeader)


def settlement_for(
    label: str, counts: object, charge: object, cost_given: bool, has_concurrency: bool
) -> Settlement | None:
    """Validate a Rule's ``counts=`` and ``charge=``; None when it has neither."""
    global _any_settling
    if counts is None and charge is None:
        return None
    if charge is not None and not isinstance(charge, (ResponseHeader, BodyBytes, FromState)):
        raise ConfigurationError(
            f"{label}: charge must be ResponseHeader(...), BodyBytes() or FromState(...), got {charge!r}."
        )
    predicate: Counts | None = None
    if counts is not None:
        predicate = _predicate(label, counts)
    if has_concurrency:
        raise ConfigurationError(
            f"{label}: a Concurrency limit cannot be charged after the response; give it a rule of its own."
        )
    _any_settling = True
    return Settlement(predicate, charge, charge is not None and cost_given)


def _predicate(label: str, counts: object) -> Counts:
    if not callable(counts):
        raise ConfigurationError(
            f"{label}: counts must be a callable of the status (or status, headers), got {counts!r}."
        )
    try:
        parameters = [
            p
            for p in inspect.signature(counts).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        parameters = []
    if inspect.iscoroutinefunction(counts):
        raise ConfigurationError(f"{label}: counts must be a plain function, not async, got {counts!r}.")
    if len(parameters) == 2:
        return cast(Counts, counts)
    if len(parameters) == 1:
        one = cast(Callable[[int], bool], counts)
        return lambda status, headers: one(status)
    raise ConfigurationError(
        f"{label}: counts must take the status, or the status and the headers, got {counts!r} "
        f"taking {len(parameters)} arguments."
    )


# -- metrics -------------------------------------------------------------------------


class ChargeMetrics:
    """Checks, charges and debt per rule."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "asgi_ratelimit_checks",
            "Requests of counting or charging rules checked before the app ran (nothing spent), by result.",
            ["rule", "result"],
            registry=registry,
        )
        self.charges = Counter(
            "asgi_ratelimit_charges",
            "Charges made after the response, by result: charged, in_debt (the key owes after it), "
            "retried (got through after a retry), lost (given up at the end of the window).",
            ["rule", "result"],
            registry=registry,
        )
        self.units = Counter(
            "asgi_ratelimit_charged_units",
            "Units charged after the response (beyond any estimate).",
            ["rule"],
            registry=registry,
        )
        self.debt = Counter(
            "asgi_ratelimit_debt_units",
            "Units charged past a key's remaining quota: what keys were left owing, summed.",
            ["rule"],
            registry=registry,
        )


# Built once per registry, as _metrics.py does: a second middleware on one registry shares them.
_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ChargeMetrics] = weakref.WeakKeyDictionary()


def _metrics_for(registry: CollectorRegistry) -> ChargeMetrics:
    metrics = _METRICS.get(registry)
    if metrics is None:
        metrics = _METRICS[registry] = ChargeMetrics(registry)
    return metrics


# -- the request path ------------------------------------------------------------------


@dataclass
class _Part:
    """One settling rule of a request: its hits' indexes, and what is known of its charge so far."""

    name: str
    settlement: Settlement
    indexes: range
    cost: int  # the rule's cost (counts= alone), or its estimate (charge= with cost=)


class Settler:
    """Runs the requests that apply a counting or charging rule, for one middleware."""

    def __init__(self, middleware: RateLimitMiddleware) -> None:
        self.middleware = middleware
        self.limiter = middleware.limiter
        backend = self.limiter.backend
        self.backend: ChargingBackend | None = backend if isinstance(backend, ChargingBackend) else None
        self._now: Callable[[Sequence[Hit], str, int], Charged] | None = (
            backend.charge_now if type(backend) is MemoryBackend else None
        )
        self.metrics: ChargeMetrics | None = None  # built by prepare(), when a rule settles
        self._settlements: dict[str, Settlement] = {}  # rule name -> how it settles, for the middleware's rules
        self.pending = None if self.backend is None else PendingCharges(self.backend, self._finished_later)

    def prepare(self, rules: Sequence[Rule]) -> None:
        """Check that the backend can settle the rules that need it, and export their metrics at zero.

        Raises ConfigurationError when a rule counts or charges after the response on a backend that cannot.
        """
        for rule in rules:
            if rule.settlement is None:
                continue
            self._settlements[rule.name] = rule.settlement
            if self.backend is None:
                raise ConfigurationError(
                    f"Rule {rule.name!r}: counts= and charge= need a backend with check() and charge() "
                    f"(MemoryBackend or RedisBackend), got {self.limiter.backend!r}."
                )
            if self.limiter.metrics is not None:
                # Every series from the start, so rate() and alerts see them before the first event.
                metrics = self.metrics = _metrics_for(self.limiter.metrics.registry)
                for result in ("allowed", "denied"):
                    metrics.checks.labels(rule.name, result)
                for result in ("charged", "in_debt", "retried", "lost"):
                    metrics.charges.labels(rule.name, result)
                metrics.units.labels(rule.name)
                metrics.debt.labels(rule.name)

    async def run(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: HTTPConnection | None,
        hits: list[Hit],
        spans: list[Span],
        policy_items: tuple[str, ...],
        item_names: tuple[str, ...],
        fail_open: bool,
        guard: _Guard | None,
        slots: list[tuple[str, str, CompiledLimits]] | None = None,
    ) -> None:
        """Check (or spend the estimate) before the app runs, run it, and charge what its response cost.

        Other rules' limits are spent up front, and their concurrency slots taken, as the middleware does
        (one call, all or nothing); the slots are given back once the charge at the body's end is made.
        """
        middleware = self.middleware
        parts: list[_Part] = []
        spend: list[int] = []  # hits spent up front: other rules', and estimates
        checked: list[Hit] = []  # every hit, as a check sees it (a charge= rule's: one unit)
        start = 0
        for name, _, size in spans:
            indexes = range(start, start + size)
            start += size
            settlement = self._settlements.get(name)
            if settlement is None or settlement.estimate:
                spend += indexes
                checked += hits[indexes.start : indexes.stop]
            else:
                checked += [
                    (identity, policy, 1 if settlement.source else cost)
                    for identity, policy, cost in hits[indexes.start : indexes.stop]
                ]
            if settlement is not None:
                parts.append(_Part(name, settlement, indexes, hits[indexes.start][2]))
        claims: list[Claim] = []
        for _, identity, limits in slots or ():
            assert limits.concurrency is not None
            claims.append((identity, limits.concurrency))
        token = new_token()  # names the slots and the charges alike
        slot_of: dict[str, Decision] = {}  # rule name -> its slot's decision
        try:
            if len(spend) < len(hits):
                decisions = await self._check(checked)
                self._count_checks(parts, decisions)
            else:
                decisions = []
            if all(decision.allowed for decision in decisions) and (spend or claims):
                spend_hits = [hits[index] for index in spend]
                if claims:
                    spent = await self.limiter.acquire(spend_hits, claims, token)
                    if len(spent) > len(spend_hits):  # else the deny cache answered: no slot was looked at
                        assert slots is not None
                        slot_of = {name: spent[len(spend_hits) + i] for i, (name, _, _) in enumerate(slots)}
                    spent = spent[: len(spend_hits)]
                else:
                    spent = await self.limiter.decide(spend_hits)
                if decisions:
                    for index, decision in zip(spend, spent, strict=True):
                        decisions[index] = decision
                else:
                    decisions = spent
        except BackendError:
            self.limiter.count_failure(spans, fail_open)
            if not fail_open:
                await middleware._unavailable(scope, receive, send)
                return
            decisions = []  # failed open: the app runs (without slots), and its charge is still made
        # Each rule counted once, its slot with its rate limits; the slots' items follow the hits' in the headers.
        counted: list[Decision] = []
        counted_spans: list[Span] = []
        start = 0
        for name, identity, size in spans if decisions else ():
            counted += decisions[start : start + size]
            start += size
            slot = slot_of.get(name)
            if slot is not None:
                counted.append(slot)
            counted_spans.append((name, identity, size + (slot is not None)))
        for name, _, limits in slots or ():
            if name in slot_of:
                decisions.append(slot_of[name])
                policy_items += (limits.concurrency_item,)
                item_names += (limits.concurrency_name,)
        if counted:
            self.limiter.count_decisions(counted_spans, counted, middleware.dry_run)
        denied = not all(decision.allowed for decision in decisions)
        if denied and not middleware.dry_run:
            headers = rate_limit_headers(decisions, policy_items, item_names, middleware.header_mode, denied=True)
            await middleware._deny(scope, receive, send, request, decisions, item_names, headers)
            return
        held = claims if slot_of and not denied else []  # a refused dry run runs holding no slot
        await self._run_app(
            app, scope, receive, send, guard, hits, parts, decisions, policy_items, item_names, token, held
        )

    async def _check(self, hits: list[Hit]) -> list[Decision]:
        limiter = self.limiter
        assert self.backend is not None
        if self._now is not None:
            backend = cast(MemoryBackend, limiter.backend)
            return limiter.check_in_process(backend.check_now, hits)
        return await limiter.decide(hits, self.backend.check)

    async def _run_app(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        guard: _Guard | None,
        hits: list[Hit],
        parts: list[_Part],
        decisions: list[Decision],
        policy_items: tuple[str, ...],
        item_names: tuple[str, ...],
        token: str,
        held: list[Claim],
    ) -> None:
        from .middleware import _with_headers

        middleware = self.middleware
        state: dict[str, Any] = scope.setdefault("state", {})  # shared with the app's request.state
        status: int | None = None
        response_headers: Headers | None = None
        header_costs: dict[str, int | None] = {}
        sent = 0
        charged_at_start = False
        finished = False
        strip = {
            part.settlement.source.raw
            for part in parts
            if isinstance(part.settlement.source, ResponseHeader) and not part.settlement.source.keep
        }

        def costs(at_end: bool) -> list[tuple[int, str, Hit]]:
            """(index among the request's hits, rule name, hit) to charge for the parts settled now."""
            charged: list[tuple[int, str, Hit]] = []
            for part in parts:
                settlement = part.settlement
                if settlement.known_at_start == at_end:
                    continue
                counted = settlement.counts is None or _counted(
                    settlement.counts, status or FAILED_STATUS, response_headers or Headers(), part.name
                )
                source = settlement.source
                amount: int | None
                if not counted:
                    if not settlement.estimate:
                        continue
                    amount = 0  # a response that does not count gives its estimate back
                elif source is None:
                    amount = part.cost
                elif isinstance(source, ResponseHeader):
                    amount = header_costs.get(part.name)
                elif isinstance(source, BodyBytes):
                    amount = sent
                else:
                    amount = _whole(state.get(source.name), part.name, source)
                if amount is None:
                    continue  # the app reported no cost: only the estimate (if any) is spent
                if settlement.estimate:
                    amount -= part.cost  # the estimate is spent already: the difference, below 0 a refund
                if amount:
                    for index in part.indexes:
                        identity, policy, _ = hits[index]
                        charged.append((index, part.name, (identity, policy, amount)))
            return charged

        async def end() -> None:
            """Charge what is known at the end, then give the slots back (before the last body part goes out)."""
            nonlocal finished
            finished = True
            try:
                await self._charge(costs(at_end=True), token + "e")
            finally:
                if held:
                    await self.limiter.release(held, token)

        async def settling_send(message: Message) -> None:
            nonlocal status, response_headers, sent, charged_at_start, finished
            kind = message["type"]
            if kind == "http.response.start":
                status = int(message["status"])
                raw = list(message.get("headers") or [])
                response_headers = Headers(raw=raw)
                for part in parts:
                    source = part.settlement.source
                    if isinstance(source, ResponseHeader):
                        header_costs[part.name] = _whole(response_headers.get(source.name), part.name, source)
                if strip:
                    message = {**message, "headers": [(n, v) for n, v in raw if n.lower() not in strip]}
                charged_at_start = True
                after = await self._charge(costs(at_end=False), token + "s")
                shown = list(decisions)
                if shown:  # else the check failed open: no headers
                    for index, decision in after:
                        shown[index] = decision
                headers = (
                    rate_limit_headers(shown, policy_items, item_names, middleware.header_mode, denied=False)
                    if shown
                    else []
                )
                await _with_headers(send, headers, guard)(message)
                return
            if kind == "http.response.pathsend" and not finished:
                await end()  # a file the server sends: always the last message, its size unseen here
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if not message.get("more_body", False) and not finished:
                    sent += len(body)
                    await end()
                    await send(message)
                    return
                await send(message)
                sent += len(body)
                return
            await send(message)

        try:
            await app(scope, receive, settling_send)
        finally:
            # The app failed, or the client went away, before the response was complete: charged as a
            # status 500 when it never started, with the bytes that did go out.
            if not charged_at_start:
                charged_at_start = True
                await self._charge(costs(at_end=False), token + "s")
            if not finished:
                status = FAILED_STATUS  # the response did not complete: it failed, whatever it started as
                await end()

    async def _charge(self, charged: list[tuple[int, str, Hit]], token: str) -> list[tuple[int, Decision]]:
        """Make a charge within the budget: the Decisions after it, by index among the request's hits.

        None are known when there was nothing to charge, or the charge did not get through in time: then it
        goes on in the background.
        """
        if not charged:
            return []
        assert self.backend is not None
        hits = [hit for _, _, hit in charged]
        names = tuple(name for _, name, _ in charged)
        horizon = min(MOST_RETRY, max(policy.window_seconds for _, policy, _ in hits))
        charge = PendingCharge(hits, names, token, (horizon + LEDGER_MARGIN) * MICROS, time.monotonic() + horizon, None)
        if self._now is not None:
            result = self._now(hits, "", charge.remember_us)  # made once, at once: nothing to remember
        elif self.limiter.state != "closed":
            # The backend is failing: the response does not wait on it; the retries find it when it is back.
            self._later(charge)
            return []
        else:
            attempt = asyncio.ensure_future(self.backend.charge(hits, token, charge.remember_us))
            try:
                await asyncio.wait([attempt], timeout=self.limiter.timeout)
            except asyncio.CancelledError:
                charge.attempt = attempt
                self._later(charge)
                raise
            if not attempt.done() or attempt.cancelled() or attempt.exception() is not None:
                charge.attempt = attempt if not attempt.done() else None
                if charge.attempt is None:
                    retrieve(attempt)
                self._later(charge)
                return []
            result = attempt.result()
        self._count(charge, result, retried=False)
        return [(index, decision) for (index, _, _), decision in zip(charged, result[0], strict=True)]

    def _later(self, charge: PendingCharge) -> None:
        assert self.pending is not None
        self.pending.add(charge)

    def _finished_later(self, charge: PendingCharge, result: Charged | None) -> None:
        if result is None:
            if self.metrics is not None:
                for name in dict.fromkeys(charge.names):
                    self.metrics.charges.labels(name, "lost").inc()
            logger.warning(
                "asgi_ratelimit: a charge after the response was given up: the backend did not take it within "
                "the window of its policies"
            )
            return
        self._count(charge, result, retried=True)

    def _count(self, charge: PendingCharge, result: Charged, retried: bool) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        # The reply tells the most any entry owes; a request charges one rule, or a few of one client.
        owed = result[1]
        for name in dict.fromkeys(charge.names):
            units = max(cost for (_, _, cost), owner in zip(charge.hits, charge.names, strict=True) if owner == name)
            metrics.charges.labels(name, "retried" if retried else ("in_debt" if owed else "charged")).inc()
            if units > 0:  # a refund is no charged unit
                metrics.units.labels(name).inc(units)
            if owed:
                metrics.debt.labels(name).inc(owed)

    def _count_checks(self, parts: list[_Part], decisions: list[Decision]) -> None:
        if self.metrics is None:
            return
        for part in parts:
            if part.settlement.estimate:
                continue
            allowed = all(decisions[index].allowed for index in part.indexes)
            self.metrics.checks.labels(part.name, "allowed" if allowed else "denied").inc()


def _counted(counts: Counts, status: int, headers: Headers, name: str) -> bool:
    """The rule's predicate; a predicate that raises counts the response (the safe side for a brute-force rule)."""
    try:
        return bool(counts(status, headers))
    except Exception:
        logger.exception("asgi_ratelimit: rule %r: the counts predicate raised; the response is counted", name)
        return True


def _whole(value: object, name: str, source: ChargeSource) -> int | None:
    """A reported cost as a whole number; None when the app reported none, or not a whole number (logged)."""
    if isinstance(value, (str, bytes)):
        with contextlib.suppress(ValueError):
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if value is not None:
        # The value itself is not logged: a header may carry anything.
        logger.warning(
            "asgi_ratelimit: rule %r: %r is not a whole number (a %s); only the estimate, if any, is spent",
            name,
            source,
            type(value).__name__,
        )
    return None
