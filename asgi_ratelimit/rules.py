"""Rules: which limits apply to which requests, and under which key.

A Rule is compiled once, when the middleware is built: its path becomes a regex, its limit
strings become policies, and every mistake raises ConfigurationError naming the rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import re
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union, cast

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import HTTPConnection
from starlette.routing import compile_path
from starlette.types import Scope

from ._charging import settlement_for
from ._context import current_guard
from ._headers import QUOTA_UNITS, concurrency_item, policy_item, sf_string, state_format_of
from ._partition import partition_key, partition_secret
from .charging import ChargeSource
from .errors import ConfigurationError
from .extractors import ClientIP, scope_reader
from .policies import ALGORITHMS, DEFAULT_ALGORITHM, Concurrency, Policy, parse_limits

__all__ = ["Rule", "rate_limit"]

LimitSpec = Union[str, Policy]  # noqa: UP007 - a runtime alias, and Python 3.10 is supported
Limits = Union[LimitSpec, Sequence[LimitSpec]]  # noqa: UP007
DynamicLimits = Callable[[HTTPConnection], Limits]
KeyFunc = Callable[[HTTPConnection], Union[str, Awaitable[Union[str, None]], None]]  # noqa: UP007
CostFunc = Callable[[HTTPConnection], int]

# Separates the rule's name from the extracted key in the identity the backend hashes.
IDENTITY_SEPARATOR = "\x1f"
# Identities a rule remembers (see Rule.identity), and keys' header items (see Rule.partitioned): beyond
# this many keys, it starts over.
_IDENTITIES_KEPT = 10_000
# The quota units a rate rule may count in; "concurrent-requests" belongs to Concurrency limits.
_RATE_UNITS = tuple(unit for unit in QUOTA_UNITS if unit != "concurrent-requests")
_HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}


@dataclass(frozen=True)
class CompiledLimits:
    """A rule's policies with their preformatted header parts."""

    policies: tuple[Policy, ...]
    policy_items: tuple[str, ...]  # RateLimit-Policy items
    item_names: tuple[str, ...]  # the same names as RFC 9651 Strings, each with its pk if any, for RateLimit
    concurrency: Concurrency | None = None  # at most this many requests in flight per key
    concurrency_item: str = ""  # its RateLimit-Policy item
    concurrency_name: str = ""  # its name as an RFC 9651 String
    policy_header: bytes = b""  # the RateLimit-Policy value of the policies alone, joined and encoded
    state_format: bytes | None = None  # one policy: its RateLimit value as a %-format of (remaining, t)


class PathPattern:
    """A Starlette path template (``"/users/{id}"``, ``"/files/{rest:path}"``) or a compiled regex, and the paths it
    matches: the same paths Starlette's router sends to a route of that template.  ``owner`` names it in errors."""

    def __init__(self, path: str | re.Pattern[str], owner: str) -> None:
        self.exact: str | None = None  # a template without parameters: one path, compared as a string
        if isinstance(path, re.Pattern):
            self.regex = path
            self.text = path.pattern
            return
        if not isinstance(path, str) or not path.startswith("/"):
            raise ConfigurationError(
                f"{owner} {path!r}: the path must be a template starting with '/' or a compiled regex."
            )
        if "*" in path:
            raise ConfigurationError(
                f"{owner} {path!r}: a path is a Starlette template, not a glob ('*' is taken literally); "
                f"write {path.split('*', 1)[0].rstrip('/') + '/{path:path}'!r} for every path below it."
            )
        try:
            self.regex = compile_path(path)[0]
        except (ValueError, AssertionError) as exc:
            raise ConfigurationError(f"{owner} {path!r}: invalid path template: {exc}") from exc
        self.text = path
        self.exact = None if "{" in path else path

    def matches(self, path: str) -> bool:
        """Whether a request on ``path`` (without the app's root_path) is matched."""
        if self.exact is not None:
            # As the regex's "$" does (and so Starlette's router): a final newline still matches.
            return path == self.exact or (path[-1:] == "\n" and path[:-1] == self.exact)
        return self.regex.match(path) is not None


