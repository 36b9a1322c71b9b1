"""FastAPI: rate limits as dependencies, decided by the app's RateLimitMiddleware.

``Depends(RateLimit("100/hour", key=current_user_id))`` limits a route on what FastAPI resolved for it,
the authenticated user for instance, which a middleware cannot see: it runs before authentication.
The decision is still the middleware's, through the guard it gives each request (see _context.py): the
same backend, circuit breaker, deny cache, metrics and headers.  A refusal is raised as RateLimitExceeded,
an HTTPException, so the app's exception handlers answer it.

FastAPI is an optional dependency (``pip install asgi-ratelimit-middleware[fastapi]``); only this module
imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from fastapi import Depends
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._context import current_guard
from .errors import ConfigurationError
from .extractors import ClientIP, FirstOf, Header, JWTClaim
from .headers import retry_after_seconds
from .policies import Concurrency, Decision, Policy
from .rules import CostFunc, Limits, Rule, guard_requests

__all__ = ["RateLimit", "RateLimitExceeded"]

# What FastAPI resolved for the RateLimit deciding now: (key, limits).  The RateLimit's Rule reads them from
# here, so one compiled Rule serves every request; a context variable keeps concurrent requests apart.
_resolved: ContextVar[tuple[str | None, Any]] = ContextVar("asgi_ratelimit_resolved", default=(None, None))

_EXTRACTORS = (ClientIP, Header, JWTClaim, FirstOf)
# Rules a RateLimit without a name keeps, one per route; past this many, something names routes per request.
_RULES_KEPT = 1024


def _resolved_key(request: HTTPConnection) -> str | None:
    return _resolved.get()[0]


def _resolved_limits(request: HTTPConnection) -> Any:
    return _resolved.get()[1]


class RateLimitExceeded(HTTPException):
    """A RateLimit dependency refused the request: status 429, with Retry-After and the RateLimit headers."""

    def __init__(self, decisions: Sequence[Decision], headers: dict[str, str]) -> None:
        denied = [decision for decision in decisions if not decision.allowed]
        #: Seconds until the request may be retried (the Retry-After value).
        self.retry_after = max((retry_after_seconds(d) for d in denied), default=0)
        never = any(decision.never for decision in denied)
        detail = (
            "This request costs more than the limit allows; it can never be accepted."
            if never
            else f"Rate limit exceeded; retry in {self.retry_after} second{'s' if self.retry_after != 1 else ''}."
        )
        super().__init__(status_code=429, detail=detail, headers=headers)
        #: The decisions of the refusing dependency's limits, allowed ones included.
        self.decisions: tuple[Decision, ...] = tuple(decisions)


class RateLimit:
    """A FastAPI dependency that limits the route it guards, decided by the app's RateLimitMiddleware.

    Args:
        limits: a limit string (``"100/hour"``, ``"10/second;1000/day"``), a policy, a list of them, or a
            FastAPI dependency returning them (tiers: ``def tier(user=Depends(current_user)) -> str``).
        key: an extractor of this package (``ClientIP()``, the default; ``Header``, ``JWTClaim``, ``FirstOf``),
            or a FastAPI dependency returning the key as a string, or None for "not limited".
        algorithm: the algorithm of limit strings (``"sliding_window"`` by default).
        cost: units each request takes: an int, or a callable of the request.
        name: the rule's name in headers and metrics; by default the route's path, so each route counts apart.
        fail_open: overrides the middleware's ``fail_open`` for this limit when not None.
    """

    def __init__(
        self,
        limits: Limits | Callable[..., Any],
        *,
        key: Callable[..., Any] | None = None,
        algorithm: str = "sliding_window",
        cost: int | CostFunc = 1,
        name: str | None = None,
        fail_open: bool | None = None,
    ) -> None:
        self.limits = limits
        self.key = ClientIP() if key is None else key
        self.algorithm = algorithm
        self.cost = cost
        self.name = name
        self.fail_open = fail_open
        self.label = f"RateLimit({limits!r})" if name is None else f"RateLimit {name!r}"
        if not callable(self.key):
            raise ConfigurationError(f"{self.label}: key must be an extractor or a FastAPI dependency, got {key!r}.")
        #: The FastAPI dependency that returns the limits per request (tiers), or None for fixed limits.
        self.limits_dependency: Callable[..., Any] | None = None
        if callable(limits) and not isinstance(limits, (str, Policy, Concurrency)):
            self.limits_dependency = limits
        self.dynamic = self.limits_dependency is not None
        # FastAPI resolves what is not this package's extractor: the key and limits are its dependencies.
        self.key_is_dependency = not isinstance(self.key, _EXTRACTORS)
        if self.key_is_dependency:
            _check_dependency(self.label, "key", self.key)
        if self.limits_dependency is not None:
            _check_dependency(self.label, "limits", self.limits_dependency)
        # Validated now, so a mistake fails when the module defining the route is imported.
        self._rules: dict[str, Rule] = {}
        self._rule(name or "route")
        self._rules.clear()
        self.__signature__ = self._signature()
        guard_requests()  # the middleware now gives each request the guard this dependency asks

    def __repr__(self) -> str:
        return self.label

    def _signature(self) -> inspect.Signature:
        """What FastAPI resolves before calling: the connection, and the key and limits when they are dependencies."""
        parameters = [
            inspect.Parameter("connection", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection)
        ]
        if self.key_is_dependency:
            parameters.append(
                inspect.Parameter("key", inspect.Parameter.KEYWORD_ONLY, default=Depends(self.key), annotation=Any)
            )
        if self.limits_dependency is not None:
            depends = Depends(self.limits_dependency)
            parameters.append(
                inspect.Parameter("limits", inspect.Parameter.KEYWORD_ONLY, default=depends, annotation=Any)
            )
        return inspect.Signature(parameters, return_annotation=None)

    def _rule(self, name: str) -> Rule:
        """The compiled Rule under ``name`` (this RateLimit's name, or the route's path)."""
        rule = self._rules.get(name)
        if rule is None:
            limits: Any = _resolved_limits if self.dynamic else self.limits
            key: Any = _resolved_key if self.key_is_dependency else self.key
            rule = Rule(
                "/",
                limits,
                key=key,
                algorithm=self.algorithm,
                cost=self.cost,
                name=name,
                fail_open=self.fail_open,
            )
            if len(self._rules) >= _RULES_KEPT:
                self._rules.clear()
            self._rules[name] = rule
        return rule

    def rule_name(self, scope: Scope) -> str:
        """The name this dependency's counts go under on the request of ``scope``."""
        if self.name is not None:
            return self.name
        route = scope.get("route")
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            raise ConfigurationError(f"{self.label}: the request has no route to name this limit after; give name=.")
        return path

    async def __call__(self, connection: HTTPConnection, key: object = None, limits: object = None) -> None:
        """Decide this request's limits: return when allowed, raise RateLimitExceeded when not."""
        guard = current_guard.get()
        if guard is None:
            raise ConfigurationError(
                f"{self.label} on {connection.url.path}: no RateLimitMiddleware handles this request, and the "
                "dependency decides through it (its backend, breaker and metrics).  Add it to the app: "
                "app.add_middleware(RateLimitMiddleware, backend=...)."
            )
        if self.key_is_dependency and key is not None and not isinstance(key, str):
            raise ConfigurationError(
                f"{self.label}: the key dependency {_describe(self.key)} returned {key!r}; it must return a "
                "string, or None for a request that is not limited."
            )
        name = self.rule_name(connection.scope)
        rule = self._rules.get(name) or self._named_rule(name, guard)
        token = _resolved.set((key if isinstance(key, str) else None, limits))
        try:
            refusal = await guard.decide((rule,))
        finally:
            _resolved.reset(token)
        if refusal is None:
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in refusal.headers}
        if refusal.status == 429:
            raise RateLimitExceeded(refusal.decisions, headers)
        raise HTTPException(
            status_code=refusal.status,
            detail="The rate limiter cannot reach its backend, and this route is configured to fail closed.",
            headers=headers,
        )

    def _named_rule(self, name: str, guard: object) -> Rule:
        """A new route's Rule; its name must not be a middleware rule's, whose counts and headers it would share."""
        rules: Sequence[Rule] = getattr(getattr(guard, "middleware", None), "rules", ())
        if any(rule.name == name for rule in rules):
            raise ConfigurationError(
                f"{self.label}: a middleware Rule is named {name!r} too, so both would count under one name; "
                "give one of them another name=."
            )
        return self._rule(name)


def _describe(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _check_dependency(label: str, role: str, func: Callable[..., Any]) -> None:
    """Refuse a parameter FastAPI would read from the query string by mistake: ``request`` unannotated."""
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return  # a builtin: FastAPI will say what it cannot read
    for parameter in parameters.values():
        if parameter.name in ("request", "connection") and parameter.annotation is inspect.Parameter.empty:
            raise ConfigurationError(
                f"{label}: the {role} dependency {_describe(func)} has an unannotated {parameter.name!r} "
                "parameter, which FastAPI would read from the query string; annotate it "
                f"`{parameter.name}: Request`."
            )
