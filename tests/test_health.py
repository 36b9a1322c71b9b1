"""Health routes: readiness pings the backend within the timeout, liveness never touches it; also as a separate app."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import RedisProcess
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_ratelimit import (
    BackendError,
    ConfigurationError,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    operations_app,
)


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


class Pings(MemoryBackend):
    def __init__(self, mode: str = "ok") -> None:
        super().__init__()
        self.mode = mode
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if self.mode == "fail":
            raise BackendError("down")
        if self.mode == "hang":
            await asyncio.sleep(10)


def make(backend: MemoryBackend | RedisBackend, **kwargs: object) -> RateLimitMiddleware:
    app = Starlette(routes=[Route("/", ok)])
    rules = [Rule("/{p:path}", "1/minute", key=lambda r: "all", name="all")]
    return RateLimitMiddleware(app, rules=rules, backend=backend, registry=CollectorRegistry(), **kwargs)  # type: ignore[arg-type]


async def call(app: object, method: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:  # type: ignore[arg-type]
        return await client.request(method, path)


class TestHealth:
    async def test_ok(self) -> None:
        backend = Pings()
        app = make(backend, health_path="/health")
        for _ in range(3):  # exempt from the 1/minute rule
            response = await call(app, "GET", "/health")
            assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok" and body["backend"] == "Pings" and isinstance(body["latency_ms"], float)
        assert set(body) == {"status", "backend", "latency_ms"}
        assert response.headers["cache-control"] == "no-store"

    @pytest.mark.parametrize("mode", ["fail", "hang"])
    @pytest.mark.timing
    async def test_unavailable(self, mode: str) -> None:
        app = make(Pings(mode), health_path="/health", timeout=0.05)
        started = time.perf_counter()
        response = await call(app, "GET", "/health")
        assert time.perf_counter() - started < 0.5
        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"

    async def test_liveness_never_touches_the_backend(self) -> None:
        backend = Pings("hang")
        app = make(backend, health_path="/health")
        for _ in range(3):
            response = await call(app, "GET", "/health/live")
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        assert backend.pings == 0

    async def test_off_by_default(self) -> None:
        app = make(Pings())
        assert (await call(app, "GET", "/health")).status_code == 404  # the app's own 404, limited like any path

    async def test_head_and_other_methods(self) -> None:
        app = make(Pings(), health_path="/health")
        head = await call(app, "HEAD", "/health/live")
        assert head.status_code == 200 and head.content == b""
        assert (await call(app, "POST", "/health")).status_code == 405


class TestOperationsApp:
    async def test_a_separate_app_for_a_private_port(self) -> None:
        middleware = make(Pings())
        ops = operations_app(middleware)
        assert (await call(ops, "GET", "/health")).status_code == 200
        assert (await call(ops, "GET", "/health/live")).status_code == 200
        metrics = await call(ops, "GET", "/metrics")
        assert metrics.status_code == 200 and "asgi_ratelimit_breaker_state" in metrics.text
        assert (await call(ops, "GET", "/")).status_code == 404

    async def test_from_a_limiter_with_custom_paths(self) -> None:
        middleware = make(Pings())
        ops = operations_app(middleware.limiter, metrics_path="/m", health_path="/ready/")
        assert (await call(ops, "GET", "/ready")).status_code == 200
        assert (await call(ops, "GET", "/ready/live")).status_code == 200
        assert (await call(ops, "GET", "/m")).status_code == 200

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"metrics_path": "metrics"}, "metrics_path must be a path starting with '/'"),
            ({"health_path": "/x", "metrics_path": "/x"}, "must differ"),
            ({"health_path": "/x", "metrics_path": "/x/live"}, "must differ"),
        ],
    )
    def test_invalid_paths(self, kwargs: dict[str, str], message: str) -> None:
        with pytest.raises(ConfigurationError, match=message):
            make(Pings(), **kwargs)

    def test_needs_a_limiter(self) -> None:
        with pytest.raises(ConfigurationError, match="needs a RateLimitMiddleware or a Limiter"):
            operations_app(object())  # type: ignore[arg-type]


@pytest.mark.redis
async def test_health_follows_a_real_redis(redis_server: RedisProcess) -> None:
    backend = RedisBackend.from_url(redis_server.url)
    app = make(backend, health_path="/health")
    try:
        assert (await call(app, "GET", "/health")).json()["status"] == "ok"
        await asyncio.to_thread(redis_server.stop)
        response = await call(app, "GET", "/health")
        assert response.status_code == 503 and response.json()["backend"] == "RedisBackend"
        assert (await call(app, "GET", "/health/live")).status_code == 200
    finally:
        await backend.aclose()