#: What a rule applies to one request: the identity it counts under, its limits, and the units taken.
Resolved = tuple[str, CompiledLimits, int]


def _default_key() -> KeyFunc:

    extractor: KeyFunc = ClientIP()
    return extractor


class Rule:
    """Limits for the requests whose path (and method) match.

    Args:
        path: a Starlette path template (``"/users/{id}"``, ``"/files/{rest:path}"``) or a compiled regex.
        limits: a limit string (``"100/minute"``), a policy, a list of them, or a callable of the
            request returning them (e.g. tiers by plan).
        key: the key extractor; a sync or async callable of the request returning a string, or
            None when the rule does not apply to that request.  Default: ``ClientIP()``.
        methods: the HTTP methods the rule applies to; ``None`` for all.
        algorithm: the algorithm of limit strings (``"gcra"`` by default).
        cost: units each request takes: an int or a callable of the request.
        name: the name used in headers and metrics; derived from the path when absent.
        fail_open: overrides the middleware's ``fail_open`` for this rule when not None.
        quota_unit: what the cost counts, as RateLimit-Policy's ``qu`` says: ``"requests"`` (the
            default, not sent) or ``"content-bytes"`` (a cost callable that returns the request's size).
        counts: a predicate of the response status (or of status and headers) saying whether a response
            spends quota; the request is then checked without spending before the app runs (see
            docs/charging.md).  Default None: every request spends up front.
        charge: where the cost comes from once the response shows it: ``ResponseHeader(name)``,
            ``BodyBytes()`` or ``FromState(name)``; with ``cost=`` that estimate is spent up front and
            the difference settled after.  Default None.
        partition_key: add ``pk``, an opaque keyed hash of the client's key, to the rule's header
            items: ``True`` with a random secret of this process, or a secret (at least 16 bytes)
            shared by every process that counts together.  Default False.
    """

    def __init__(
        self,
        path: str | re.Pattern[str],
        limits: Limits | DynamicLimits,
        *,
        key: KeyFunc | None = None,
        methods: Iterable[str] | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        cost: int | CostFunc | None = None,
        name: str | None = None,
        fail_open: bool | None = None,
        quota_unit: str = "requests",
        partition_key: bool | bytes | str = False,
        counts: Callable[[int], bool] | Callable[[int, Headers], bool] | None = None,
        charge: ChargeSource | None = None,
    ) -> None:
        self.path = path
        self.pattern = PathPattern(path, "Rule")
        self.regex = self.pattern.regex
        self.exact_path = self.pattern.exact
        derived = self.pattern.text
        self.name = derived if name is None else name
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"Rule {derived!r}: name must be a non-empty string, got {name!r}.")
        if not all(" " <= ch <= "~" for ch in self.name):
            # Names travel in the RateLimit headers, which carry printable ASCII only: two names that differ
            # only outside it would become the same header item.
            raise ConfigurationError(
                f"Rule {derived!r}: name {self.name!r} must be printable ASCII (it is sent in the RateLimit "
                "headers); give name= in ASCII."
            )
        label = f"Rule {self.name!r}"
        if algorithm not in ALGORITHMS:
            raise ConfigurationError(
                f"{label}: unknown algorithm {algorithm!r}; choose one of {', '.join(sorted(ALGORITHMS))}."
            )
        self.algorithm = algorithm
        self.key: KeyFunc = _default_key() if key is None else key
        if not callable(self.key):
            raise ConfigurationError(f"{label}: key must be a callable of the request, got {key!r}.")
        self.methods: frozenset[str] | None = None
        if methods is not None:
            if isinstance(methods, str):
                raise ConfigurationError(f"{label}: methods must be a list such as ['POST'], got {methods!r}.")
            upper = frozenset(m.upper() for m in methods)
            unknown = upper - _HTTP_METHODS
            if unknown:
                raise ConfigurationError(f"{label}: unknown HTTP method(s) {sorted(unknown)!r}.")
            # A GET route answers HEAD too; limit both alike.
            self.methods = upper | {"HEAD"} if "GET" in upper else upper
        cost_given = cost is not None
        if cost is None:
            cost = 1
        if callable(cost) and not isinstance(cost, (int, bool)):
            self.cost: int | CostFunc = cost
        elif isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ConfigurationError(f"{label}: cost must be a whole number of at least 1 or a callable, got {cost!r}.")
        else:
            self.cost = cost
        if fail_open is not None and not isinstance(fail_open, bool):
            raise ConfigurationError(f"{label}: fail_open must be True, False or None, got {fail_open!r}.")
        self.fail_open = fail_open
        if quota_unit not in _RATE_UNITS:
            raise ConfigurationError(
                f"{label}: quota_unit must be one of {', '.join(map(repr, _RATE_UNITS))}, got {quota_unit!r}"
                + (" (a Concurrency limit says it by itself)." if quota_unit == "concurrent-requests" else ".")
            )
        self.quota_unit = quota_unit
        #: The HMAC secret of the rule's pk values; None when its headers carry no pk.
        self.partition_secret = partition_secret(label, partition_key)
        self.dynamic: DynamicLimits | None = None
        self.static: CompiledLimits | None = None
        self._tiers: dict[Any, CompiledLimits] = {}  # what ``dynamic`` returned -> compiled (tiers are few)
        if callable(limits) and not isinstance(limits, (str, Policy, Concurrency)):
            self.dynamic = limits
        else:
            self.static = self.compile_limits(limits)
        #: What the backend counts a key under for this rule (name, separator, key): two rules never share a
        #: key's counts.  Remembered for the keys seen lately, so a client's next request finds the same string,
        #: whose hash Python has already computed, instead of joining and hashing a new one.
        self.identity: Callable[[str], str] = functools.lru_cache(maxsize=_IDENTITIES_KEPT)(
            functools.partial(str.__add__, self.name + IDENTITY_SEPARATOR)
        )
        # limits -> the same with a key's pk in every header item, for the keys seen lately (see partitioned()).
        self._partitioned_by_key = functools.lru_cache(maxsize=_IDENTITIES_KEPT)(self._with_pk)
        # A built-in extractor reads the scope alone: with static limits and a whole-number cost, the rule
        # calls no user code and needs no Request (see resolve_scope).
        scope_key = scope_reader(self.key)
        self._scope_key = scope_key if self.static is not None and isinstance(self.cost, int) else None
        self._fixed_cost = self.cost if isinstance(self.cost, int) else 0
        #: Whether resolve_scope() decides what the rule applies; else resolve() does, given the Request.
        self.reads_scope = self._scope_key is not None
        #: How the rule is charged after the response (counts= or charge=); None: it spends up front.
        self.settlement = settlement_for(
            label, counts, charge, cost_given, self.static is not None and self.static.concurrency is not None
        )

    def __repr__(self) -> str:
        return f"Rule({self.path!r}, name={self.name!r})"

    def resolve_scope(self, scope: Scope) -> Resolved | None:
        """What the rule applies to the request of ``scope``: (identity, limits, cost), or None when its key is None.

        For a rule that ``reads_scope``: its key comes from a built-in extractor, its limits and cost are fixed.
        """
        assert self._scope_key is not None and self.static is not None
        value = self._scope_key(scope)
        if value is None:
            return None
        identity = self.identity(value)
        limits = self.static if self.partition_secret is None else self.partitioned(self.static, identity)
        return identity, limits, self._fixed_cost

    async def resolve(self, request: HTTPConnection) -> Resolved | None:
        """What the rule applies to ``request``: (identity, limits, cost), or None when its key is None.

        Calls the rule's user code (a key, limits or cost callable); rules that ``reads_scope`` need none.
        """
        found = self.key(request)
        if found.__class__ is not str and inspect.isawaitable(found):  # the common case costs one check
            found = await found
        if found is None:
            return None
        identity = self.identity(found)
        limits = self.limits_for(request)
        if self.partition_secret is not None:  # this key's header items carry its pk
            limits = self.partitioned(limits, identity)
        return identity, limits, self.cost_for(request)

    def partitioned(self, limits: CompiledLimits, identity: str) -> CompiledLimits:
        """``limits`` with the pk of ``identity`` in every header item (remembered per key, as identity() is)."""
        return limits if self.partition_secret is None else self._partitioned_by_key(limits, identity)

    def _with_pk(self, limits: CompiledLimits, identity: str) -> CompiledLimits:
        assert self.partition_secret is not None
        pk = ";pk=" + partition_key(self.partition_secret, identity)
        items = tuple(item + pk for item in limits.policy_items)
        names = tuple(name + pk for name in limits.item_names)
        return dataclasses.replace(
            limits,
            policy_items=items,
            item_names=names,
            concurrency_item=limits.concurrency_item and limits.concurrency_item + pk,
            concurrency_name=limits.concurrency_name + pk,
            policy_header=", ".join(items).encode("ascii"),
            state_format=None if limits.state_format is None else state_format_of(names[0]),
        )

    def matches(self, method: str, path: str) -> bool:
        """Whether this rule applies to a request of ``method`` on ``path``."""
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern.matches(path)

    def matches_any_method(self, path: str) -> bool:
        """Whether this rule's path matches ``path``, whatever the method."""
        return self.regex.match(path) is not None

    def limits_for(self, request: HTTPConnection) -> CompiledLimits:
        """The compiled limits for this request (static, or from the rule's callable, cached)."""
        if self.static is not None:
            return self.static
        assert self.dynamic is not None
        spec = self.dynamic(request)
        tier = tuple(spec) if isinstance(spec, list) else spec
        compiled = self._tiers.get(tier)
        if compiled is None:
            compiled = self.compile_limits(spec)
            if len(self._tiers) < 1024:  # a guard: a callable that returns a new value per request
                self._tiers[tier] = compiled
        return compiled

    def known_limits(self) -> list[CompiledLimits]:
        """The rule's limits: the static ones, or every tier its callable has returned in this process."""
        return [self.static] if self.static is not None else list(self._tiers.values())

    def compile_limits(self, limits: Limits | Concurrency | Sequence[LimitSpec | Concurrency]) -> CompiledLimits:
        """Parse and validate limits, and preformat their header items."""
        label = f"Rule {self.name!r}"
        specs: Sequence[Any] = [limits] if isinstance(limits, (str, Policy, Concurrency)) else limits
        if not isinstance(specs, (list, tuple)) or not specs:
            raise ConfigurationError(
                f"{label}: limits must be a limit string, a policy or a non-empty list, got {limits!r}."
            )
        policies: list[Policy] = []
        concurrency: Concurrency | None = None
        for spec in specs:
            if isinstance(spec, Policy):
                policies.append(spec)
            elif isinstance(spec, Concurrency):
                if concurrency is not None:
                    raise ConfigurationError(f"{label}: only one Concurrency limit per rule, got {limits!r}.")
                concurrency = spec
            elif isinstance(spec, str):
                try:
                    policies.extend(parse_limits(spec, self.algorithm))
                except ConfigurationError as exc:
                    raise ConfigurationError(f"{label}: {exc}") from None
            else:
                raise ConfigurationError(f"{label}: {spec!r} is neither a limit string nor a policy.")
        if len(set(policies)) != len(policies):
            raise ConfigurationError(f"{label}: the same limit appears twice in {limits!r}.")
        names = _item_names(self.name, policies)
        concurrency_name = f"{self.name}:concurrency" if policies else self.name
        unit = self.quota_unit
        items = tuple(policy_item(n, p.quota, p.window_seconds, unit) for n, p in zip(names, policies, strict=True))
        return CompiledLimits(
            policies=tuple(policies),
            policy_items=items,
            policy_header=", ".join(items).encode("ascii"),
            state_format=state_format_of(sf_string(names[0])) if len(policies) == 1 else None,
            item_names=tuple(sf_string(n) for n in names),
            concurrency=concurrency,
            concurrency_item="" if concurrency is None else concurrency_item(concurrency_name, concurrency.limit),
            concurrency_name=sf_string(concurrency_name),
        )

    def cost_for(self, request: HTTPConnection) -> int:
        """The units this request takes."""
        if isinstance(self.cost, int):
            return self.cost
        value = self.cost(request)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigurationError(
                f"Rule {self.name!r}: the cost callable returned {value!r}, not a whole number >= 1."
            )
        return value


