"""What is said when the app starts: a backend given as a URL (or wrongly), a Redis that does not answer,
rules whose path can match no route, and glob paths.  Written as users configure them."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from conftest import free_port
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from test_uvicorn import serve

from asgi_ratelimit import ConfigurationError, MemoryBackend, RateLimitMiddleware, RedisBackend, Rule
from asgi_ratelimit._startup import redacted


def by_user(request: HTTPConnection) -> str | None:
    return request.headers.get("x-user")


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


async def run_lifespan(app: Callable[..., Awaitable[None]]) -> list[str]:
    """Drive the ASGI lifespan protocol by hand: startup then shutdown; the messages the app sent."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "asgi_ratelimit"]


class TestRulesThatMatchNothing:
    def test_a_glob_is_refused_with_the_template_that_does_what_it_meant(self) -> None:
        with pytest.raises(ConfigurationError) as info:
            Rule("/api/*", "10/minute")
        assert "'/api/*'" in str(info.value) and "'/api/{path:path}'" in str(info.value)

    async def test_a_rule_that_can_match_no_route_is_a_warning_at_startup(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = Starlette(
            routes=[
                Route("/login", ok, methods=["POST"]),
                Route("/users/{user_id:int}", ok),
                Mount("/api", routes=[Route("/items/{name}", ok)]),
            ]
        )
        app.add_middleware(
            RateLimitMiddleware,
            rules=[
                Rule("/logn", "5/minute", name="typo"),
                Rule("/login/", "5/minute", name="slash"),
                Rule("/login", "5/minute", methods=["POST"], name="login"),
                Rule("/users/42", "5/minute", name="one-user"),
                Rule("/users/{id}", "5/minute", name="users"),
                Rule("/api/{rest:path}", "5/minute", name="api"),
                Rule("/api/items/{name}", "5/minute", name="items"),
            ],
        )
        with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
            assert await run_lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        warned = warnings_of(caplog)
        assert len(warned) == 2, warned
        assert "'typo'" in warned[0] and "'/logn'" in warned[0] and "/login" in warned[0]
        assert "'slash'" in warned[1]

    async def test_a_mounted_app_without_routes_counts_as_every_path_below_it(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = Starlette(routes=[Mount("/static", app=PlainTextResponse("file"))])
        app.add_middleware(
            RateLimitMiddleware, rules=[Rule("/static/{p:path}", "5/minute"), Rule("/other", "1/second")]
        )
        with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
            await run_lifespan(app)
        warned = warnings_of(caplog)
        assert len(warned) == 1 and "'/other'" in warned[0], warned

    async def test_a_fastapi_app(self, caplog: pytest.LogCaptureFixture) -> None:
        app = FastAPI()

        @app.get("/items/{item_id}")
        async def item(item_id: int) -> int:
            return item_id

        app.add_middleware(RateLimitMiddleware, rules=[Rule("/item/{item_id}", "5/minute", name="typo")])
        with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
            await run_lifespan(app)
        assert any("'typo'" in m for m in warnings_of(caplog))

    async def test_a_fastapi_app_built_from_included_routers(self, caplog: pytest.LogCaptureFixture) -> None:
        router = APIRouter(prefix="/v1")

        @router.get("/items")
        async def items() -> list[int]:
            return []

        app = FastAPI()
        app.include_router(router, prefix="/api")
        app.add_middleware(
            RateLimitMiddleware,
            rules=[
                Rule("/api/v1/itemz", "5/minute", name="typo"),
                Rule("/api/v1/items", "5/minute", name="items"),
                Rule("/api/{rest:path}", "5/minute", name="everything"),
            ],
        )
        with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
            await run_lifespan(app)
        warned = warnings_of(caplog)
        assert len(warned) == 1 and "'typo'" in warned[0], warned


class TestBackendURL:
    @pytest.mark.parametrize(
        ("backend", "fragment"),
        [
            (42, "42 is not a Backend"),
            ("http://127.0.0.1:6379", "is not a backend URL"),
            ("127.0.0.1:6379", "is not a backend URL"),
            ("memory://lots", "memory://"),
            ("redis://:s3cret@127.0.0.1:notaport/0", "***"),
        ],
    )
    def test_anything_but_a_backend_or_its_url_is_refused_at_construction(self, backend: Any, fragment: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            RateLimitMiddleware(ok, backend=backend)
        assert fragment in str(info.value)
        assert "s3cret" not in str(info.value)

    def test_urls_build_the_backend(self) -> None:
        assert isinstance(RateLimitMiddleware(ok, backend="memory://").backend, MemoryBackend)
        backend = RateLimitMiddleware(ok, backend="redis://127.0.0.1:6379/0").backend
        assert isinstance(backend, RedisBackend)

    def test_the_password_never_reaches_a_log_line(self) -> None:
        assert redacted("redis://user:s3cret@db.internal:6380/2") == "redis://user:***@db.internal:6380/2"
        assert redacted("rediss://:s3cret@db/0") == "rediss://:***@db/0"
        assert redacted("redis://db:6379/0") == "redis://db:6379/0"

    async def test_a_redis_that_does_not_answer_is_an_error_at_startup_and_the_app_still_starts(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        url = f"redis://:s3cret@127.0.0.1:{free_port()}/3"  # nothing listens there
        app = Starlette(routes=[Route("/", ok)])
        app.add_middleware(RateLimitMiddleware, backend=url, rules=[Rule("/", "1/minute", key=by_user)])
        with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
            assert await run_lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "does not answer at start-up" in errors[0] and url.replace("s3cret", "***") in errors[0]
        assert "s3cret" not in errors[0]

    @pytest.mark.redis
    @pytest.mark.slow
    def test_a_redis_url_through_uvicorn_limits_and_is_quiet_at_startup(
        self, redis_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = Starlette(routes=[Route("/", ok)])
        app.add_middleware(
            RateLimitMiddleware, backend=redis_url, rules=[Rule("/", "2/minute", key=by_user, name="url-test")]
        )
        user = f"url-{free_port()}"  # a fresh key each run: the shared Redis may hold an earlier run's count
        with (
            caplog.at_level(logging.ERROR, logger="asgi_ratelimit"),
            serve(app) as base,
            httpx.Client(base_url=base) as client,
        ):
            codes = [client.get("/", headers={"x-user": user}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
