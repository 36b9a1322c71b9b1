"""The FastAPI dependency RateLimit, on real FastAPI apps: in process and through uvicorn, on every backend.

It decides through the app's RateLimitMiddleware, so the same limit given as a Rule and as a dependency
must make the same decisions; the tests below check that request by request, on a clock they move.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import ManualClock, free_port
from fastapi import APIRouter, Depends, FastAPI
from fastapi import Header as HeaderParam
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import Message
from starlette.websockets import WebSocket
from test_middleware import Channel, assert_problem_429, policies_of, state_of, ws_scope
from test_uvicorn import closing, serve

from asgi_ratelimit import (
    Backend,
    Concurrency,
    ConfigurationError,
    Header,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    rate_limit,
)
from asgi_ratelimit.fastapi import RateLimit, RateLimitExceeded

# -- the users a Depends chain resolves ---------------------------------------------------------

# Tests of answers, not of the time budget: a loaded machine must not turn a decision into a fail-open.
TIMEOUT = 2.0


def current_user(authorization: str | None = HeaderParam(default=None)) -> str | None:
    """A toy authentication: ``Authorization: User <name>``; None for an anonymous request."""
    if authorization is None or not authorization.startswith("User "):
        return None
    return authorization.removeprefix("User ")


def current_user_id(user: str | None = Depends(current_user)) -> str | None:
    """The key: the authenticated user, resolved through a second dependency; anonymous requests are not limited."""
    return None if user is None else f"user:{user}"


def tier(user: str | None = Depends(current_user)) -> str:
    """Tiers as a dependency: "pro-*" users get more."""
    return "3/minute" if user is not None and user.startswith("pro-") else "1/minute"


def as_user(name: str) -> dict[str, str]:
    return {"authorization": f"User {name}"}


def by_header(request: HTTPConnection) -> str | None:
    """A key both a Rule and a RateLimit take as it is: FastAPI resolves the annotated connection."""
    return request.headers.get("x-user")


def build_app(backend: Backend, **middleware: Any) -> FastAPI:
    """One FastAPI app with each way to use the dependency; its lifespan closes the backend."""
    app = FastAPI(lifespan=closing(backend))

    @app.get("/me", dependencies=[Depends(RateLimit("2/minute", key=current_user_id))])
    async def me(user: str | None = Depends(current_user)) -> dict[str, str | None]:
        return {"user": user}

    @app.get("/tiered", dependencies=[Depends(RateLimit(tier, key=current_user_id))])
    async def tiered() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/both", dependencies=[Depends(RateLimit("2/minute", key=current_user_id, name="per-user"))])
    async def both() -> dict[str, bool]:
        return {"ok": True}

    router = APIRouter(prefix="/router", dependencies=[Depends(RateLimit("1/minute", key=Header("x-client")))])

    @router.get("/a")
    async def router_a() -> PlainTextResponse:
        return PlainTextResponse("a")

    @router.get("/b")
    async def router_b() -> PlainTextResponse:
        return PlainTextResponse("b")

    app.include_router(router)
    middleware.setdefault("timeout", 2.0)
    middleware.setdefault("registry", CollectorRegistry())
    middleware.setdefault("rules", [Rule("/both", "3/minute", key=Header("x-client"), name="per-client")])
    app.add_middleware(RateLimitMiddleware, backend=backend, **middleware)
    return app


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


def assert_dependency_429(response: httpx.Response) -> None:
    """FastAPI's default answer to RateLimitExceeded: its detail, with Retry-After and the RateLimit headers."""
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json() == {"detail": f"Rate limit exceeded; retry in {response.headers['retry-after']} seconds."}
    assert "ratelimit" in response.headers and "ratelimit-policy" in response.headers


# -- in process, on every backend ------------------------------------------------------------