def _item_names(name: str, policies: Sequence[Policy]) -> list[str]:
    """One header name per policy: the rule's name, suffixed with the window when there are several."""
    if len(policies) == 1:
        return [name]
    names = []
    for index, policy in enumerate(policies):
        candidate = f"{name}:{policy.window_seconds}s"
        names.append(candidate if candidate not in names else f"{candidate}:{index}")
    return names


def _is_async(func: Callable[..., Any]) -> bool:
    call = getattr(func, "__call__", None)  # noqa: B004 - instances with an async __call__
    return inspect.iscoroutinefunction(func) or (call is not None and inspect.iscoroutinefunction(call))


#: On an endpoint wrapped by @rate_limit: its Rules, in the order they were applied.
ENDPOINT_RULES = "__asgi_ratelimit_rules__"
# On the function a wrapper wraps: that wrapper.  A route that holds the function itself (the decorator was
# applied above the route decorator) is not limited, and the middleware says so when the route is called.
_BYPASSED = "__asgi_ratelimit_bypassed_by__"
# On a wrapper: its marks, and itself (a copy of these by another decorator's functools.wraps is not a wrapper).
_MARKS = "__asgi_ratelimit_marks__"
_WRAPPER = "__asgi_ratelimit_wrapper__"

_logger = logging.getLogger("asgi_ratelimit")
_unguarded_logged: set[str] = set()  # endpoints already reported as reached without the middleware

