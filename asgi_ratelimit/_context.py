"""How code inside the app reaches the RateLimitMiddleware that is handling its request.

An ``@rate_limit`` endpoint is limited when it is reached, not by finding it among the app's routes
ahead of time: routers are free to store their routes however they like (FastAPI's included routers
keep them out of ``app.routes``), so the only layout that holds everywhere is "this endpoint is being
called now".  The middleware puts a guard for the request in a context variable before it calls the
app; the endpoint's wrapper asks that guard to decide.  Context variables follow the request into
tasks and worker threads, so the guard is found behind any middleware and in sync endpoints alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .rules import Rule

__all__ = ["RequestGuard", "current_guard"]


class RequestGuard(Protocol):
    """The middleware's hold on one request, for the endpoint it reaches."""

    async def check(self, rules: tuple[Rule, ...], call: Callable[[], Awaitable[Any]]) -> Any:
        """Decide ``rules``, then return what ``call()`` (the endpoint) returns, or the 429 or 503 answer instead."""
        ...


#: The guard of the request being handled, None outside a RateLimitMiddleware.
current_guard: ContextVar[RequestGuard | None] = ContextVar("asgi_ratelimit_guard", default=None)