class TestInProcess:
    async def test_keyed_on_the_user_a_depends_chain_resolved(self, mw_backend: Backend) -> None:
        async with client_for(build_app(mw_backend)) as client:
            ann = [await client.get("/me", headers=as_user("ann")) for _ in range(3)]
            bob = await client.get("/me", headers=as_user("bob"))
            anonymous = [await client.get("/me") for _ in range(4)]
        assert [r.status_code for r in ann] == [200, 200, 429]
        assert ann[0].json() == {"user": "ann"}
        assert policies_of(ann[0]) == {"/me": {"q": 2, "w": 60}}
        assert [state_of(r)["/me"]["r"] for r in ann] == [1, 0, 0]
        assert_dependency_429(ann[2])
        assert bob.status_code == 200  # counted apart from ann
        # The key dependency returned None: not limited, and no RateLimit headers.
        assert [r.status_code for r in anonymous] == [200] * 4
        assert "ratelimit" not in anonymous[0].headers

    async def test_tiers_as_a_dependency(self, mw_backend: Backend) -> None:
        async with client_for(build_app(mw_backend)) as client:
            free = [(await client.get("/tiered", headers=as_user("ann"))).status_code for _ in range(2)]
            pro = [await client.get("/tiered", headers=as_user("pro-bob")) for _ in range(4)]
        assert free == [200, 429]
        assert [r.status_code for r in pro] == [200, 200, 200, 429]
        assert policies_of(pro[0]) == {"/tiered": {"q": 3, "w": 60}}

    async def test_router_level_dependency_counts_each_route_apart(self, mw_backend: Backend) -> None:
        async with client_for(build_app(mw_backend)) as client:
            a = [(await client.get("/router/a", headers={"x-client": "c1"})).status_code for _ in range(2)]
            b = (await client.get("/router/b", headers={"x-client": "c1"})).status_code
            other = (await client.get("/router/a", headers={"x-client": "c2"})).status_code
        assert a == [200, 429]
        assert b == 200  # named after its own route
        assert other == 200

    async def test_app_level_dependency_with_a_name_counts_all_routes_together(self, mw_backend: Backend) -> None:
        app = FastAPI(dependencies=[Depends(RateLimit("2/minute", key=Header("x-client"), name="app"))])

        @app.get("/one")
        async def one() -> str:
            return "one"

        @app.get("/two")
        async def two() -> str:
            return "two"

        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, registry=CollectorRegistry())
        async with client_for(app) as client:
            statuses = [(await client.get(path, headers={"x-client": "c"})).status_code for path in ("/one", "/two")]
            third = await client.get("/one", headers={"x-client": "c"})
        assert statuses == [200, 200]
        assert_dependency_429(third)
        assert policies_of(third) == {"app": {"q": 2, "w": 60}}

    async def test_headers_merge_with_a_middleware_rule_on_the_same_route(self, mw_backend: Backend) -> None:
        registry = CollectorRegistry()
        async with client_for(build_app(mw_backend, registry=registry)) as client:
            headers = {"x-client": "c", **as_user("ann")}
            responses = [await client.get("/both", headers=headers) for _ in range(3)]
            after = await client.get("/both", headers={"x-client": "c", **as_user("bob")})
            fourth = await client.get("/both", headers={"x-client": "c", **as_user("cat")})
        assert [r.status_code for r in responses] == [200, 200, 429]
        for response in responses:
            assert policies_of(response) == {"per-client": {"q": 3, "w": 60}, "per-user": {"q": 2, "w": 60}}
        # GCRA (the default): 2 of 3 per minute spent, full again in 40 s; 2 of 2, in 60 s.
        assert state_of(responses[1]) == {"per-client": {"r": 1, "t": 40}, "per-user": {"r": 0, "t": 60}}
        assert_dependency_429(responses[2])
        # The middleware's rule counted the refused request too (it decided before the endpoint).
        assert state_of(responses[2])["per-client"]["r"] == 0
        assert after.status_code == 429  # the middleware's own 429 now: per-client is spent
        assert_problem_429(fourth)
        # Both rules' decisions are in the middleware's metrics.
        allowed = registry.get_sample_value("asgi_ratelimit_decisions_total", {"rule": "per-user", "result": "allowed"})
        denied = registry.get_sample_value("asgi_ratelimit_decisions_total", {"rule": "per-user", "result": "denied"})
        assert (allowed, denied) == (2, 1)

    async def test_custom_exception_handlers_answer_the_429(self, mw_backend: Backend) -> None:
        app = build_app(mw_backend)

        @app.exception_handler(RateLimitExceeded)
        async def slow_down(request: Request, exc: RateLimitExceeded) -> JSONResponse:
            remaining = [decision.remaining for decision in exc.decisions]
            return JSONResponse(
                {"error": "slow down", "retry": exc.retry_after, "remaining": remaining}, 429, headers=exc.headers
            )

        async with client_for(app) as client:
            responses = [await client.get("/me", headers=as_user("ann")) for _ in range(3)]
        denied = responses[2]
        assert denied.status_code == 429
        assert denied.json() == {"error": "slow down", "retry": int(denied.headers["retry-after"]), "remaining": [0]}
        assert state_of(denied) == {"/me": {"r": 0, "t": int(denied.headers["retry-after"])}}

    async def test_a_status_handler_for_429_answers_it_too(self, mw_backend: Backend) -> None:
        app = build_app(mw_backend)

        @app.exception_handler(429)
        async def too_many(request: Request, exc: Exception) -> PlainTextResponse:
            return PlainTextResponse("too many", status_code=429)  # without the exception's headers

        async with client_for(app) as client:
            responses = [await client.get("/me", headers=as_user("ann")) for _ in range(3)]
        assert responses[2].text == "too many"
        # The headers reach the response all the same: the middleware adds what the handler left out.
        assert int(responses[2].headers["retry-after"]) >= 1
        assert state_of(responses[2])["/me"]["r"] == 0

    async def test_quota_unit_and_partition_key_as_a_rules(self, mw_backend: Backend) -> None:
        secret = "a-partition-secret-of-32-bytes!!"
        app = FastAPI()

        @app.get("/", dependencies=[Depends(RateLimit("5/minute", key=by_header, partition_key=secret))])
        async def root() -> str:
            return "ok"

        rule = Rule("/", "5/minute", key=by_header, partition_key=secret)
        other = FastAPI()

        @other.get("/")
        async def other_root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, registry=CollectorRegistry())
        other.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), rules=[rule], registry=CollectorRegistry())
        async with client_for(app) as client, client_for(other) as by_rule:
            got = await client.get("/", headers={"x-user": "a"})
            expected = await by_rule.get("/", headers={"x-user": "a"})
        assert ";pk=:" in got.headers["ratelimit-policy"]
        assert got.headers["ratelimit-policy"] == expected.headers["ratelimit-policy"]
        with pytest.raises(ConfigurationError, match="quota_unit"):
            RateLimit("5/minute", quota_unit="bananas")

    async def test_the_middlewares_exempt_paths_exempt_the_dependency(self, mw_backend: Backend) -> None:
        app = FastAPI(dependencies=[Depends(RateLimit("1/minute", key=by_header, name="app"))])

        @app.get("/health")
        async def health() -> str:
            return "ok"

        @app.get("/work")
        async def work() -> str:
            return "ok"

        app.add_middleware(
            RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, exempt=["/health"], registry=CollectorRegistry()
        )
        async with client_for(app) as client:
            health_statuses = [(await client.get("/health", headers={"x-user": "a"})).status_code for _ in range(3)]
            work_statuses = [(await client.get("/work", headers={"x-user": "a"})).status_code for _ in range(2)]
        assert health_statuses == [200, 200, 200]
        assert work_statuses == [200, 429]

    async def test_dependency_overrides_turn_a_limit_off(self, mw_backend: Backend) -> None:
        limit = RateLimit("1/minute", key=by_header)
        app = FastAPI()

        @app.get("/", dependencies=[Depends(limit)])
        async def root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, registry=CollectorRegistry())
        async with client_for(app) as client:
            assert [(await client.get("/", headers={"x-user": "a"})).status_code for _ in range(2)] == [200, 429]
            app.dependency_overrides[limit] = lambda: None
            assert (await client.get("/", headers={"x-user": "a"})).status_code == 200


