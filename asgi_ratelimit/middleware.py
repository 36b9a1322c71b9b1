"""RateLimitMiddleware: a plain ASGI middleware that limits requests by rule and key.

Everything is validated and precompiled in ``__init__``; a request only matches rules, pulls
keys, makes one backend call for all of its limits, and either answers 429 directly or lets the
app run, adding the headers to ``http.response.start`` as it passes (bodies stream untouched).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._charging import Settler
from ._context import Refusal, current_guard
from ._headers import (
    HEADER_NAMES,
    QUOTA_EXCEEDED,
    HeaderMode,
    check_mode,
    item_name,
    one_limit_headers,
    rate_limit_headers,
    retry_after_seconds,
)
from ._limiter import Limiter, Span
from ._scope import route_path
from ._startup import backend_from, check_rules_reach_routes, ping_at_startup
from .backends.base import Backend, Claim, Hit, new_token
from .errors import BackendError, ConfigurationError
from .health import OperationsApp
from .policies import Decision
from .rules import CompiledLimits, PathPattern, Rule, bypassed_endpoint, endpoint_rules_named, endpoints_marked

__all__ = ["RateLimitMiddleware"]

logger = logging.getLogger("asgi_ratelimit")

#: The longest a shutdown waits for charges and slot releases still being retried (seconds).  Well inside
#: the 30 s that Kubernetes, for one, gives a pod to stop.
SHUTDOWN_GRACE = 5.0

OnLimited = Callable[[HTTPConnection, Sequence[Decision]], Awaitable[ASGIApp] | ASGIApp]
ExemptPredicate = Callable[[HTTPConnection], bool | Awaitable[bool]]
Exempt = Iterable[str] | ExemptPredicate


class RateLimitMiddleware:
    """Rate-limit an ASGI app by rules.

    Args:
        app: the ASGI app to protect.
        rules: the Rules; every rule that matches a request applies, and the request passes only
            when all of their limits allow it.  Endpoints marked with ``@rate_limit`` add theirs.
        backend: where counts live: a Backend, or a URL (``"redis://host:6379/0"``, ``"rediss://..."``,
            ``"memory://"``); ``MemoryBackend()`` (one process) by default.  At lifespan start-up the
            backend is pinged, and an ERROR is logged when it does not answer (the app still starts).
        headers: ``"ietf"`` (RateLimit and RateLimit-Policy, the default), ``"legacy"``
            (X-RateLimit-*), ``"both"`` or ``"none"``.  Retry-After is always sent on a 429.
        exempt: paths (templates as in Rule) or a predicate of the request that are never limited.
        dry_run: decide, count and send headers, but never deny: to roll a new limit out safely.
        on_limited: ``on_limited(request, decisions)`` returns the response for a denied request
            instead of the default problem+json 429.
        timeout: seconds a backend decision may take before it counts as failed.
        fail_open: when the backend fails, let requests through (True, the default) or answer 503
            (False).  A rule's own ``fail_open`` overrides it; one closed rule closes the request.
        breaker_threshold: consecutive backend failures that open the circuit breaker (default 5).
        breaker_cooldown: seconds the open breaker stops calling the backend before one probe (default 1.0).
        metrics: count decisions, backend latency and errors, and the breaker state (default True).
        registry: the Prometheus registry to count on and to expose; the global REGISTRY by default.
        metrics_path: serve the metrics exposition at this path, exempt from limiting (default None: off).
        health_path: serve backend health at this path and liveness at ``<health_path>/live``,
            exempt from limiting (default None: off).
        deny_cache: answer a hit Redis just denied from memory until Redis could first allow it,
            which makes a flood on one key cost no round trips; exact, see _deny_cache.py (default True).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[Rule] = (),
        backend: Backend | str | None = None,
        headers: HeaderMode = "ietf",
        exempt: Exempt = (),
        dry_run: bool = False,
        on_limited: OnLimited | None = None,
        timeout: float = 0.05,
        fail_open: bool = True,
        breaker_threshold: int = 5,
        breaker_cooldown: float = 1.0,
        metrics: bool = True,
        registry: CollectorRegistry | None = None,
        metrics_path: str | None = None,
        health_path: str | None = None,
        deny_cache: bool = True,
    ) -> None:
        self.app = app
        self.backend, self._backend_url = backend_from(backend)  # a URL string is built here, and closed at shutdown
        if not isinstance(metrics, bool):
            raise ConfigurationError(f"metrics must be True or False, got {metrics!r}.")
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        self.limiter = Limiter(
            self.backend,
            timeout=timeout,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            registry=self.registry if metrics else None,
            deny_cache=deny_cache,
        )
        # rule name -> allowed decisions, the metric nearly every request adds to (None: metrics are off).
        self._allowed_counts = None if self.limiter.metrics is None else self.limiter.metrics.decisions.allowed
        self._operations: OperationsApp | None = None
        if metrics_path is not None or health_path is not None:
            self._operations = OperationsApp(
                self.limiter, registry=self.registry, metrics_path=metrics_path, health_path=health_path
            )
        self.header_mode = check_mode(headers)
        self._ietf = self.header_mode == "ietf"  # the default, whose usual response has prepared headers
        self.dry_run = bool(dry_run)
        self.on_limited = on_limited
        if not isinstance(fail_open, bool):
            raise ConfigurationError(f"fail_open must be True or False, got {fail_open!r}.")
        self.fail_open = fail_open
        self.rules: list[Rule] = []
        for rule in rules:
            if not isinstance(rule, Rule):
                raise ConfigurationError(f"rules must hold Rule objects, got {rule!r}.")
            self._add_rule(rule)
        self._exempt_predicate: ExemptPredicate | None = None
        self._exempt_paths: list[PathPattern] = []
        if callable(exempt):
            self._exempt_predicate = exempt
        else:
            if isinstance(exempt, str):
                raise ConfigurationError(f"exempt must be a list of paths or a predicate, got {exempt!r}.")
            self._exempt_paths = [PathPattern(path, "exempt path") for path in exempt]
        self._settler = Settler(self)  # for rules with counts= or charge=
        self._settler.prepare(self.rules)
        self._settles = any(rule.settlement for rule in self.rules)  # read per request: no call while none does

    def _add_rule(self, rule: Rule) -> None:
        if any(existing.name == rule.name for existing in self.rules):
            raise ConfigurationError(f"Two rules are named {rule.name!r}: give one of them another name=.")
        self.rules.append(rule)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            await (self._lifespan(scope, receive, send) if scope_type == "lifespan" else self.app(scope, receive, send))
            return
        path = route_path(scope) if scope.get("root_path") else scope["path"]  # not mounted: no call
        if self._operations is not None and scope_type == "http" and path in self._operations.paths:
            await self._operations.serve(path, scope, send)
            return
        if not endpoints_marked():
            await self._limit(scope, receive, send, path, None)
            return
        # Some endpoint is marked with @rate_limit: it asks this request's guard when it is reached.
        guard = _Guard(self, scope, receive, send)
        token = current_guard.set(guard)
        try:
            await self._limit(scope, receive, guard.send, path, guard)
        finally:
            current_guard.reset(token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app's lifespan with the middleware's own steps around it.

        Once the app has started: the backend is pinged and the rules checked against its routes.  When the
        server asks for shutdown, before the app hears of it (its handlers may close the backend): what is
        still owed to the backend is sent, for at most SHUTDOWN_GRACE seconds.  Once the app has shut down:
        a backend built from a URL is closed.
        """

        async def receive_owed_first() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._send_what_is_owed()
            return message

        async def send_with_checks(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await ping_at_startup(self.backend, self._backend_url)
                check_rules_reach_routes(self.rules, scope.get("app") or self.app)
            elif message["type"] == "lifespan.shutdown.complete" and self._backend_url is not None:
                await self.backend.aclose()
            await send(message)

        await self.app(scope, receive_owed_first, send_with_checks)

    async def _send_what_is_owed(self) -> None:
        """Wait, within SHUTDOWN_GRACE, for the charges after responses and the slot releases still being retried."""
        owed = [queue for queue in (self._settler.pending, self.limiter.releases) if queue is not None and len(queue)]
        if not owed:
            return
        try:
            await asyncio.wait_for(asyncio.gather(*(queue.wait() for queue in owed)), SHUTDOWN_GRACE)
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            left = sum(len(queue) for queue in owed)
            logger.warning(
                "asgi_ratelimit: shutting down with %d charges or slot releases the backend has not taken after "
                "%g s; they are lost when the process exits",
                left,
                SHUTDOWN_GRACE,
            )

    def _limit(self, scope: Scope, receive: Receive, send: Send, path: str, guard: _Guard | None) -> Awaitable[None]:
        """What to await for the request: the app, or the middleware's Rules applied around it.

        A plain function, not a coroutine: it only chooses, and a coroutine would be one more frame per request.
        """
        method = scope.get("method", "GET")
        matched = []
        for rule in self.rules:  # a loop, not a comprehension: most requests match one rule or none
            if rule.matches(method, path):
                matched.append(rule)
        if self._exempt_paths and any(pattern.matches(path) for pattern in self._exempt_paths):
            if guard is not None:
                guard.exempt = True
            return self.app(scope, receive, send)
        if not matched:
            return self.app(scope, receive, send)
        return self._apply(matched, self.app, scope, receive, send, guard)

    async def _apply(
        self, matched: Sequence[Rule], app: ASGIApp, scope: Scope, receive: Receive, send: Send, guard: _Guard | None
    ) -> None:
        """Decide the ``matched`` rules in one backend call, then run ``app`` or answer 429 (or 503) instead."""
        # Built only for user code (a predicate, a key, limits or cost callable, on_limited): the built-in
        # extractors read the scope, and building a Request is a noticeable part of what the middleware adds.
        request: HTTPConnection | None = None
        if self._exempt_predicate is not None:
            request = _connection(scope, receive)
            if await self._exempted(request, guard):
                await app(scope, receive, send)
                return

        hits: list[Hit] = []
        spans: list[Span] = []  # (rule name, identity, number of hits) for metrics and logs
        slots: list[tuple[str, str, CompiledLimits]] | None = None  # (rule name, identity, limits) with a Concurrency
        policy_items: tuple[str, ...] = ()
        item_names: tuple[str, ...] = ()
        only: CompiledLimits | None = None  # the limits of the one rule applied, when only one is
        fail_open = True  # the request fails open only when every applied rule does
        for rule in matched:  # a loop, not a comprehension: most requests apply one rule
            if rule.reads_scope:
                resolved = rule.resolve_scope(scope)
            else:
                if request is None:
                    request = _connection(scope, receive)
                resolved = await rule.resolve(request)
            if resolved is None:
                continue  # the rule's key is None: it does not apply to this request
            identity, limits, cost = resolved
            for policy in limits.policies:
                hits.append((identity, policy, cost))
            spans.append((rule.name, identity, len(limits.policies)))
            policy_items += limits.policy_items
            item_names += limits.item_names
            only = limits if len(spans) == 1 else None
            if limits.concurrency is not None:
                if slots is None:
                    slots = []
                slots.append((rule.name, identity, limits))
            if not (self.fail_open if rule.fail_open is None else rule.fail_open):
                fail_open = False
        if not hits and not slots:
            await app(scope, receive, send)
            return
        if self._settles and scope["type"] == "http" and any(rule.settlement for rule in matched):
            # A rule counts by outcome or charges what the response cost: checked now, charged after.
            await self._settler.run(
                app, scope, receive, send, request, hits, spans, policy_items, item_names, fail_open, guard, slots
            )
            return
        if slots:
            # The rate limits and the slots are decided together, in one backend call.
            await self._run_with_slots(
                app, scope, receive, send, request, hits, spans, slots, policy_items, item_names, fail_open, guard
            )
            return

        await self._decide(
            app, scope, receive, send, request, hits, spans, policy_items, item_names, only, fail_open, guard
        )

    async def _exempted(self, request: HTTPConnection, guard: _Guard | None) -> bool:
        """Whether the ``exempt`` predicate exempts the request (asked once per request, the guard remembers)."""
        if guard is not None and guard.exempt is not None:
            return guard.exempt
        assert self._exempt_predicate is not None
        exempted = self._exempt_predicate(request)
        # An async predicate returns a coroutine, which is truthy: await it, or everything is exempt.
        if inspect.isawaitable(exempted):
            exempted = await exempted
        if guard is not None:
            guard.exempt = bool(exempted)
        return bool(exempted)

    async def _decide(
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
        only: CompiledLimits | None,
        fail_open: bool,
        guard: _Guard | None,
    ) -> None:
        """Decide the hits in one backend call, count the result, then run ``app`` with the headers or refuse."""
        try:
            decisions = await self.limiter.decide(hits)
        except BackendError:
            self.limiter.count_failure(spans, fail_open)
            if fail_open:
                await app(scope, receive, send)
            else:
                await self._unavailable(scope, receive, send)
            return

        denied = False
        for decision in decisions:
            if not decision.allowed:
                denied = True
                break
        if denied:
            self.limiter.count_decisions(spans, decisions, self.dry_run)
        elif self._allowed_counts is not None:  # counted here, not in a call: nearly every request comes this way
            counts = self._allowed_counts
            for name, _, _ in spans:
                counts[name] = counts.get(name, 0) + 1
        if denied and not self.dry_run:
            headers = rate_limit_headers(decisions, policy_items, item_names, self.header_mode, denied=True)
            await self._deny(scope, receive, send, request, decisions, item_names, headers)
            return
        # Allowed (or a dry run): never a Retry-After on a response the app produces.
        if only is not None and only.state_format is not None and not denied and self._ietf:
            headers = one_limit_headers(only.policy_header, only.state_format, decisions[0])  # the usual response
        else:
            # One rule's RateLimit-Policy value is joined ahead of time; several rules' are joined here.
            policy_header = None if only is None else only.policy_header
            headers = rate_limit_headers(
                decisions, policy_items, item_names, self.header_mode, denied=False, policy_header=policy_header
            )
        await app(scope, receive, _with_headers(send, headers, guard))

    async def _run_with_slots(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: HTTPConnection | None,
        hits: list[Hit],
        spans: list[Span],
        slots: list[tuple[str, str, CompiledLimits]],
        policy_items: tuple[str, ...],
        item_names: tuple[str, ...],
        fail_open: bool,
        guard: _Guard | None = None,
    ) -> None:
        """Decide the rate limits and take the slots in one atomic call, run the app, give the slots back.

        All or nothing: a request refused by any limit, rate or concurrency, takes from none of them.
        """
        claims: list[Claim] = []
        for _, identity, limits in slots:
            assert limits.concurrency is not None
            claims.append((identity, limits.concurrency))
        token = new_token()
        try:
            decisions = await self.limiter.acquire(hits, claims, token)
        except BackendError:
            # The limiter releases whatever the call may still take in Redis.
            self.limiter.count_failure(spans, fail_open)
            if fail_open:
                await app(scope, receive, send)  # run without the slots, as a failed-open rate limit would
            else:
                await self._unavailable(scope, receive, send)
            return
        slot_of: dict[str, Decision] = {}
        if len(decisions) > len(hits):  # else the deny cache answered: refused by a rate limit, no slot looked at
            for index, (name, _, limits) in enumerate(slots):
                slot_of[name] = decisions[len(hits) + index]
                policy_items += (limits.concurrency_item,)
                item_names += (limits.concurrency_name,)
        self._count_with_slots(spans, decisions, slot_of)
        taken = all(decision.allowed for decision in decisions)  # else nothing was taken, slots included
        if not taken and not self.dry_run:
            headers = rate_limit_headers(decisions, policy_items, item_names, self.header_mode, denied=True)
            await self._deny(scope, receive, send, request, decisions, item_names, headers)
            return
        headers = rate_limit_headers(decisions, policy_items, item_names, self.header_mode, denied=False)
        inner = _with_headers(send, headers, guard)
        if not taken:  # a dry run refused: it runs, holding no slot
            await app(scope, receive, inner)
            return
        released = False

        async def send_then_release(message: Message) -> None:
            # A server starts the connection's next request as soon as this response is complete,
            # before this call returns: the slot is given back just before the last body part goes
            # out, so a client that sends its next request on the answer finds it free.
            nonlocal released
            kind = message["type"]
            if not released and (
                (kind == "http.response.body" and not message.get("more_body", False))
                or kind == "http.response.pathsend"  # a file sent by the server: always the last message
            ):
                released = True
                await self.limiter.release(claims, token)
            await inner(message)

        try:
            await app(scope, receive, send_then_release if scope["type"] == "http" else inner)
        finally:
            # Whatever way the app ended without a complete response (an exception, a client gone
            # away, a websocket closing): released before this call returns, even when cancelled.
            if not released:
                await self.limiter.release(claims, token)

    def _count_with_slots(self, spans: list[Span], decisions: list[Decision], slot_of: dict[str, Decision]) -> None:
        """Count each rule once, its slot with its rate limits: a span's decisions, then its slot's."""
        counted: list[Decision] = []
        counted_spans: list[Span] = []
        start = 0
        for name, identity, size in spans:
            counted += decisions[start : start + size]
            start += size
            slot = slot_of.get(name)
            if slot is not None:
                counted.append(slot)
            counted_spans.append((name, identity, size + (slot is not None)))
        self.limiter.count_decisions(counted_spans, counted, self.dry_run)

    # -- responses ---------------------------------------------------------------------

    async def _deny(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: HTTPConnection | None,
        decisions: Sequence[Decision],
        item_names: Sequence[str],
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        guard = current_guard.get()
        if isinstance(guard, _Guard) and guard.refusals is not None:
            guard.refusals.append((tuple(decisions), headers))  # a dependency asked: it raises its own exception
            return
        if self.on_limited is not None:
            response = await self._on_limited(
                request if request is not None else _connection(scope, receive), decisions
            )
            if response is not None:
                await response(scope, receive, _with_headers(send, headers))
                return
        violated: list[str] = []
        wait = 0
        never = False
        for name, decision in zip(item_names, decisions, strict=True):
            if not decision.allowed:
                violated.append(name)
                wait = max(wait, retry_after_seconds(decision))
                never = never or decision.never
        body = _deny_body(tuple(violated), wait, never)
        await _respond(scope, receive, send, 429, body, "Too Many Requests", headers)

    async def _on_limited(self, request: HTTPConnection, decisions: Sequence[Decision]) -> ASGIApp | None:
        """The user's answer to a denied request; None (the default 429) when ``on_limited`` failed.

        ``raise HTTPException(...)`` is how FastAPI and Starlette users answer: it becomes that response
        (its status, detail and headers, plus the rate-limit headers).  Any other exception is a bug in
        the callback: logged with its traceback, and the request still gets the default 429, never a 500.
        """
        assert self.on_limited is not None
        try:
            response = self.on_limited(request, decisions)
            if inspect.isawaitable(response):
                response = await response
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        except Exception:
            logger.exception("asgi_ratelimit: on_limited raised; the default 429 is sent instead")
            return None
        return response

    async def _unavailable(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = {
            "type": "about:blank",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "The rate limiter cannot reach its backend, and this route is configured to fail closed.",
            "retry_after": 1,
        }
        body = _problem_body(problem)
        await _respond(scope, receive, send, 503, body, "Service Unavailable", [(b"retry-after", b"1")])

    # -- support tools -------------------------------------------------------------------

    async def reset(self, rule_name: str, key: str) -> None:
        """Forget ``key``'s counts under the rule named ``rule_name``: its next request finds a full allowance.

        ``rule_name`` names one of the rules given to the middleware, or an ``@rate_limit`` endpoint's
        (``name=``, or ``module.function``); ``key`` is what its extractor returns (a client IP, an API key).
        A rule whose limits depend on the request is reset under every tier this process has applied.
        Raises ConfigurationError for an unknown rule, BackendError when the backend does not answer.
        Another process may still deny the key from its own deny cache until the wait it last told.
        """
        rules = [rule for rule in self.rules if rule.name == rule_name] or endpoint_rules_named(rule_name)
        if not rules:
            names = ", ".join(repr(rule.name) for rule in self.rules) or "none"
            raise ConfigurationError(
                f"No rule is named {rule_name!r}; the rules are: {names}; nor is any @rate_limit endpoint."
            )
        known = (limits for rule in rules for limits in rule.known_limits())
        policies = list(dict.fromkeys(policy for limits in known for policy in limits.policies))
        await self.limiter.reset(rules[0].identity(key), policies)


class _Guard:
    """One request's hold on the middleware, for the ``@rate_limit`` endpoint it may reach (see _context.py).

    Its ``send`` adds, at the response start, the headers of every limit applied to the request: the
    middleware's Rules and the endpoint's, which are decided apart (each set all or nothing).
    """

    def __init__(self, middleware: RateLimitMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
        self.middleware = middleware
        self.scope = scope
        self.receive = receive
        self.raw_send = send
        self.headers: list[tuple[bytes, bytes]] = []
        self.exempt: bool | None = None  # None: not asked yet
        self.reached = False  # a @rate_limit endpoint asked this guard
        # While a dependency decides: the denials _deny reports instead of answering.
        self.refusals: list[tuple[tuple[Decision, ...], list[tuple[bytes, bytes]]]] | None = None

    def add(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Add headers to the response; the RateLimit fields of several decisions join into one list each."""
        for name, value in headers:
            for index, (present, earlier) in enumerate(self.headers):
                if present == name:
                    joined = earlier + b", " + value if name in _LIST_FIELDS else value
                    self.headers[index] = (name, joined)
                    break
            else:
                self.headers.append((name, value))

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start" or kind == "websocket.accept":
            self._check_bypass()
            if self.headers:
                await _with_headers(self.raw_send, self.headers)(message)
                return
        await self.raw_send(message)

    async def check(self, rules: tuple[Rule, ...], call: Callable[[], Awaitable[Any]]) -> Any:
        """Decide ``rules`` and return what ``call()`` returns, or the 429 (or 503) to answer with instead."""
        self.reached = True
        if self.exempt:
            return await call()
        result: list[Any] = []

        async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
            result.append(await call())

        answer: list[Message] = []

        async def capture(message: Message) -> None:
            answer.append(message)

        websocket = self.scope["type"] == "websocket"
        await self.middleware._apply(
            rules, endpoint, self.scope, self.receive, self.send if websocket else capture, self
        )
        if result:
            return result[0]
        # Refused: the answer is handed back as the endpoint's response, so the app's own middleware sees it.
        return None if websocket else _Replay(answer)

    async def decide(self, rules: tuple[Rule, ...]) -> Refusal | None:
        """Decide ``rules`` for a dependency: None when allowed (their headers join the response's), else the refusal.

        The same decision as ``check``'s, but a denial is handed back rather than answered: the dependency raises
        it as an exception, which the app's exception handlers answer.
        """
        if self.exempt:
            return None
        passed: list[bool] = []

        async def proceed(scope: Scope, receive: Receive, send: Send) -> None:
            passed.append(True)

        answer: list[Message] = []

        async def capture(message: Message) -> None:
            answer.append(message)

        # A refused websocket handshake is answered by the dependency's exception, not here: the middleware
        # must not take the connect message the app's own WebSocket is still to receive.
        receive = self.receive if self.scope["type"] == "http" else _connect_message
        self.refusals = []
        try:
            await self.middleware._apply(rules, proceed, self.scope, receive, capture, self)
            refusals = self.refusals
        finally:
            self.refusals = None
        if passed:
            return None
        if refusals:
            decisions, headers = refusals[0]
            self.add(headers)  # with the headers of the limits that allowed it, so a handler's response has all
            return Refusal(429, decisions, list(self.headers))
        # The backend failed and a rule fails closed: the middleware answered 503.
        start = next((m for m in answer if m["type"].endswith("response.start")), None)
        if start is None:  # a websocket handshake closed (no denial response): the middleware's 503 answer
            return Refusal(503, (), [(b"retry-after", b"1")])
        retry = [(name, value) for name, value in start.get("headers", ()) if name == b"retry-after"]
        return Refusal(int(start["status"]), (), retry)

    def _check_bypass(self) -> None:
        if self.reached:
            return
        name = bypassed_endpoint(self.scope.get("endpoint"))
        if name is not None:
            logger.error(
                "asgi_ratelimit: @rate_limit %s is applied above the route decorator, so the route calls the "
                "bare function and it is NOT limited.  Put @rate_limit directly above the function, below "
                "@app.get(...) / @router.post(...).",
                name,
            )


# RateLimit and RateLimit-Policy are lists: the items of several decisions join into one field each.
_LIST_FIELDS = frozenset({b"ratelimit", b"ratelimit-policy"})


class _Replay(Response):
    """The middleware's answer (a 429 or 503) to an endpoint's request, as the Response the endpoint returns."""

    def __init__(self, messages: list[Message]) -> None:
        start = messages[0]
        super().__init__(status_code=int(start["status"]))
        self.raw_headers = list(start.get("headers") or [])
        self._messages = messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for message in self._messages:
            if message["type"] == "http.response.start":
                # The framework may have added to the headers (cookies of a Response parameter): keep them.
                message = {**message, "headers": self.raw_headers}
            await send(message)


async def _connect_message() -> Message:
    return {"type": "websocket.connect"}


def _connection(scope: Scope, receive: Receive) -> HTTPConnection:
    """The Request user code is given (a websocket handshake has no Request: its HTTPConnection)."""
    return Request(scope, receive) if scope["type"] == "http" else HTTPConnection(scope)


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]], guard: _Guard | None = None) -> Send:
    """Wrap ``send`` so the response start (or websocket accept) carries ``headers``; the rest passes as is.

    With a guard, its ``send`` already adds what it holds: the headers join those of the endpoint's limits.

    The wrapper is a plain function returning ``send``'s own awaitable, not a coroutine: every
    message would otherwise pay for one more coroutine on its way out.
    """
    if not headers:
        return send
    if guard is not None:
        guard.add(headers)
        return send

    def send_with_headers(message: Message) -> Awaitable[None]:
        kind = message["type"]
        if kind == "http.response.start" or kind == "websocket.accept":
            existing = message.get("headers") or []
            extra = headers
            for name, _ in existing:
                if name.lower() in HEADER_NAMES:
                    # An app that set one of these headers itself keeps its own value.
                    present = {name.lower() for name, _ in existing}
                    extra = [header for header in headers if header[0] not in present]
                    break
            # A copy: the app may send the same message again.  ASGI messages are dicts, and copying one
            # costs less than unpacking it into a new one.
            message = message.copy()  # type: ignore[attr-defined]
            message["headers"] = [*existing, *extra]
        return send(message)

    return send_with_headers