EndpointT = TypeVar("EndpointT", bound=Callable[..., Any])
_marked = 0  # endpoints wrapped by @rate_limit in this process


_endpoint_rules: dict[str, list[Rule]] = {}  # name -> the @rate_limit rules of that name, for reset


def endpoint_rules_named(name: str) -> list[Rule]:
    """The ``@rate_limit`` rules named ``name`` in this process (several endpoints may share a name, and its state)."""
    return _endpoint_rules.get(name, [])


def endpoints_marked() -> bool:
    """Whether any endpoint has been marked with @rate_limit (or a RateLimit dependency made): until then, requests
    need no guard."""
    return _marked > 0


def guard_requests() -> None:
    """From now on, give every request a guard: something in the app (a RateLimit dependency) will ask it."""
    global _marked
    _marked += 1


@dataclass(frozen=True)
class _Mark:
    """One @rate_limit's arguments: its limits, its name, and the rest of the Rule's keyword arguments."""

    limits: Limits | DynamicLimits
    name: str | None
    options: dict[str, Any]


def rate_limit(
    limits: Limits | DynamicLimits,
    *,
    key: KeyFunc | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
    cost: int | CostFunc = 1,
    name: str | None = None,
    fail_open: bool | None = None,
    quota_unit: str = "requests",
    partition_key: bool | bytes | str = False,
) -> Callable[[EndpointT], EndpointT]:
    """Limit a Starlette or FastAPI endpoint; RateLimitMiddleware decides when the endpoint is called.

    Put it directly above the function, below the route decorator.  The arguments are Rule's; the
    limits are validated here, when the module defining the endpoint is imported.  The rule is named
    ``name``, or after the endpoint (``module.function``).
    """
    options: dict[str, Any] = {
        "key": key,
        "algorithm": algorithm,
        "cost": cost,
        "fail_open": fail_open,
        "quota_unit": quota_unit,
        "partition_key": partition_key,
    }
    Rule("/", limits, name=name or "route", **options)  # validate now, so a bad limit fails at import time
    mark = _Mark(limits, name, options)

    def decorate(endpoint: EndpointT) -> EndpointT:
        if inspect.isclass(endpoint) or not callable(endpoint):
            raise ConfigurationError(
                f"@rate_limit decorates endpoint functions, got {endpoint!r}; on a class-based endpoint, "
                "decorate its get/post/... methods."
            )
        # Stacked decorators make one wrapper whose rules are all decided in one call: all or nothing.
        marks: tuple[_Mark, ...] = (mark,)
        inner: Callable[..., Any] = endpoint
        if getattr(endpoint, _WRAPPER, None) is endpoint:
            marks = (*getattr(endpoint, _MARKS), mark)
            inner = getattr(endpoint, "__wrapped__")  # noqa: B009 - set by functools.wraps, unknown to the type
        return cast(EndpointT, _limited(inner, marks))

    return decorate