class TestBackendFailure:
    @pytest.mark.parametrize("fail_open", [True, False])
    async def test_fail_open_and_closed_as_the_middleware(self, fail_open: bool) -> None:
        # A real Redis client on a port nothing listens on: every decision fails.
        backend = RedisBackend(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), prefix="dead:")
        app = build_app(backend, fail_open=fail_open, timeout=0.5, rules=[])
        async with client_for(app) as client:
            response = await client.get("/me", headers=as_user("ann"))
        await backend.aclose()
        if fail_open:
            assert response.status_code == 200
            assert "ratelimit" not in response.headers
        else:
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "fail closed" in response.json()["detail"]

    async def test_the_dependencys_fail_open_overrides_the_middlewares(self) -> None:
        backend = RedisBackend(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), prefix="dead:")
        app = FastAPI(dependencies=[Depends(RateLimit("1/minute", name="closed", fail_open=False))])

        @app.get("/")
        async def root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=backend, fail_open=True, registry=CollectorRegistry())
        async with client_for(app) as client:
            assert (await client.get("/")).status_code == 503
        await backend.aclose()


class TestWebsocket:
    async def test_a_refused_handshake_is_closed_with_1008(self, mw_backend: Backend) -> None:
        app = FastAPI()

        @app.websocket("/ws", dependencies=[Depends(RateLimit("1/minute", key=by_header))])
        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_text("hello")
            await websocket.close()

        app.add_middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT, registry=CollectorRegistry())

        async def handshake(user: str) -> list[Message]:
            channel = Channel({"type": "websocket.connect"})
            await asyncio.wait_for(app(ws_scope("/ws", {"x-user": user}, {}), channel.receive, channel.send), 5)
            return channel.sent

        first = await handshake("ann")
        assert [m["type"] for m in first] == ["websocket.accept", "websocket.send", "websocket.close"]
        refused = await handshake("ann")
        assert [(m["type"], m.get("code"), m.get("reason")) for m in refused] == [
            ("websocket.close", 1008, "Too Many Requests")
        ]
        assert (await handshake("bob"))[0]["type"] == "websocket.accept"

    @pytest.mark.parametrize("extensions", [{}, {"websocket.http.response": {}}])
    async def test_a_handshake_failing_closed_is_closed_with_1013(self, extensions: dict[str, Any]) -> None:
        backend = RedisBackend(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), prefix="dead:")
        app = FastAPI()

        @app.websocket("/ws", dependencies=[Depends(RateLimit("1/minute", key=by_header, fail_open=False))])
        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()

        app.add_middleware(RateLimitMiddleware, backend=backend, timeout=0.5, registry=CollectorRegistry())
        channel = Channel({"type": "websocket.connect"})
        await asyncio.wait_for(app(ws_scope("/ws", {"x-user": "a"}, extensions), channel.receive, channel.send), 5)
        await backend.aclose()
        assert [(m["type"], m.get("code")) for m in channel.sent] == [("websocket.close", 1013)]


