"""@rate_limit on endpoints wherever an app's routers put them, written the way users build their apps.

FastAPI apps built from APIRouters (include_router with and without prefixes, routers included in
routers, router-level dependencies), Starlette Router/Mount/Host, routes added after the middleware,
sync endpoints, websockets; in process on every backend, and through a real uvicorn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute
from starlette.websockets import WebSocket
from test_middleware import assert_problem_429, client_for, policies_of
from test_uvicorn import closing, serve

from asgi_ratelimit import Backend, RateLimitMiddleware, Rule, rate_limit

# Tests of answers, not of the time budget: a loaded machine must not turn a decision into a fail-open.
TIMEOUT = 2.0


def by_user(request: HTTPConnection) -> str | None:
    return request.headers.get("x-user")


async def statuses(app: Any, path: str, count: int = 3, user: str = "ann", **kwargs: Any) -> list[int]:
    async with client_for(app) as client:
        return [(await client.get(path, headers={"x-user": user}, **kwargs)).status_code for _ in range(count)]


def fastapi_app(backend: Backend, build: Any) -> FastAPI:
    app = FastAPI()
    build(app)
    app.add_middleware(RateLimitMiddleware, backend=backend, timeout=TIMEOUT)
    return app


class TestFastAPIRouters:
    async def test_include_router_without_prefix(self, mw_backend: Backend) -> None:
        router = APIRouter()

        @router.get("/items")
        @rate_limit("2/minute", key=by_user)
        async def items() -> dict[str, str]:
            return {"ok": "yes"}

        app = fastapi_app(mw_backend, lambda app: app.include_router(router))
        assert await statuses(app, "/items") == [200, 200, 429]

    async def test_include_router_with_a_prefix(self, mw_backend: Backend) -> None:
        router = APIRouter(prefix="/v1")

        @router.get("/items/{item_id}")
        @rate_limit("2/minute", key=by_user)
        async def item(item_id: int) -> dict[str, int]:
            return {"id": item_id}

        app = fastapi_app(mw_backend, lambda app: app.include_router(router, prefix="/api"))
        async with client_for(app) as client:
            got = [(await client.get(f"/api/v1/items/{i}", headers={"x-user": "ann"})) for i in range(3)]
            other_user = await client.get("/api/v1/items/1", headers={"x-user": "bob"})
        assert [r.status_code for r in got] == [200, 200, 429]
        assert got[0].json() == {"id": 0}
        assert_problem_429(got[2])
        assert other_user.status_code == 200

    async def test_a_router_included_in_a_router_included_in_the_app(self, mw_backend: Backend) -> None:
        inner = APIRouter(prefix="/inner")
        outer = APIRouter(prefix="/outer")

        @inner.post("/act")
        @rate_limit("1/minute", key=by_user)
        def act() -> dict[str, bool]:  # a sync endpoint: FastAPI runs it in a worker thread
            return {"done": True}

        outer.include_router(inner)
        app = fastapi_app(mw_backend, lambda app: app.include_router(outer, prefix="/api"))
        async with client_for(app) as client:
            codes = [(await client.post("/api/outer/inner/act", headers={"x-user": "a"})).status_code for _ in range(2)]
        assert codes == [200, 429]

    async def test_router_dependencies_run_and_the_endpoint_keeps_its_parameters(self, mw_backend: Backend) -> None:
        seen: list[str] = []

        def audit(request: Request) -> None:
            seen.append(request.url.path)

        router = APIRouter(dependencies=[Depends(audit)])

        @router.get("/reports/{report_id}")
        @rate_limit("1/minute", key=by_user)
        async def report(report_id: int, verbose: bool = False) -> dict[str, Any]:
            return {"id": report_id, "verbose": verbose}

        app = fastapi_app(mw_backend, lambda app: app.include_router(router, prefix="/r"))
        async with client_for(app) as client:
            first = await client.get("/r/reports/7?verbose=true", headers={"x-user": "a"})
            second = await client.get("/r/reports/7", headers={"x-user": "a"})
            invalid = await client.get("/r/reports/x", headers={"x-user": "b"})
        assert first.json() == {"id": 7, "verbose": True}
        assert second.status_code == 429
        assert invalid.status_code == 422  # FastAPI validates before the endpoint: nothing is counted
        assert seen == ["/r/reports/7", "/r/reports/7", "/r/reports/x"]

    async def test_the_same_router_included_twice_shares_the_endpoints_counts(self, mw_backend: Backend) -> None:
        router = APIRouter()

        @router.get("/ping")
        @rate_limit("2/minute", key=by_user)
        async def ping() -> str:
            return "pong"

        def build(app: FastAPI) -> None:
            app.include_router(router, prefix="/a")
            app.include_router(router, prefix="/b")

        app = fastapi_app(mw_backend, build)
        async with client_for(app) as client:
            codes = [(await client.get(path, headers={"x-user": "a"})).status_code for path in ("/a/ping", "/b/ping")]
            codes.append((await client.get("/a/ping", headers={"x-user": "a"})).status_code)
        assert codes == [200, 200, 429]

    async def test_routes_added_after_the_middleware(self, mw_backend: Backend) -> None:
        app = FastAPI()
        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)
        router = APIRouter()

        @router.get("/late")
        @rate_limit("1/minute", key=by_user)
        async def late() -> str:
            return "late"

        app.include_router(router)
        assert await statuses(app, "/late", 2) == [200, 429]

    async def test_allowed_responses_carry_the_endpoints_headers_beside_the_middlewares(
        self, mw_backend: Backend
    ) -> None:
        router = APIRouter()

        @router.get("/both")
        @rate_limit("5/minute", key=by_user, name="endpoint")
        async def both() -> str:
            return "both"

        app = FastAPI()
        app.include_router(router)
        app.add_middleware(
            RateLimitMiddleware,
            backend=mw_backend,
            timeout=TIMEOUT,
            rules=[Rule("/{p:path}", "10/minute", key=by_user, name="all")],
        )
        async with client_for(app) as client:
            response = await client.get("/both", headers={"x-user": "a"})
        assert policies_of(response) == {"all": {"q": 10, "w": 60}, "endpoint": {"q": 5, "w": 60}}
        assert response.headers["ratelimit"].count(";r=") == 2


class TestStarletteRouting:
    async def test_router_mount_and_host(self, mw_backend: Backend) -> None:
        @rate_limit("1/minute", key=by_user)
        async def deep(request: Request) -> PlainTextResponse:
            return PlainTextResponse(request.path_params["name"])

        api = Router(routes=[Mount("/v1", routes=[Route("/things/{name}", deep)])])
        app = Starlette(
            routes=[Host("api.example.com", app=api), Mount("/api", app=api)],
        )
        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.example.com") as c:
            by_host = [(await c.get("/v1/things/a", headers={"x-user": "u"})).status_code for _ in range(2)]
        assert by_host == [200, 429]
        assert await statuses(app, "/api/v1/things/b", 1, user="v") == [200]
        assert await statuses(app, "/api/v1/things/b", 1, user="v") == [429]

    async def test_a_route_added_after_the_middleware(self, mw_backend: Backend) -> None:
        app = Starlette()
        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)

        @rate_limit("1/minute", key=by_user)
        async def late(request: Request) -> PlainTextResponse:
            return PlainTextResponse("late")

        app.router.routes.append(Route("/late", late))
        assert await statuses(app, "/late", 2) == [200, 429]

    async def test_a_request_exempt_by_path_is_not_limited_by_its_endpoint(self, mw_backend: Backend) -> None:
        @rate_limit("1/minute", key=by_user)
        async def health(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/health", health)])
        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, exempt=["/health"])
        assert await statuses(app, "/health", 3) == [200, 200, 200]


class TestSaidLoudly:
    async def test_the_decorator_above_the_route_decorator_is_an_error_in_the_log(
        self, mw_backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = FastAPI()

        @rate_limit("1/minute", key=by_user)  # wrong order: the route holds the bare function
        @app.get("/upside-down")
        async def upside_down() -> str:
            return "x"

        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)
        with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
            assert await statuses(app, "/upside-down", 2) == [200, 200]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("above the route decorator" in m and "upside_down" in m for m in errors), errors

    async def test_a_marked_endpoint_without_the_middleware_is_an_error_in_the_log(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        @rate_limit("1/minute", key=by_user)
        async def lonely(request: Request) -> PlainTextResponse:
            return PlainTextResponse("x")

        app = Starlette(routes=[Route("/lonely", lonely)])
        with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
            assert await statuses(app, "/lonely", 2) == [200, 200]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert any("NOT limited" in m and "lonely" in m for m in errors), errors


@pytest.mark.slow
def test_an_included_router_through_uvicorn(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()
    router = APIRouter(prefix="/v1")

    @router.get("/items")
    @rate_limit("2/minute", key=by_user)
    def items() -> dict[str, bool]:  # sync: run in a worker thread, where the guard must still be found
        return {"ok": True}

    app = FastAPI(lifespan=closing(backend))
    app.include_router(router, prefix="/api")
    app.add_middleware(RateLimitMiddleware, backend=backend, timeout=2.0)
    with serve(app) as base, httpx.Client(base_url=base) as client:
        codes = [client.get("/api/v1/items", headers={"x-user": "ann"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_a_marked_websocket_is_refused_at_the_handshake(kind: str, make_backend: Callable[[], Backend]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    backend = make_backend()

    @rate_limit("1/minute", key=by_user, name="ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app: Starlette
    if kind == "starlette":
        app = Starlette(routes=[Mount("/live", routes=[WebSocketRoute("/ws", echo)])], lifespan=closing(backend))
    else:
        app = FastAPI(lifespan=closing(backend))
        router = APIRouter(prefix="/live")
        router.add_api_websocket_route("/ws", echo)
        app.include_router(router)
    app.add_middleware(RateLimitMiddleware, backend=backend, timeout=2.0)
    with serve(app) as base:
        url = base.replace("http://", "ws://") + "/live/ws"
        with connect(url, additional_headers={"x-user": "ann"}, open_timeout=5) as ws:
            assert ws.recv(timeout=5) == "hello"
            accepted = ws.response
        with pytest.raises(InvalidStatus) as info:
            connect(url, additional_headers={"x-user": "ann"}, open_timeout=5)
    assert accepted is not None and accepted.headers["RateLimit"] == '"ws";r=0;t=60'
    assert info.value.response.status_code == 429