def _limited(endpoint: Callable[..., Any], marks: tuple[_Mark, ...]) -> Callable[..., Any]:
    """``endpoint`` behind a wrapper that asks the request's middleware to decide ``marks`` first."""
    base = f"{getattr(endpoint, '__module__', '?')}.{getattr(endpoint, '__qualname__', repr(endpoint))}"
    unnamed = sum(1 for mark in marks if mark.name is None)
    rules: list[Rule] = []
    for index, mark in enumerate(marks):
        name = mark.name or (base if unnamed == 1 else f"{base}#{index + 1}")
        if any(rule.name == name for rule in rules):
            raise ConfigurationError(f"@rate_limit on {base}: two limits are named {name!r}; give each its own name=.")
        rules.append(Rule("/", mark.limits, name=name, **mark.options))
    applied = tuple(rules)
    for rule in applied:
        _endpoint_rules.setdefault(rule.name, []).append(rule)
    is_async = _is_async(endpoint)

    @functools.wraps(endpoint)
    async def limited(*args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            if is_async:
                return await endpoint(*args, **kwargs)
            return await run_in_threadpool(endpoint, *args, **kwargs)

        guard = current_guard.get()
        if guard is None:
            if base not in _unguarded_logged:
                _unguarded_logged.add(base)
                _logger.error(
                    "asgi_ratelimit: %s is marked with @rate_limit but was called outside RateLimitMiddleware: "
                    "it is NOT limited.  Add the middleware to the app that serves it.",
                    base,
                )
            return await call()
        # When the middleware refuses, the answer is a Response: Starlette sends it, FastAPI passes it on.
        return await guard.check(applied, call)

    global _marked
    _marked += 1
    limited.__signature__ = _resolved_signature(endpoint)  # type: ignore[attr-defined]
    setattr(limited, ENDPOINT_RULES, applied)
    setattr(limited, _MARKS, marks)
    setattr(limited, _WRAPPER, limited)
    with contextlib.suppress(AttributeError, TypeError):  # a builtin or a bound method takes no attributes
        setattr(endpoint, _BYPASSED, limited)
    return limited


def _resolved_signature(endpoint: Callable[..., Any]) -> inspect.Signature:
    """The endpoint's signature with its annotations evaluated in the endpoint's own module.

    Frameworks read the wrapper's signature to resolve parameters; some evaluate string annotations
    (``from __future__ import annotations``) in the namespace of the function they are given, which
    for the wrapper is this module.  Evaluated here, the annotations no longer depend on it.
    """
    signature = inspect.signature(endpoint)
    try:
        hints = typing.get_type_hints(endpoint, include_extras=True)
    except Exception:  # a name only imported for type checkers: leave the annotations as written
        return signature
    parameters = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()]
    return signature.replace(parameters=parameters, return_annotation=hints.get("return", signature.return_annotation))


def bypassed_endpoint(endpoint: object) -> str | None:
    """The name of a @rate_limit that ``endpoint`` bypasses (the route holds the bare function), once; else None.

    Reported once per function: the middleware logs it at ERROR the first time the route is called.
    """
    wrapper = getattr(endpoint, _BYPASSED, None)
    if wrapper is None or wrapper is endpoint:
        return None
    with contextlib.suppress(AttributeError, TypeError):
        delattr(endpoint, _BYPASSED)
    rules: tuple[Rule, ...] = getattr(wrapper, ENDPOINT_RULES, ())
    return ", ".join(rule.name for rule in rules) or None