class TestConfiguration:
    async def test_without_the_middleware_the_first_request_says_so(self) -> None:
        app = FastAPI()

        @app.get("/", dependencies=[Depends(RateLimit("1/minute"))])
        async def root() -> str:
            return "ok"

        async with client_for(app) as client:
            with pytest.raises(
                ConfigurationError, match=r"no RateLimitMiddleware handles this request.*add_middleware"
            ):
                await client.get("/")

    def test_bad_limits_fail_at_construction(self) -> None:
        with pytest.raises(ConfigurationError, match=r"^RateLimit\('10/fortnight'\): Invalid limit '10/fortnight'"):
            RateLimit("10/fortnight")
        with pytest.raises(ConfigurationError, match=r"^RateLimit 'api': cost must be"):
            RateLimit("1/second", cost=0, name="api")
        with pytest.raises(ConfigurationError, match="fail_open"):
            RateLimit("1/second", fail_open="no")  # type: ignore[arg-type]

    def test_an_unannotated_request_parameter_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match="annotate it `request: Request`"):
            RateLimit("1/second", key=lambda request: request.headers.get("x"))

    async def test_a_key_that_is_not_a_string_is_a_configuration_error(self) -> None:
        app = FastAPI()

        @app.get("/", dependencies=[Depends(RateLimit("1/minute", key=lambda: 42))])
        async def root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), registry=CollectorRegistry())
        async with client_for(app) as client:
            with pytest.raises(ConfigurationError, match="returned 'int'; it must return a string") as info:
                await client.get("/")
            assert "42" not in str(info.value)  # a client's key never reaches the logs

    def test_a_concurrency_limit_is_refused(self) -> None:
        with pytest.raises(ConfigurationError, match="a Concurrency limit cannot be a dependency's"):
            RateLimit(["1/second", Concurrency(2, timeout=30)])

    async def test_a_concurrency_limit_from_a_limits_dependency_is_refused(self) -> None:
        app = FastAPI()

        @app.get("/", dependencies=[Depends(RateLimit(lambda: Concurrency(2, timeout=30), name="slots"))])
        async def root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), registry=CollectorRegistry())
        async with client_for(app) as client:
            with pytest.raises(ConfigurationError, match=r"the limits dependency .*<lambda>: a Concurrency limit"):
                await client.get("/")

    async def test_two_unnamed_limits_on_one_route_are_refused(self) -> None:
        app = FastAPI(dependencies=[Depends(RateLimit("100/minute"))])

        @app.get("/x", dependencies=[Depends(RateLimit("5/minute"))])
        async def x() -> str:
            return "ok"

        @app.get("/y")
        async def y() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), registry=CollectorRegistry())
        async with client_for(app) as client:
            assert (await client.get("/y")).status_code == 200  # one unnamed limit there
            with pytest.raises(ConfigurationError, match=r"both limit the route '/x' without a name=") as info:
                await client.get("/x")
            assert "RateLimit('100/minute')" in str(info.value) and "RateLimit('5/minute')" in str(info.value)

    async def test_a_misplaced_rate_limit_is_still_reported_on_a_route_with_a_dependency(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        app = FastAPI()

        @rate_limit("1/minute", name="misplaced")
        @app.get("/", dependencies=[Depends(RateLimit("5/minute", name="dep"))])
        async def root() -> str:
            return "ok"

        app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), registry=CollectorRegistry())
        async with client_for(app) as client:
            assert (await client.get("/")).status_code == 200
        assert "misplaced is applied above the route decorator" in caplog.text

    async def test_a_name_shared_with_a_middleware_rule_is_refused(self) -> None:
        app = FastAPI()

        @app.get("/x", dependencies=[Depends(RateLimit("1/minute"))])
        async def x() -> str:
            return "ok"

        app.add_middleware(
            RateLimitMiddleware, backend=MemoryBackend(), rules=[Rule("/x", "5/minute")], registry=CollectorRegistry()
        )
        async with client_for(app) as client:
            with pytest.raises(ConfigurationError, match="a middleware Rule is named '/x' too"):
                await client.get("/x")


