"""What the middleware checks once, before the first request: the backend it was given, and its rules.

Mistakes here are silent at request time (a wrong Redis host fails open, a rule with a typo in its
path matches nothing), so they are said when the app starts: a ConfigurationError for what is wrong
in itself, an ERROR or WARNING in the log for what only the running app can show.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator, Sequence
from typing import Any

from starlette.routing import Match

from .backends import Backend, MemoryBackend, RedisBackend
from .errors import ConfigurationError
from .rules import Rule

__all__ = ["backend_from", "check_rules_reach_routes", "ping_at_startup", "redacted"]

logger = logging.getLogger("asgi_ratelimit")

_REDIS_SCHEMES = ("redis", "rediss", "unix")
# How long the start-up ping may take: a first connection (DNS, TLS) is slower than a request's budget.
_STARTUP_PING_SECONDS = 2.0


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for a log line."""
    scheme, separator, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not separator or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def backend_from(backend: object) -> tuple[Backend, str | None]:
    """The Backend that ``backend=`` names, and the URL it was built from (None when it was given built).

    Accepts a Backend, None (a MemoryBackend), or a URL: ``memory://``, ``redis://``, ``rediss://``
    or ``unix://``.  Anything else is a ConfigurationError now, rather than a failure on every request.
    """
    if backend is None:
        return MemoryBackend(), None
    if isinstance(backend, str):
        scheme = backend.split("://", 1)[0].lower() if "://" in backend else ""
        if scheme == "memory":
            if backend.lower() != "memory://":
                raise ConfigurationError(f'backend={redacted(backend)!r}: the in-memory backend is just "memory://".')
            return MemoryBackend(), backend
        if scheme in _REDIS_SCHEMES:
            try:
                return RedisBackend.from_url(backend), backend
            except ValueError as exc:  # redis-py's word for a malformed URL
                raise ConfigurationError(f"backend={redacted(backend)!r} is not a valid Redis URL: {exc}") from None
        raise ConfigurationError(
            f"backend={redacted(backend)!r} is not a backend URL: give redis://host:port/db, rediss://..., "
            "unix:///path or memory://, or a Backend object."
        )
    for method in ("submit", "hit_many", "ping", "aclose"):
        if not callable(getattr(backend, method, None)):
            raise ConfigurationError(
                f"backend={backend!r} is not a Backend (it has no {method}()): give MemoryBackend(), "
                "RedisBackend.from_url(...), or a URL such as redis://127.0.0.1:6379/0."
            )
    return backend, None  # type: ignore[return-value]


async def ping_at_startup(backend: Backend, url: str | None) -> None:
    """Ping the backend once at start-up and log an ERROR naming it when it does not answer.

    The app starts anyway: requests fail open (or closed) as configured, but a wrong host, port,
    password or database is in the log before the first request, not hidden behind it.
    """
    name = redacted(url) if url is not None else type(backend).__name__
    try:
        await asyncio.wait_for(backend.ping(), _STARTUP_PING_SECONDS)
    except Exception as exc:
        logger.error(
            "asgi_ratelimit: the backend %s does not answer at start-up (%s: %s); requests are let through "
            "(or refused, where fail_open=False) until it does",
            name,
            type(exc).__name__,
            str(exc) or f"no answer within {_STARTUP_PING_SECONDS:.0f} s",
        )


# -- rules against the app's routes ------------------------------------------------------------

# Values a path parameter of each Starlette convertor can take, to turn a route template into a path.
_SAMPLES = {"str": "x", "path": "x/y", "int": "1", "float": "1.5", "uuid": "00000000-0000-0000-0000-000000000000"}
_PARAM = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::([a-zA-Z_][a-zA-Z0-9_]*))?}")


def _sample(template: str) -> str:
    return _PARAM.sub(lambda m: _SAMPLES.get(m.group(2) or "str", "x"), template)


def _route_paths(routes: Sequence[Any], prefix: str) -> Iterator[tuple[str, bool]] | None:
    """(path template, is a mount of an app without readable routes) of every route, or None when one cannot be read."""
    found: list[tuple[str, bool]] = []
    for route in routes:
        path = getattr(route, "path", None)
        sub_routes = getattr(route, "routes", None)
        if path is None and sub_routes is None:
            return None  # a route type whose layout is its framework's own business: no verdict
        if isinstance(sub_routes, list) and sub_routes:
            inner = _route_paths(sub_routes, prefix + (path or ""))
            if inner is None:
                return None
            found.extend(inner)
        elif sub_routes is not None and path is not None:
            found.append((prefix + path, True))  # a Mount of an app without routes: anything below it
        elif path is not None:
            found.append((prefix + path, False))
    return iter(found)


def check_rules_reach_routes(rules: Sequence[Rule], app: Any) -> None:
    """Log one WARNING naming each rule whose path can match none of the app's routes (when they can be read)."""
    routes = None
    for _ in range(16):  # through middleware wrapped around the app by hand, to the app with routes
        routes = getattr(getattr(app, "router", app), "routes", None)
        if routes is not None or not hasattr(app, "app"):
            break
        app = app.app
    if not isinstance(routes, list) or not routes:
        return
    paths = _route_paths(routes, "")
    if paths is None:
        # Some router keeps its routes to itself (FastAPI's included routers do): ask the routes whether
        # they would take the one path an exact rule names, through the routing interface every route has.
        for rule in rules:
            if rule.exact_path is not None and not _routed(routes, rule.exact_path):
                _warn(rule, "")
        return
    templates = list(paths)
    listing = ", ".join(sorted({t for t, _ in templates}))[:500]
    for rule in rules:
        if not any(_may_meet(rule, t, mount) for t, mount in templates):
            _warn(rule, f"; routes are: {listing}")


def _warn(rule: Rule, routes: str) -> None:
    logger.warning(
        "asgi_ratelimit: rule %r (path %r) matches none of the app's routes, so it limits nothing%s",
        rule.name,
        rule.path if isinstance(rule.path, str) else rule.path.pattern,
        routes,
    )


def _routed(routes: Sequence[Any], path: str) -> bool:
    """Whether some route takes ``path`` (for any method); True when a route cannot say."""
    for route in routes:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": [], "query_string": b""}
        try:
            match, _ = route.matches(scope)
        except Exception:
            return True  # no verdict, no warning
        if match is not Match.NONE:
            return True
    return False


def _may_meet(rule: Rule, template: str, mount: bool) -> bool:
    """Whether some request path can match both ``rule`` and the route ``template``."""
    if mount:
        if rule.matches_any_method(template) or rule.matches_any_method(template + "/x"):
            return True
        return isinstance(rule.path, str) and (rule.path + "/").startswith(template.rstrip("/") + "/")
    if rule.matches_any_method(_sample(template)):
        return True
    # The other way round: a rule written for one concrete path of a parameterised route.
    if isinstance(rule.path, str):
        from starlette.routing import compile_path

        return compile_path(template)[0].match(_sample(rule.path)) is not None
    return False