# A flood repeats the same few bodies: each is built once.  Bounded: a rule with a pk names each key's items
# apart, so its bodies are as many as the keys refused.
@functools.lru_cache(maxsize=1024)
def _deny_body(violated: tuple[str, ...], wait: int, never: bool) -> bytes:
    """The default 429's body: the draft's quota-exceeded problem, naming the limits that refused."""
    detail = (
        "This request costs more than the limit allows; it can never be accepted."
        if never
        else f"Rate limit exceeded; retry in {wait} second{'s' if wait != 1 else ''}."
    )
    # Clients act on "violated-policies" (the names the RateLimit-Policy items carry) and "retry_after"
    # without parsing the detail.
    problem = {
        "type": QUOTA_EXCEEDED,
        "title": "Quota Exceeded",
        "status": 429,
        "detail": detail,
        "retry_after": wait,
        "violated-policies": [item_name(name) for name in violated],
    }
    return _problem_body(problem)


def _problem_body(problem: dict[str, Any]) -> bytes:
    return json.dumps(problem, separators=(",", ":")).encode()


async def _respond(
    scope: Scope, receive: Receive, send: Send, status: int, body: bytes, title: str, headers: list[tuple[bytes, bytes]]
) -> None:
    """Answer with a problem+json body: as HTTP, or on a websocket handshake as a denial response or close 1008."""
    all_headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": all_headers})
        await send({"type": "http.response.body", "body": body})
        return
    # A websocket handshake: take the connect message, then refuse.
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": all_headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": title})