# -- the same limit as a Rule and as a dependency ------------------------------------------------

ALGORITHMS = ["sliding_window", "fixed_window", "token_bucket", "gcra", "sliding_window_counter"]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend_pair(
    request: pytest.FixtureRequest, key_prefix: str, clock: ManualClock
) -> AsyncIterator[tuple[Backend, Backend]]:
    """Two backends on the same clock with their own counts: one for the Rule's app, one for the dependency's."""
    if request.param == "memory":
        yield MemoryBackend(prefix=key_prefix + "rule:", clock=clock), MemoryBackend(prefix=key_prefix, clock=clock)
        return
    url = request.getfixturevalue("redis_url")
    pair = (
        RedisBackend(Redis.from_url(url), prefix=key_prefix + "rule:", clock=clock),
        RedisBackend(Redis.from_url(url), prefix=key_prefix + "dep:", clock=clock),
    )
    yield pair
    for backend in pair:
        await backend.aclose()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_a_rule_and_a_dependency_decide_alike(
    algorithm: str, backend_pair: tuple[Backend, Backend], clock: ManualClock
) -> None:
    rule_app = FastAPI()
    dependency_app = FastAPI()

    @rule_app.get("/x")
    async def by_rule() -> str:
        return "ok"

    @dependency_app.get("/x", dependencies=[Depends(RateLimit("3 per 10 seconds", key=by_header, algorithm=algorithm))])
    async def by_dependency() -> str:
        return "ok"

    rule = Rule("/x", "3 per 10 seconds", key=by_header, algorithm=algorithm)
    rule_app.add_middleware(RateLimitMiddleware, backend=backend_pair[0], rules=[rule], registry=CollectorRegistry())
    dependency_app.add_middleware(RateLimitMiddleware, backend=backend_pair[1], registry=CollectorRegistry())
    steps = random.Random(f"alike-{algorithm}")
    seen = set()
    async with client_for(rule_app) as by_rules, client_for(dependency_app) as by_dependencies:
        for _ in range(60):
            clock.advance(steps.choice([0, 0, 0.5, 1.5, 4]))
            headers = {"x-user": steps.choice(["ann", "bob"])}
            expected = await by_rules.get("/x", headers=headers)
            got = await by_dependencies.get("/x", headers=headers)
            assert got.status_code == expected.status_code
            seen.add(got.status_code)
            for name in ("ratelimit", "ratelimit-policy", "retry-after"):
                assert got.headers.get(name) == expected.headers.get(name), name
    assert seen == {200, 429}  # the sequence reached the limit and came back under it


