"""RateLimitMiddleware behind a real uvicorn server on 127.0.0.1, with real HTTP and websocket clients.

Each test starts uvicorn.Server in a thread on a free port and stops it before returning.  The
backend's connections belong to the server's event loop, so the app closes it on shutdown.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, ClassVar

import httpx
import pytest
import urllib3
import uvicorn
from conftest import free_port
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from test_middleware import assert_problem_429, policies_of, state_of
from urllib3.util.retry import Retry

from asgi_ratelimit import Backend, RateLimitMiddleware, Rule, rate_limit

STOP_TIMEOUT = 10


def by_user(request: HTTPConnection) -> str | None:
    return request.headers.get("x-user")


@contextmanager
def serve(app: Any, **options: Any) -> Iterator[str]:
    """Run ``app`` on uvicorn in a thread; yield its base URL; stop it, bounded.  ``options`` go to uvicorn.Config."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        ws="websockets-sansio",
        log_level="warning",
        access_log=False,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + STOP_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(STOP_TIMEOUT)
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        assert not thread.is_alive(), "uvicorn did not stop"


def closing(backend: Backend) -> Callable[[Any], Any]:
    """A lifespan that closes the backend on the server's own loop."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await backend.aclose()

    return lifespan


def build_app(kind: str, backend: Backend, events: list[str], **middleware: Any) -> Starlette:
    """A Starlette or FastAPI app with the same routes; its lifespan records events and closes the backend."""

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        events.append("startup")
        yield
        await backend.aclose()
        events.append("shutdown")

    async def user(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["id"]})

    @rate_limit("1/minute", key=by_user)
    async def marked(request: Request) -> PlainTextResponse:
        return PlainTextResponse("marked")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    middleware.setdefault("timeout", 2.0)
    middleware.setdefault("rules", [Rule("/users/{id}", "2/minute", key=by_user, name="users")])
    if kind == "starlette":
        app = Starlette(
            routes=[Route("/users/{id}", user), Route("/marked", marked), WebSocketRoute("/ws", echo)],
            lifespan=lifespan,
        )
    else:
        app = FastAPI(lifespan=lifespan)
        app.add_api_route("/users/{id}", user)
        app.add_api_route("/marked", marked)
        app.add_api_websocket_route("/ws", echo)
    app.add_middleware(RateLimitMiddleware, backend=backend, **middleware)
    return app


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_limits_over_real_http(kind: str, make_backend: Callable[[], Backend]) -> None:
    events: list[str] = []
    app = build_app(kind, make_backend(), events)
    with serve(app) as base, httpx.Client(base_url=base) as client:
        responses = [client.get(f"/users/{i}", headers={"x-user": "ann"}) for i in range(3)]
        other_user = client.get("/users/1", headers={"x-user": "bob"})
        marked = [client.get("/marked", headers={"x-user": "ann"}) for _ in range(2)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert policies_of(responses[0]) == {"users": {"q": 2, "w": 60}}
    assert [state_of(r)["users"]["r"] for r in responses] == [1, 0, 0]
    body = assert_problem_429(responses[2])
    assert body["violated-policies"] == ["users"]
    assert state_of(responses[2])["users"]["t"] <= int(responses[2].headers["retry-after"])
    assert other_user.status_code == 200
    assert [r.status_code for r in marked] == [200, 429]
    # Lifespan went through the middleware both ways.
    assert events == ["startup", "shutdown"]


def test_streaming_over_real_http(make_backend: Callable[[], Backend]) -> None:
    client_has_first = threading.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first;"
        # Not sent until the client has read the first chunk: a buffered body would arrive whole.
        await asyncio.to_thread(client_has_first.wait, 5)
        yield b"second;"

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    backend = make_backend()
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/stream", stream)], lifespan=closing(backend)),
        rules=[Rule("/stream", "5/minute", key=by_user)],
        backend=backend,
        timeout=2.0,
    )
    with serve(app) as base, httpx.Client(base_url=base) as client:
        with client.stream("GET", "/stream", headers={"x-user": "a"}) as response:
            assert response.status_code == 200
            assert state_of(response)["/stream"]["r"] == 4
            pieces = response.iter_raw()
            first = next(pieces)
            client_has_first.set()
            rest = b"".join(pieces)
        assert first == b"first;"
        assert rest == b"second;"


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
def test_websocket_handshake_denied_with_http_429(kind: str, make_backend: Callable[[], Backend]) -> None:
    websockets_sync = pytest.importorskip("websockets.sync.client", reason="the websockets client is not installed")
    from websockets.exceptions import InvalidStatus

    app = build_app(kind, make_backend(), [], rules=[Rule("/ws", "1/minute", key=by_user, name="ws")])
    with serve(app) as base:
        url = base.replace("http://", "ws://") + "/ws"
        with websockets_sync.connect(url, additional_headers={"x-user": "ann"}, open_timeout=5) as ws:
            assert ws.recv(timeout=5) == "hello"
            accepted = ws.response
        with pytest.raises(InvalidStatus) as info:
            websockets_sync.connect(url, additional_headers={"x-user": "ann"}, open_timeout=5)
    assert accepted is not None
    assert accepted.headers["RateLimit"] == '"ws";r=0;t=60'
    denied = info.value.response
    assert denied.status_code == 429
    assert denied.headers["Content-Type"] == "application/problem+json"
    assert denied.headers["Cache-Control"] == "no-store"
    assert int(denied.headers["Retry-After"]) >= 1
    assert b'"status":429' in denied.body


class RecordingRetry(Retry):
    """urllib3's Retry, recording the Retry-After waits it honours."""

    waits: ClassVar[list[float]] = []

    def sleep_for_retry(self, response: Any) -> bool:
        wait = self.get_retry_after(response)
        if wait:
            RecordingRetry.waits.append(wait)
        return super().sleep_for_retry(response)


def test_a_client_honouring_retry_after_gets_through(make_backend: Callable[[], Backend]) -> None:
    """urllib3 with respect_retry_after_header: the retry after the advertised wait passes, nothing earlier does."""
    calls: list[str] = []

    async def endpoint(request: Request) -> PlainTextResponse:
        calls.append(request.url.path)
        return PlainTextResponse("ok")

    backend = make_backend()
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/slow", endpoint)], lifespan=closing(backend)),
        rules=[Rule("/slow", "1 per 2 seconds", key=lambda r: "client")],
        backend=backend,
        timeout=2.0,
    )
    RecordingRetry.waits = []
    with serve(app) as base:
        pool = urllib3.PoolManager()
        try:
            assert pool.request("GET", base + "/slow", retries=False).status == 200
            early = pool.request("GET", base + "/slow", retries=False)
            retry = RecordingRetry(total=3, status_forcelist=[429], respect_retry_after_header=True)
            late = pool.request("GET", base + "/slow", retries=retry)
        finally:
            pool.clear()
    # Sent before Retry-After elapsed: still refused, and told how long to wait.
    assert early.status == 429
    assert 1 <= int(early.headers["Retry-After"]) <= 2
    # The retrying client slept exactly what it was told, once, and then got through.
    assert late.status == 200
    assert len(RecordingRetry.waits) == 1
    assert RecordingRetry.waits[0] in (1, 2)
    assert calls == ["/slow", "/slow"]
