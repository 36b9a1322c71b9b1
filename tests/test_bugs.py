"""A bug is not an outage: a backend call that fails with a programming error (a TypeError from a driver
version we do not support, a Lua error in our script) still fails open or closed so the app keeps serving,
but it is logged at ERROR with its traceback, counted under its own kind, and the health route reports
the backend unhealthy until a call succeeds."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_ratelimit import FixedWindow, MemoryBackend, RateLimitMiddleware, RedisBackend, Rule
from asgi_ratelimit.backends.base import Backend, Hit
from asgi_ratelimit.policies import Decision


def by_user(request: HTTPConnection) -> str | None:
    return request.headers.get("x-user")


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


class BrokenThenFixed(MemoryBackend):
    """A backend whose calls raise TypeError (as redis-py 5.2 did inside our wire code) until fixed."""

    # Decided through its own async methods, as a network backend is: the Limiter awaits them.
    in_process = False
    submit = Backend.submit

    broken = True

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        if self.broken:
            raise TypeError("get_connection() missing 1 required positional argument: 'command_name'")
        return await super().hit_many(hits)


def app_on(backend: Any, registry: CollectorRegistry, **options: Any) -> Starlette:
    app = Starlette(routes=[Route("/", ok)])
    app.add_middleware(
        RateLimitMiddleware,
        backend=backend,
        rules=[Rule("/", FixedWindow(100, 60), key=by_user, name="root")],
        registry=registry,
        health_path="/health",
        timeout=2.0,
        **options,
    )
    return app


def errors_of(registry: CollectorRegistry, kind: str) -> float:
    return registry.get_sample_value("asgi_ratelimit_backend_errors_total", {"kind": kind}) or 0.0


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_typeerror_is_logged_counted_and_unhealthy_until_a_call_succeeds(
    fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    backend = BrokenThenFixed()
    registry = CollectorRegistry()
    app = app_on(backend, registry, fail_open=fail_open)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
            answers = [(await client.get("/", headers={"x-user": "a"})).status_code for _ in range(3)]
        health = await client.get("/health")
        backend.broken = False
        repaired = await client.get("/", headers={"x-user": "a"})
        healthy = await client.get("/health")
    assert answers == ([200] * 3 if fail_open else [503] * 3)
    bugs = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(bugs) == 1, "logged once per interval, not once per request"
    assert "a bug, not an outage" in bugs[0].getMessage() and bugs[0].exc_info is not None
    assert errors_of(registry, "other") == 3
    assert (health.status_code, health.json()["status"], health.json()["error"]) == (503, "error", "TypeError")
    assert repaired.status_code == 200
    assert (healthy.status_code, healthy.json()["status"]) == (200, "ok")


@pytest.mark.redis
async def test_a_lua_error_on_a_real_redis_is_a_bug_not_an_outage(
    redis_url: str, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    registry = CollectorRegistry()
    app = app_on(backend, registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            assert (await http.get("/", headers={"x-user": "a"})).status_code == 200
            [key] = [k async for k in client.scan_iter(match=f"{key_prefix}*")]
            await client.delete(key)
            await client.set(key, "not what the script expects", px=60_000)  # WRONGTYPE inside the script
            with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
                passed = await http.get("/", headers={"x-user": "a"})
            health = await http.get("/health")
        assert passed.status_code == 200  # failed open, as configured
        assert errors_of(registry, "script") == 1 and errors_of(registry, "server") == 0
        assert any(r.exc_info for r in caplog.records if r.levelno == logging.ERROR)
        assert health.status_code == 503 and health.json()["status"] == "error"
    finally:
        async for key in client.scan_iter(match=f"{key_prefix}*"):
            await client.delete(key)
        await backend.aclose()