@settings(max_examples=40, deadline=None)
@given(
    algorithm=st.sampled_from(ALGORITHMS),
    limits=st.sampled_from(["3 per 10 seconds", "2/second;5/minute", "1/second", "4 per 3 seconds, 6/minute"]),
    cost=st.integers(1, 2),
    steps=st.lists(
        st.tuples(st.sampled_from([0, 0, 0.2, 1, 3, 11]), st.sampled_from(["ann", "bob", None])), max_size=30
    ),
)
def test_a_rule_and_a_dependency_decide_alike_whatever_the_traffic(
    algorithm: str, limits: str, cost: int, steps: list[tuple[float, str | None]]
) -> None:
    """Memory only (many examples); test_a_rule_and_a_dependency_decide_alike covers Redis."""
    clock = ManualClock()
    rule_app, dependency_app = FastAPI(), FastAPI()

    @rule_app.get("/x")
    async def by_rule() -> str:
        return "ok"

    limit = RateLimit(limits, key=by_header, algorithm=algorithm, cost=cost, name="x")

    @dependency_app.get("/x", dependencies=[Depends(limit)])
    async def by_dependency() -> str:
        return "ok"

    rule = Rule("/x", limits, key=by_header, algorithm=algorithm, cost=cost, name="x")
    for app, rules in ((rule_app, [rule]), (dependency_app, [])):
        backend = MemoryBackend(clock=clock)
        app.add_middleware(RateLimitMiddleware, backend=backend, rules=rules, registry=CollectorRegistry())

    async def run() -> None:
        async with client_for(rule_app) as by_rules, client_for(dependency_app) as by_dependencies:
            for advance, user in steps:
                clock.advance(advance)
                headers = {} if user is None else {"x-user": user}
                expected = await by_rules.get("/x", headers=headers)
                got = await by_dependencies.get("/x", headers=headers)
                assert got.status_code == expected.status_code
                for name in ("ratelimit", "ratelimit-policy", "retry-after"):
                    assert got.headers.get(name) == expected.headers.get(name), name

    asyncio.run(run())


