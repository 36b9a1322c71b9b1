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
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import fastapi.routing
from fastapi import Depends, FastAPI
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException, WebSocketException
from starlette.requests import HTTPConnection
from starlette.types import Scope

from ._context import current_guard
from ._headers import QUOTA_EXCEEDED, retry_after_seconds
from ._startup import _may_meet
from .errors import ConfigurationError
from .extractors import ClientIP, FirstOf, Header, JWTClaim
from .middleware import RateLimitMiddleware
from .policies import DEFAULT_ALGORITHM, Concurrency, Decision, Policy
from .rules import ENDPOINT_RULES, CompiledLimits, CostFunc, Limits, Rule, guard_requests

__all__ = ["RateLimit", "RateLimitExceeded", "document_rate_limits"]

# What FastAPI resolved for the RateLimit deciding now: (key, limits).  The RateLimit's Rule reads them from
# here, so one compiled Rule serves every request; a context variable keeps concurrent requests apart.
_resolved: ContextVar[tuple[str | None, Any]] = ContextVar("asgi_ratelimit_resolved", default=(None, None))

_EXTRACTORS = (ClientIP, Header, JWTClaim, FirstOf)
# Per app (its middleware): route path -> the RateLimit without a name that counts under it.
_unnamed_owners: weakref.WeakKeyDictionary[object, dict[str, RateLimit]] = weakref.WeakKeyDictionary()
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
        algorithm: the algorithm of limit strings (``"gcra"`` by default).
        cost: units each request takes: an int, or a callable of the request.
        name: the rule's name in headers and metrics; by default the route's path, so each route counts apart.
        fail_open: overrides the middleware's ``fail_open`` for this limit when not None.
        quota_unit: what the cost counts, as RateLimit-Policy's ``qu`` says (``"requests"``, the default).
        partition_key: add ``pk``, a keyed hash of the client's key, to the header items (as a Rule's).
    """

    def __init__(
        self,
        limits: Limits | Callable[..., Any],
        *,
        key: Callable[..., Any] | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        cost: int | CostFunc = 1,
        name: str | None = None,
        fail_open: bool | None = None,
        quota_unit: str = "requests",
        partition_key: bool | bytes | str = False,
    ) -> None:
        self.limits = limits
        self.key = ClientIP() if key is None else key
        self.algorithm = algorithm
        self.cost = cost
        self.name = name
        self.fail_open = fail_open
        self.quota_unit = quota_unit
        self.partition_key = partition_key
        shown = _describe(limits) if callable(limits) and not isinstance(limits, (str, Policy, Concurrency)) else None
        self.label = f"RateLimit {name!r}" if name is not None else f"RateLimit({shown or repr(limits)})"
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
        else:
            _refuse_concurrency(self.label, limits)
        # Validated now, so a mistake fails when the module defining the route is imported.
        self._rules: dict[str, Rule] = {}
        probe = name or "route"
        try:
            #: The compiled limits (None when a dependency chooses them per request), for the OpenAPI description.
            self.compiled = self._rule(probe).static
        except ConfigurationError as exc:  # said of this RateLimit, not of the Rule it builds
            raise ConfigurationError(f"{self.label}: {str(exc).removeprefix(f'Rule {probe!r}: ')}") from None
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
                quota_unit=self.quota_unit,
                partition_key=self.partition_key,
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
                # Its type only: the value is a client's key, which never reaches the logs.
                f"{self.label}: the key dependency {_describe(self.key)} returned {type(key).__name__!r}; it must "
                "return a string, or None for a request that is not limited."
            )
        if self.limits_dependency is not None:
            _refuse_concurrency(f"{self.label}: the limits dependency {_describe(self.limits_dependency)}", limits)
        name = self.rule_name(connection.scope)
        rule = self._rules.get(name) or self._named_rule(name, guard)
        token = _resolved.set((key if isinstance(key, str) else None, limits))
        try:
            refusal = await guard.decide((rule,))
        finally:
            _resolved.reset(token)
        if refusal is None:
            return
        if connection.scope["type"] == "websocket":
            # A handshake refused before accept has no response to carry the headers: close it, as the middleware
            # does where the server cannot send a denial response (1008, or 1013 "try again later" for a 503).
            too_many = refusal.status == 429
            code, reason = (1008, "Too Many Requests") if too_many else (1013, "Service Unavailable")
            raise WebSocketException(code=code, reason=reason)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in refusal.headers}
        if refusal.status == 429:
            raise RateLimitExceeded(refusal.decisions, headers)
        raise HTTPException(
            status_code=refusal.status,
            detail="The rate limiter cannot reach its backend, and this route is configured to fail closed.",
            headers=headers,
        )

    def _named_rule(self, name: str, guard: object) -> Rule:
        """A new route's Rule.  Its name must be its own: a middleware Rule's, or another unnamed RateLimit's on the
        same route, would mix their counts and headers under one name."""
        middleware = getattr(guard, "middleware", None)
        rules: Sequence[Rule] = getattr(middleware, "rules", ())
        if any(rule.name == name for rule in rules):
            raise ConfigurationError(
                f"{self.label}: a middleware Rule is named {name!r} too, so both would count under one name; "
                "give one of them another name=."
            )
        if self.name is None and middleware is not None:
            owners = _unnamed_owners.setdefault(middleware, {})
            owner = owners.setdefault(name, self)
            if owner is not self:
                raise ConfigurationError(
                    f"{self.label} and {owner.label} both limit the route {name!r} without a name=, so both would "
                    f"be named {name!r}; give one of them a name=."
                )
        return self._rule(name)


def _refuse_concurrency(label: str, limits: object) -> None:
    """A dependency returns before the endpoint runs, so a concurrency slot would be given back before it is used."""
    specs = limits if isinstance(limits, (list, tuple)) else [limits]
    if any(isinstance(spec, Concurrency) for spec in specs):
        raise ConfigurationError(
            f"{label}: a Concurrency limit cannot be a dependency's (its slot would be given back before the "
            f"endpoint runs), got {limits!r}; put it in a middleware Rule or on the endpoint with @rate_limit."
        )


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


# -- OpenAPI -----------------------------------------------------------------------------------

_PROBLEM_SCHEMA = {
    "title": "RateLimitProblem",
    "description": "The middleware's 429, the quota-exceeded problem (RFC 9457): a Rule or @rate_limit refused it.",
    "type": "object",
    "required": ["type", "title", "status", "detail", "retry_after", "violated-policies"],
    "properties": {
        "type": {"type": "string", "example": QUOTA_EXCEEDED},
        "title": {"type": "string", "example": "Quota Exceeded"},
        "status": {"type": "integer", "example": 429},
        "detail": {"type": "string", "example": "Rate limit exceeded; retry in 7 seconds."},
        "retry_after": {"type": "integer", "minimum": 0, "description": "Seconds to wait, as in Retry-After."},
        "violated-policies": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The names of the limits that refused it, as in RateLimit-Policy.",
        },
    },
}
_DETAIL_SCHEMA = {
    "title": "RateLimitExceeded",
    "description": "FastAPI's answer to RateLimitExceeded: a RateLimit dependency refused the request.",
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string", "example": "Rate limit exceeded; retry in 7 seconds."}},
}
_HEADERS = {
    "Retry-After": {
        "description": "Seconds to wait before the request can succeed.",
        "schema": {"type": "integer", "minimum": 0},
    },
    "RateLimit": {
        "description": 'The state of each limit (IETF RateLimit fields): `"name";r=<remaining>;t=<seconds to reset>`.',
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'Each limit (IETF RateLimit fields): `"name";q=<quota>;w=<window in seconds>`.',
        "schema": {"type": "string"},
    },
}
_LEGACY_HEADERS = {
    "X-RateLimit-Limit": {"description": "The tightest limit's quota.", "schema": {"type": "integer"}},
    "X-RateLimit-Remaining": {"description": "What the tightest limit has left.", "schema": {"type": "integer"}},
    "X-RateLimit-Reset": {"description": "Seconds until the tightest limit resets.", "schema": {"type": "integer"}},
}


def document_rate_limits(app: FastAPI, *, rules: Sequence[Rule] | None = None) -> None:
    """List a 429 response in the OpenAPI document for every operation that a RateLimit, a Rule or @rate_limit limits.

    Args:
        app: the FastAPI app; its ``openapi()`` is wrapped, as FastAPI's docs do to extend the schema.
        rules: the middleware's Rules; by default read from the RateLimitMiddleware added with
            ``app.add_middleware``.
    """
    original = app.openapi
    documented: list[dict[str, Any]] = []  # the schema already documented (FastAPI builds it once and caches it)

    def openapi() -> dict[str, Any]:
        schema = original()
        if not documented or documented[0] is not schema:
            _document(app, schema, _middleware_rules(app) if rules is None else rules, _header_mode(app))
            documented[:] = [schema]
        return schema

    # FastAPI's documented way to extend the schema is to replace this method on the app.
    app.openapi = openapi  # type: ignore[method-assign]


def _middleware_options(app: FastAPI) -> dict[str, Any]:
    for cls, _, options in app.user_middleware:
        if isinstance(cls, type) and issubclass(cls, RateLimitMiddleware):
            return dict(options)
    return {}


def _middleware_rules(app: FastAPI) -> Sequence[Rule]:
    rules: Sequence[Rule] = _middleware_options(app).get("rules", ())
    return rules


def _header_mode(app: FastAPI) -> str:
    mode: str = _middleware_options(app).get("headers", "ietf")
    return mode


def _document(app: FastAPI, schema: dict[str, Any], rules: Sequence[Rule], mode: str) -> None:
    """Add the 429 response and the limits' description to each limited operation of ``schema``, in place."""
    paths = schema.get("paths", {})
    used = set()
    for route in _api_routes(app):
        if not route.include_in_schema:
            continue
        dependencies = list(_dependencies(route))
        marked: tuple[Rule, ...] = getattr(route.endpoint, ENDPOINT_RULES, ())
        for method in sorted(route.methods or ()):
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            matched = [
                rule
                for rule in rules
                if (rule.methods is None or method in rule.methods) and _may_meet(rule, route.path_format, False)
            ]
            lines = [f"- `{rule.name}`: {_limits_text(rule.static, rule.dynamic)}" for rule in (*matched, *marked)]
            for dependency in dependencies:
                name = dependency.name or route.path
                lines.append(f"- `{name}`: {_limits_text(dependency.compiled, dependency.limits_dependency)}")
            if not lines:
                continue
            content: dict[str, Any] = {}
            if matched or marked:
                content["application/problem+json"] = {"schema": {"$ref": "#/components/schemas/RateLimitProblem"}}
                used.add("RateLimitProblem")
            if dependencies:
                content["application/json"] = {"schema": {"$ref": "#/components/schemas/RateLimitExceeded"}}
                used.add("RateLimitExceeded")
            headers = {"Retry-After": _HEADERS["Retry-After"]}
            if mode in ("ietf", "both"):
                headers.update(_HEADERS)
            if mode in ("legacy", "both"):
                headers.update(_LEGACY_HEADERS)
            operation.setdefault("responses", {})["429"] = {
                "description": "Too Many Requests: a rate limit refused the request; retry after Retry-After seconds.",
                "headers": headers,
                "content": content,
            }
            summary = "**Rate limits** (a 429 when one is exceeded):\n\n" + "\n".join(lines)
            description = operation.get("description")
            operation["description"] = f"{description}\n\n{summary}" if description else summary
    if used:
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if "RateLimitProblem" in used:
            components["RateLimitProblem"] = _PROBLEM_SCHEMA
        if "RateLimitExceeded" in used:
            components["RateLimitExceeded"] = _DETAIL_SCHEMA


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """The app's API routes as its OpenAPI document lists them, with their routers' prefixes and dependencies."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:  # a FastAPI whose include_router copies the routes into app.routes
        yield from (route for route in app.routes if isinstance(route, APIRoute))
        return
    for context in contexts(app.routes):  # a FastAPI that keeps included routers whole: each route in context
        if isinstance(context.original_route, APIRoute):
            yield context


def _dependencies(route: Any) -> Iterator[RateLimit]:
    """The RateLimit dependencies of ``route``: its own, its routers' and the app's, at any depth."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop(0)
        if isinstance(dependant.call, RateLimit):
            yield dependant.call
        pending.extend(dependant.dependencies)


def _limits_text(compiled: CompiledLimits | None, chooser: Callable[..., Any] | None) -> str:
    """The limits in words: "100 per 1 hour, 10 per 1 second", or who chooses them per request."""
    if compiled is None:
        return "chosen per request" if chooser is None else f"chosen per request by `{_describe(chooser)}`"
    texts = [f"{policy.quota} per {_window_text(policy.window_seconds)}" for policy in compiled.policies]
    if compiled.concurrency is not None:
        texts.append(f"{compiled.concurrency.limit} at a time")
    return ", ".join(texts)


def _window_text(seconds: int) -> str:
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % length == 0:
            count = seconds // length
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"
