"""The operations routes: Prometheus metrics, backend health (readiness) and liveness.

``RateLimitMiddleware(metrics_path=..., health_path=...)`` serves them on the app's own port,
exempt from limiting; ``operations_app(middleware)`` serves them as a separate ASGI app, e.g. on a
private port that the load balancer does not expose:

    GET <health_path>        200 {"status": "ok", ...} when backend.ping() answers within the
                             limiter's timeout, 503 {"status": "unavailable", ...} when not
    GET <health_path>/live   200 {"status": "ok"}: the process answers; never touches the backend
    GET <metrics_path>       the exposition: Prometheus text, or OpenMetrics when Accept asks for it
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.types import Receive, Scope, Send

from ._limiter import Limiter
from ._scope import route_path
from .errors import BackendError, ConfigurationError

__all__ = ["operations_app"]


class _HasLimiter(Protocol):
    limiter: Limiter


def _check_path(name: str, path: str | None) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str) or not path.startswith("/") or path != path.strip() or "?" in path:
        raise ConfigurationError(f"{name} must be a path starting with '/' (or None to turn it off), got {path!r}.")
    return path.rstrip("/") or "/"


class OperationsApp:
    """An ASGI app answering the metrics, health and liveness routes (404 elsewhere).

    Args:
        limiter: the Limiter whose backend the health route pings.
        registry: the registry the metrics route exposes; the limiter's, else the global REGISTRY.
        metrics_path: where the exposition is served; None turns it off.
        health_path: where health is served (liveness at ``<health_path>/live``); None turns it off.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        registry: CollectorRegistry | None = None,
        metrics_path: str | None = "/metrics",
        health_path: str | None = "/health",
    ) -> None:
        self.limiter = limiter
        self.registry = registry or limiter.registry or REGISTRY
        self.metrics_path = _check_path("metrics_path", metrics_path)
        self.health_path = _check_path("health_path", health_path)
        self.live_path = None if self.health_path is None else self.health_path.rstrip("/") + "/live"
        paths = [p for p in (self.metrics_path, self.health_path, self.live_path) if p is not None]
        if len(set(paths)) != len(paths):
            raise ConfigurationError(
                f"metrics_path {metrics_path!r} and health_path {health_path!r} (with /live) must differ."
            )
        self.paths: frozenset[str] = frozenset(paths)
        self._backend_name = type(limiter.backend).__name__

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # a websocket handshake left unanswered is refused by the server
        await self.serve(route_path(scope), scope, send)

    async def serve(self, path: str, scope: Scope, send: Send) -> None:
        """Answer the request for ``path`` (the path without the app's root_path)."""
        if path not in self.paths:
            await _send(send, 404, b"text/plain; charset=utf-8", b"Not Found\n")
            return
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _send(send, 405, b"text/plain; charset=utf-8", b"Method Not Allowed\n", [(b"allow", b"GET, HEAD")])
            return
        head = method == "HEAD"
        if path == self.live_path:
            await _send_json(send, 200, {"status": "ok"}, head)
        elif path == self.health_path:
            status, body = await self.health()
            await _send_json(send, status, body, head)
        else:
            accept = ""
            for name, value in scope.get("headers", ()):
                if name == b"accept":
                    accept = value.decode("latin-1")
                    break
            encoder, content_type = choose_encoder(accept)
            # Collection walks every collector of the registry; it is a scrape every few seconds, not a request.
            payload = encoder(self.registry)
            await _send(send, 200, content_type.encode("latin-1"), b"" if head else payload, length=len(payload))

    async def health(self) -> tuple[int, dict[str, Any]]:
        """The health route's status code and JSON body."""
        started = time.perf_counter()
        try:
            await self.limiter.ping()
        except BackendError:
            status, text = 503, "unavailable"
        else:
            status, text = 200, "ok"
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        body: dict[str, Any] = {"status": text, "backend": self._backend_name, "latency_ms": latency_ms}
        bug = self.limiter.bug
        if bug is not None:
            # The backend answers pings, but decisions fail with a bug: limits are not being applied.
            status, body["status"] = 503, "error"
            body["error"] = type(bug.__cause__ or bug).__name__
        return status, body


def operations_app(
    source: Limiter | _HasLimiter,
    *,
    registry: CollectorRegistry | None = None,
    metrics_path: str | None = "/metrics",
    health_path: str | None = "/health",
) -> OperationsApp:
    """The metrics, health and liveness routes of a RateLimitMiddleware (or Limiter) as an ASGI app of their own."""
    limiter = source if isinstance(source, Limiter) else getattr(source, "limiter", None)
    if not isinstance(limiter, Limiter):
        raise ConfigurationError(f"operations_app needs a RateLimitMiddleware or a Limiter, got {source!r}.")
    if registry is None:
        registry = getattr(source, "registry", None)
    return OperationsApp(limiter, registry=registry, metrics_path=metrics_path, health_path=health_path)


async def _send_json(send: Send, status: int, body: dict[str, Any], head: bool) -> None:
    payload = json.dumps(body, separators=(",", ":")).encode()
    await _send(send, status, b"application/json", b"" if head else payload, length=len(payload))


async def _send(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    extra: list[tuple[bytes, bytes]] | None = None,
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"cache-control", b"no-store"),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