# -- through uvicorn -------------------------------------------------------------------------


def test_over_real_http(make_backend: Callable[[], Backend]) -> None:
    app = build_app(make_backend())

    @app.exception_handler(RateLimitExceeded)
    async def slow_down(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        return JSONResponse({"error": "slow down"}, 429, headers=exc.headers)

    with serve(app) as base, httpx.Client(base_url=base) as client:
        ann = [client.get("/me", headers=as_user("ann")) for _ in range(3)]
        bob = client.get("/me", headers=as_user("bob"))
        anonymous = [client.get("/me") for _ in range(3)]
        pro = [client.get("/tiered", headers=as_user("pro-cat")).status_code for _ in range(4)]
        router = [
            client.get(path, headers={"x-client": "c"}).status_code for path in ("/router/a", "/router/a", "/router/b")
        ]
        both = [client.get("/both", headers={"x-client": "c", **as_user("dan")}) for _ in range(3)]
    assert [r.status_code for r in ann] == [200, 200, 429]
    assert ann[2].json() == {"error": "slow down"}
    assert int(ann[2].headers["retry-after"]) >= 1
    assert state_of(ann[2]) == {"/me": {"r": 0, "t": int(ann[2].headers["retry-after"])}}
    assert bob.status_code == 200
    assert [r.status_code for r in anonymous] == [200, 200, 200]
    assert pro == [200, 200, 200, 429]
    assert router == [200, 429, 200]
    assert [r.status_code for r in both] == [200, 200, 429]
    assert set(policies_of(both[0])) == {"per-client", "per-user"}
    assert set(state_of(both[2])) == {"per-client", "per-user"}


def test_app_level_dependency_over_real_http(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()
    app = FastAPI(
        lifespan=closing(backend), dependencies=[Depends(RateLimit("2/minute", key=Header("x-client"), name="app"))]
    )

    @app.get("/one")
    async def one() -> str:
        return "one"

    @app.get("/two")
    async def two() -> str:
        return "two"

    app.add_middleware(RateLimitMiddleware, backend=backend, timeout=2.0, registry=CollectorRegistry())
    with serve(app) as base, httpx.Client(base_url=base) as client:
        responses = [client.get(path, headers={"x-client": "c"}) for path in ("/one", "/two", "/one")]
        other = client.get("/two", headers={"x-client": "d"})
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert_dependency_429(responses[2])  # FastAPI's default handler, with the headers
    assert policies_of(responses[2]) == {"app": {"q": 2, "w": 60}}
    assert other.status_code == 200


@pytest.mark.parametrize("fail_open", [True, False])
def test_backend_failure_over_real_http(fail_open: bool) -> None:
    backend = RedisBackend(Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), prefix="dead:")
    app = build_app(backend, fail_open=fail_open, timeout=0.5, rules=[])
    with serve(app) as base, httpx.Client(base_url=base) as client:
        response = client.get("/me", headers=as_user("ann"))
    assert response.status_code == (200 if fail_open else 503)


def test_only_the_fastapi_module_imports_fastapi() -> None:
    """FastAPI is an optional extra: every other module imports without it."""
    script = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['fastapi'] = None\n"  # any import of fastapi now fails
        "import asgi_ratelimit\n"
        "for info in pkgutil.walk_packages(asgi_ratelimit.__path__, 'asgi_ratelimit.'):\n"
        "    if info.name != 'asgi_ratelimit.fastapi':\n"
        "        importlib.import_module(info.name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "ok", done.stderr
