"""RateLimitMiddleware in process: rules, decisions, responses and ASGI behaviour, on every backend.

Requests go through httpx.ASGITransport to a Starlette and a FastAPI app; what ASGITransport
cannot show (streaming, lifespan, websockets) is checked by driving the ASGI protocol by hand.
The same behaviour over a real server is in test_uvicorn.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import http_sfv
import httpx
import pytest
from conftest import ManualClock, RedisProcess
from fastapi import FastAPI
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Message
from starlette.websockets import WebSocket

from asgi_ratelimit import (
    Backend,
    BackendError,
    ClientIP,
    ConfigurationError,
    Decision,
    FirstOf,
    Header,
    JWTClaim,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    rate_limit,
)
from asgi_ratelimit.backends.base import Hit
from asgi_ratelimit.policies import Policy

# A generous budget: a loaded test machine must not turn a slow Redis answer into a fail-open pass.
TIMEOUT = 2.0


def by_user(request: HTTPConnection) -> str | None:
    """The key used throughout: the X-User header, or no key (the rule does not apply)."""
    return request.headers.get("x-user")


# -- helpers -------------------------------------------------------------------------------


def sf_list(value: str) -> list[tuple[str, dict[str, int]]]:
    """Parse a header as an RFC 9651 List with an independent parser; every item a String with integer params."""
    parsed = http_sfv.List()
    parsed.parse(value.encode("ascii"))
    items = []
    for member in parsed:
        assert isinstance(member, http_sfv.Item), f"{value!r}: inner lists are not allowed"
        assert isinstance(member.value, str) and not isinstance(member.value, http_sfv.Token), (
            f"{value!r}: the item must be a String, got {member.value!r}"
        )
        params = dict(member.params)
        for param, number in params.items():
            assert type(number) is int, f"{value!r}: parameter {param} must be an Integer, got {number!r}"
        items.append((member.value, params))
    return items


def policies_of(response: httpx.Response) -> dict[str, dict[str, int]]:
    """RateLimit-Policy as {name: {"q": .., "w": ..}}, checked for the required parameters."""
    items = dict(sf_list(response.headers["ratelimit-policy"]))
    for name, params in items.items():
        assert set(params) == {"q", "w"}, (name, params)
        assert params["q"] >= 1 and params["w"] >= 1, (name, params)
    return items


def state_of(response: httpx.Response) -> dict[str, dict[str, int]]:
    """RateLimit as {name: {"r": .., "t": ..}}, checked for the required parameters."""
    items = dict(sf_list(response.headers["ratelimit"]))
    for name, params in items.items():
        assert set(params) == {"r", "t"}, (name, params)
        assert params["r"] >= 0 and params["t"] >= 0, (name, params)
    return items


def assert_problem_429(response: httpx.Response) -> dict[str, Any]:
    """The default denial: 429, Retry-After in whole seconds >= 1, not cacheable, a problem+json body."""
    assert response.status_code == 429, response.text
    assert re.fullmatch(r"[1-9][0-9]*", response.headers["retry-after"]), response.headers["retry-after"]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["title"] == "Quota Exceeded"
    assert body["status"] == 429
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["retry_after"] == int(response.headers["retry-after"])
    return body


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


class CountingBackend:
    """Wraps a backend and records every call that reaches it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[list[Hit]] = []

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        self.calls.append([(key, policy, cost) for policy in policies])
        result: list[Decision] = await self.inner.hit(key, policies, cost)
        return result

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        self.calls.append(list(hits))
        result: list[Decision] = await self.inner.hit_many(hits)
        return result

    async def ping(self) -> None:
        await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


class BrokenBackend:
    """A backend whose every decision fails."""

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        raise BackendError("down")

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        raise BackendError("down")

    async def ping(self) -> None:
        raise BackendError("down")

    async def aclose(self) -> None:
        pass


# -- the apps ----------------------------------------------------------------------------------

APP_KINDS = ["starlette", "fastapi"]


def build_app(kind: str, **middleware: Any) -> Starlette:
    """The same routes as a Starlette app or a FastAPI app, with RateLimitMiddleware added the usual way."""
    middleware.setdefault("timeout", TIMEOUT)
    if kind == "starlette":

        async def user(request: Request) -> JSONResponse:
            return JSONResponse({"id": request.path_params["id"], "method": request.method})

        async def marked(request: Request) -> PlainTextResponse:
            return PlainTextResponse("marked")

        async def other(request: Request) -> PlainTextResponse:
            return PlainTextResponse("other")

        marked = rate_limit("2/minute", key=by_user, name="marked")(marked)
        return Starlette(
            routes=[
                Route("/users/{id}", user, methods=["GET", "POST"]),
                Route("/marked/{id}", marked),
                Route("/other", other),
                Route("/health", other),
            ],
            middleware=[Middleware(RateLimitMiddleware, **middleware)],
        )
    api = FastAPI()

    @api.api_route("/users/{id}", methods=["GET", "POST"])
    async def fastapi_user(id: str, request: Request) -> dict[str, str]:
        return {"id": id, "method": request.method}

    @api.get("/marked/{id}")
    @rate_limit("2/minute", key=by_user, name="marked")
    async def fastapi_marked(id: str) -> PlainTextResponse:
        return PlainTextResponse("marked")

    @api.get("/other")
    async def fastapi_other() -> PlainTextResponse:
        return PlainTextResponse("other")

    @api.get("/health")
    async def fastapi_health() -> PlainTextResponse:
        return PlainTextResponse("other")

    api.add_middleware(RateLimitMiddleware, **middleware)
    return api


@pytest.fixture(params=APP_KINDS)
def app_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


# -- allowed and denied ------------------------------------------------------------------------


class TestDecisions:
    async def test_allowed_requests_carry_ietf_headers(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(app_kind, rules=[Rule("/users/{id}", "3/minute", key=by_user)], backend=mw_backend)
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "ann"}) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        for left, response in zip([2, 1, 0], responses, strict=True):
            assert policies_of(response) == {"/users/{id}": {"q": 3, "w": 60}}
            state = state_of(response)
            assert state["/users/{id}"]["r"] == left
            assert 1 <= state["/users/{id}"]["t"] <= 60
            assert "retry-after" not in response.headers

    async def test_denied_request_is_a_problem_429(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(
            app_kind, rules=[Rule("/users/{id}", "1/minute", key=by_user, name="users")], backend=mw_backend
        )
        async with client_for(app) as client:
            assert (await client.get("/users/1", headers={"x-user": "ann"})).status_code == 200
            denied = await client.get("/users/1", headers={"x-user": "ann"})
        body = assert_problem_429(denied)
        assert body["violated-policies"] == ["users"]
        assert policies_of(denied) == {"users": {"q": 1, "w": 60}}
        state = state_of(denied)
        assert state["users"]["r"] == 0
        assert 1 <= state["users"]["t"] <= int(denied.headers["retry-after"]) <= 60

    async def test_counters_belong_to_the_rule_and_key_not_the_url(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(app_kind, rules=[Rule("/users/{id}", "2/minute", key=by_user)], backend=mw_backend)
        async with client_for(app) as client:
            first = await client.get("/users/1", headers={"x-user": "ann"})
            second = await client.get("/users/2", headers={"x-user": "ann"})
            third = await client.get("/users/3", headers={"x-user": "ann"})
            other_key = await client.get("/users/3", headers={"x-user": "bob"})
        assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
        assert other_key.status_code == 200
        assert state_of(other_key)["/users/{id}"]["r"] == 1

    async def test_unmatched_paths_and_methods_pass_without_headers(self, app_kind: str, mw_backend: Backend) -> None:
        rules = [Rule("/users/{id}", "1/minute", key=by_user, methods=["POST"])]
        app = build_app(app_kind, rules=rules, backend=mw_backend)
        async with client_for(app) as client:
            gets = [await client.get("/users/1", headers={"x-user": "ann"}) for _ in range(3)]
            other = await client.get("/other", headers={"x-user": "ann"})
            posts = [await client.post("/users/1", headers={"x-user": "ann"}) for _ in range(2)]
        for response in [*gets, other]:
            assert response.status_code == 200
            assert "ratelimit" not in response.headers
        assert [r.status_code for r in posts] == [200, 429]

    async def test_a_key_of_none_means_the_rule_does_not_apply(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(app_kind, rules=[Rule("/users/{id}", "1/minute", key=by_user)], backend=mw_backend)
        async with client_for(app) as client:
            responses = [await client.get("/users/1") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert all("ratelimit" not in r.headers for r in responses)

    async def test_async_key_extractor(self, mw_backend: Backend) -> None:
        async def async_key(request: HTTPConnection) -> str | None:
            await asyncio.sleep(0)
            return request.headers.get("x-user")

        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=async_key)], backend=mw_backend)
        async with client_for(app) as client:
            statuses = [(await client.get("/users/1", headers={"x-user": "ann"})).status_code for _ in range(2)]
            anonymous = await client.get("/users/1")
        assert statuses == [200, 429]
        assert anonymous.status_code == 200

    async def test_rules_match_the_path_under_the_root_path(self, mw_backend: Backend) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=by_user)], backend=mw_backend)
        transport = httpx.ASGITransport(app=app, root_path="/api")
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            first = await client.get("/api/users/1", headers={"x-user": "a"})
            second = await client.get("/api/users/2", headers={"x-user": "a"})
        assert first.json()["id"] == "1"
        assert [first.status_code, second.status_code] == [200, 429]

    async def test_regex_rule(self, mw_backend: Backend) -> None:
        rule = Rule(re.compile(r"^/users/[0-9]+$"), "1/minute", key=by_user, name="numeric users")
        app = build_app("starlette", rules=[rule], backend=mw_backend)
        async with client_for(app) as client:
            first = await client.get("/users/1", headers={"x-user": "ann"})
            second = await client.get("/users/2", headers={"x-user": "ann"})
            word = await client.get("/users/me", headers={"x-user": "ann"})
        assert [first.status_code, second.status_code, word.status_code] == [200, 429, 200]
        assert "numeric users" in policies_of(first)

    async def test_the_problem_detail_for_a_cost_above_capacity(self, mw_backend: Backend) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "2/minute", key=by_user, cost=5)], backend=mw_backend)
        async with client_for(app) as client:
            denied = await client.get("/users/1", headers={"x-user": "ann"})
        body = assert_problem_429(denied)
        assert "never" in body["detail"]
        # A finite, very long wait: "do not retry", and still a valid header.
        assert int(denied.headers["retry-after"]) >= 86_400


class TestSeveralLimits:
    async def test_every_matching_rule_applies_and_all_must_allow(self, app_kind: str, mw_backend: Backend) -> None:
        rules = [
            Rule("/users/{id}", "3/minute", key=by_user, name="per-user"),
            Rule("/{path:path}", "100/minute", key=lambda r: "everyone", name="global"),
        ]
        app = build_app(app_kind, rules=rules, backend=mw_backend)
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "ann"}) for _ in range(4)]
            other = await client.get("/other")
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert set(policies_of(responses[0])) == {"per-user", "global"}
        assert assert_problem_429(responses[3])["violated-policies"] == ["per-user"]
        # The denied request took nothing from the rule that allowed it: all of a hit, or none.
        assert state_of(responses[3])["global"]["r"] == 97
        assert state_of(other)["global"]["r"] == 96
        assert set(policies_of(other)) == {"global"}

    async def test_a_list_of_limits_on_one_rule(self, mw_clocked_backend: Backend, clock: ManualClock) -> None:
        rule = Rule(
            "/users/{id}", ["2 per 10 seconds", "3/minute"], key=by_user, name="users", algorithm="sliding_window"
        )
        app = build_app("starlette", rules=[rule], backend=mw_clocked_backend)
        async with client_for(app) as client:
            ok = [await client.get("/users/1", headers={"x-user": "ann"}) for _ in range(2)]
            burst = await client.get("/users/1", headers={"x-user": "ann"})
            clock.advance(10)
            third = await client.get("/users/1", headers={"x-user": "ann"})
            clock.advance(10)
            fourth = await client.get("/users/1", headers={"x-user": "ann"})
        assert [r.status_code for r in ok] == [200, 200]
        assert policies_of(ok[0]) == {"users:10s": {"q": 2, "w": 10}, "users:60s": {"q": 3, "w": 60}}
        assert assert_problem_429(burst)["violated-policies"] == ["users:10s"]
        assert int(burst.headers["retry-after"]) == 10
        assert state_of(burst)["users:10s"] == {"r": 0, "t": 10}
        assert third.status_code == 200
        assert assert_problem_429(fourth)["violated-policies"] == ["users:60s"]
        retry_after = int(fourth.headers["retry-after"])
        assert retry_after == state_of(fourth)["users:60s"]["t"] == 40

    async def test_retry_after_is_the_longest_wait_among_denying_limits(
        self, mw_clocked_backend: Backend, clock: ManualClock
    ) -> None:
        rules = [
            Rule("/users/{id}", "1 per 10 seconds", key=by_user, name="short"),
            Rule("/users/{id}", "1/minute", key=by_user, name="long"),
        ]
        app = build_app("starlette", rules=rules, backend=mw_clocked_backend)
        async with client_for(app) as client:
            await client.get("/users/1", headers={"x-user": "ann"})
            clock.advance(0.5)
            denied = await client.get("/users/1", headers={"x-user": "ann"})
        assert sorted(assert_problem_429(denied)["violated-policies"]) == ["long", "short"]
        state = state_of(denied)
        assert state["short"]["t"] == 10  # 9.5 s, rounded up
        assert state["long"]["t"] == 60  # 59.5 s, rounded up
        assert int(denied.headers["retry-after"]) == 60

    async def test_fractional_waits_round_up(self, mw_clocked_backend: Backend, clock: ManualClock) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/second", key=by_user)], backend=mw_clocked_backend)
        async with client_for(app) as client:
            await client.get("/users/1", headers={"x-user": "ann"})
            clock.advance(0.999)
            denied = await client.get("/users/1", headers={"x-user": "ann"})
            clock.advance(0.001)
            allowed = await client.get("/users/1", headers={"x-user": "ann"})
        # 1 ms left: still a whole second, never 0.
        assert denied.headers["retry-after"] == "1"
        assert state_of(denied)["/users/{id}"]["t"] == 1
        assert allowed.status_code == 200

    async def test_tiers_from_a_callable(self, app_kind: str, mw_backend: Backend) -> None:
        def tiers(request: HTTPConnection) -> str | list[str]:
            return ["5/minute", "50/hour"] if request.headers.get("x-plan") == "pro" else "1/minute"

        app = build_app(app_kind, rules=[Rule("/users/{id}", tiers, key=by_user, name="api")], backend=mw_backend)
        async with client_for(app) as client:
            free = [await client.get("/users/1", headers={"x-user": "free"}) for _ in range(2)]
            pro = [await client.get("/users/1", headers={"x-user": "pro", "x-plan": "pro"}) for _ in range(6)]
        assert [r.status_code for r in free] == [200, 429]
        assert policies_of(free[0]) == {"api": {"q": 1, "w": 60}}
        assert [r.status_code for r in pro] == [200] * 5 + [429]
        assert policies_of(pro[0]) == {"api:60s": {"q": 5, "w": 60}, "api:3600s": {"q": 50, "w": 3600}}

    async def test_cost(self, app_kind: str, mw_backend: Backend) -> None:
        def cost(request: HTTPConnection) -> int:
            return 3 if request.scope["method"] == "POST" else 1

        rules = [Rule("/users/{id}", "5/minute", key=by_user, cost=cost, name="c")]
        app = build_app(app_kind, rules=rules, backend=mw_backend)
        async with client_for(app) as client:
            post = await client.post("/users/1", headers={"x-user": "ann"})
            get = await client.get("/users/1", headers={"x-user": "ann"})
            too_costly = await client.post("/users/1", headers={"x-user": "ann"})
            get_again = await client.get("/users/1", headers={"x-user": "ann"})
        assert state_of(post)["c"]["r"] == 2
        assert state_of(get)["c"]["r"] == 1
        assert too_costly.status_code == 429
        assert get_again.status_code == 200
        assert state_of(get_again)["c"]["r"] == 0

    async def test_fixed_cost(self, mw_backend: Backend) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "4/minute", key=by_user, cost=2)], backend=mw_backend)
        async with client_for(app) as client:
            statuses = [(await client.get("/users/1", headers={"x-user": "ann"})).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]


# -- @rate_limit on endpoints --------------------------------------------------------------------


class TestRateLimitDecorator:
    async def test_marked_endpoint_is_limited_across_its_paths(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(app_kind, backend=mw_backend)
        async with client_for(app) as client:
            responses = [await client.get(f"/marked/{i}", headers={"x-user": "ann"}) for i in range(3)]
            bob = await client.get("/marked/9", headers={"x-user": "bob"})
            unmarked = await client.get("/other", headers={"x-user": "ann"})
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert policies_of(responses[0]) == {"marked": {"q": 2, "w": 60}}
        assert_problem_429(responses[2])
        assert bob.status_code == 200
        assert "ratelimit" not in unmarked.headers

    async def test_marked_endpoint_inside_a_mount(self, mw_backend: Backend) -> None:
        @rate_limit("1/minute", key=by_user, name="items")
        async def items(request: Request) -> PlainTextResponse:
            return PlainTextResponse("items")

        app = Starlette(
            routes=[Mount("/api", routes=[Route("/items/{id}", items)])],
            middleware=[Middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)],
        )
        async with client_for(app) as client:
            first = await client.get("/api/items/1", headers={"x-user": "ann"})
            second = await client.get("/api/items/2", headers={"x-user": "ann"})
        assert [first.status_code, second.status_code] == [200, 429]
        assert "items" in policies_of(first)

    async def test_marked_route_honours_its_methods(self, mw_backend: Backend) -> None:
        @rate_limit("1/minute", key=by_user)
        async def create(request: Request) -> PlainTextResponse:
            return PlainTextResponse("created")

        async def read(request: Request) -> PlainTextResponse:
            return PlainTextResponse("read")

        app = Starlette(
            routes=[Route("/things", create, methods=["POST"]), Route("/things", read, methods=["GET"])],
            middleware=[Middleware(RateLimitMiddleware, backend=mw_backend, timeout=TIMEOUT)],
        )
        async with client_for(app) as client:
            posts = [(await client.post("/things", headers={"x-user": "a"})).status_code for _ in range(2)]
            gets = [(await client.get("/things", headers={"x-user": "a"})).status_code for _ in range(2)]
        assert posts == [200, 429]
        assert gets == [200, 200]

    async def test_middleware_wrapped_around_the_app_finds_marked_routes(self, mw_backend: Backend) -> None:
        # Wrapping the app directly (as when handing RateLimitMiddleware(app) to a server)
        # gives no scope["app"]: the middleware must look at the app it wraps.
        @rate_limit("1/minute", key=by_user)
        async def marked(request: Request) -> PlainTextResponse:
            return PlainTextResponse("marked")

        inner = Starlette(routes=[Route("/marked", marked)])
        app = RateLimitMiddleware(inner, backend=mw_backend, timeout=TIMEOUT)
        async with client_for(app) as client:
            statuses = [(await client.get("/marked", headers={"x-user": "a"})).status_code for _ in range(2)]
        assert statuses == [200, 429]

    async def test_marked_rules_combine_with_explicit_rules(self, mw_backend: Backend) -> None:
        app = build_app(
            "starlette", rules=[Rule("/{p:path}", "100/minute", key=by_user, name="all")], backend=mw_backend
        )
        async with client_for(app) as client:
            response = await client.get("/marked/1", headers={"x-user": "ann"})
        assert set(policies_of(response)) == {"all", "marked"}

    def test_a_bad_limit_fails_when_the_endpoint_is_decorated(self) -> None:
        with pytest.raises(ConfigurationError, match="'5/fortnight'"):
            rate_limit("5/fortnight")


# -- exempt, dry_run, on_limited -----------------------------------------------------------------


class TestOptions:
    async def test_exempt_paths(self, app_kind: str, mw_backend: Backend) -> None:
        rules = [Rule("/{p:path}", "1/minute", key=by_user, name="all")]
        app = build_app(app_kind, rules=rules, backend=mw_backend, exempt=["/health", "/users/{id}"])
        async with client_for(app) as client:
            exempt = [await client.get(path, headers={"x-user": "a"}) for path in ["/health", "/users/1"] * 2]
            limited = [await client.get("/other", headers={"x-user": "a"}) for _ in range(2)]
        assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in exempt)
        assert [r.status_code for r in limited] == [200, 429]

    async def test_exempt_predicate(self, mw_backend: Backend) -> None:
        def internal(request: HTTPConnection) -> bool:
            return request.headers.get("x-internal") == "yes"

        rules = [Rule("/{p:path}", "1/minute", key=by_user, name="all")]
        app = build_app("starlette", rules=rules, backend=mw_backend, exempt=internal)
        async with client_for(app) as client:
            inside = [await client.get("/other", headers={"x-user": "a", "x-internal": "yes"}) for _ in range(3)]
            outside = [await client.get("/other", headers={"x-user": "a"}) for _ in range(2)]
        assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in inside)
        # Exempt requests took nothing: the first ordinary one is still allowed.
        assert [r.status_code for r in outside] == [200, 429]

    async def test_async_exempt_predicate(self, mw_backend: Backend) -> None:
        async def internal(request: HTTPConnection) -> bool:
            await asyncio.sleep(0)
            return request.headers.get("x-internal") == "yes"

        rules = [Rule("/{p:path}", "1/minute", key=by_user, name="all")]
        app = build_app("starlette", rules=rules, backend=mw_backend, exempt=internal)
        async with client_for(app) as client:
            inside = [await client.get("/other", headers={"x-user": "a", "x-internal": "yes"}) for _ in range(2)]
            outside = [await client.get("/other", headers={"x-user": "a"}) for _ in range(2)]
        assert [r.status_code for r in inside] == [200, 200]
        # A coroutine is truthy: a predicate that was not awaited would exempt everyone.
        assert [r.status_code for r in outside] == [200, 429]

    async def test_dry_run_counts_and_reports_but_never_denies(self, app_kind: str, mw_backend: Backend) -> None:
        rules = [Rule("/users/{id}", "2/minute", key=by_user, name="u")]
        app = build_app(app_kind, rules=rules, backend=mw_backend, dry_run=True, headers="both")
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(4)]
        assert [r.status_code for r in responses] == [200] * 4
        assert [state_of(r)["u"]["r"] for r in responses] == [1, 0, 0, 0]
        assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["1", "0", "0", "0"]
        for response in responses:
            assert "retry-after" not in response.headers  # never on a 2xx
        # Over the limit, t still says when the request would have passed.
        assert 1 <= state_of(responses[3])["u"]["t"] <= 60

    async def test_dry_run_over_the_limit_reports_the_wait_with_a_built_in_key(
        self, app_kind: str, mw_backend: Backend
    ) -> None:
        # A built-in extractor and the default headers: the request takes the one-rule path, whose prepared
        # headers are for allowed requests only; a dry-run denial must still say when it would have passed.
        # A token bucket tells the two apart: one token is back in 10 s (the wait), both in 20 s (full again).
        rules = [Rule("/users/{id}", TokenBucket(capacity=2, refill_rate=0.1), key=Header("x-user"), name="u")]
        app = build_app(app_kind, rules=rules, backend=mw_backend, dry_run=True)
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(3)]
        assert [r.status_code for r in responses] == [200] * 3
        assert [state_of(r)["u"]["r"] for r in responses] == [1, 0, 0]
        assert state_of(responses[1])["u"]["t"] == 20  # allowed: until the bucket is full again
        assert state_of(responses[2])["u"]["t"] == 10  # denied in the dry run: until it could pass
        assert "retry-after" not in responses[2].headers

    async def test_dry_run_decisions_match_a_real_run(self, mw_backend: Backend, key_prefix: str) -> None:
        rules = [Rule("/users/{id}", "2/minute", key=by_user, name="u")]
        app = build_app("starlette", rules=rules, backend=mw_backend, dry_run=True)
        async with client_for(app) as client:
            dry = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(3)]
        live_app = build_app("starlette", rules=rules, backend=MemoryBackend())
        async with client_for(live_app) as client:
            live = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(3)]
        assert [state_of(r)["u"]["r"] for r in dry] == [state_of(r)["u"]["r"] for r in live]
        assert [r.status_code for r in live] == [200, 200, 429]

    async def test_on_limited_replaces_the_response(self, app_kind: str, mw_backend: Backend) -> None:
        seen: list[tuple[str, list[bool]]] = []

        def on_limited(request: HTTPConnection, decisions: Sequence[Decision]) -> Response:
            seen.append((request.url.path, [d.allowed for d in decisions]))
            return PlainTextResponse("slow down", status_code=429)

        rules = [Rule("/users/{id}", ["1/minute", "10/hour"], key=by_user, name="u")]
        app = build_app(app_kind, rules=rules, backend=mw_backend, on_limited=on_limited)
        async with client_for(app) as client:
            await client.get("/users/1", headers={"x-user": "a"})
            denied = await client.get("/users/7", headers={"x-user": "a"})
        assert denied.status_code == 429
        assert denied.text == "slow down"
        assert denied.headers["content-type"].startswith("text/plain")
        # The standard headers are still added to the hook's response.
        assert int(denied.headers["retry-after"]) >= 1
        assert state_of(denied)["u:60s"]["r"] == 0
        assert seen == [("/users/7", [False, True])]

    async def test_async_on_limited(self, mw_backend: Backend) -> None:
        async def on_limited(request: HTTPConnection, decisions: Sequence[Decision]) -> Response:
            return JSONResponse({"error": "limited"}, status_code=503, headers={"retry-after": "120"})

        app = build_app(
            "starlette", rules=[Rule("/users/{id}", "1/minute", key=by_user)], backend=mw_backend, on_limited=on_limited
        )
        async with client_for(app) as client:
            await client.get("/users/1", headers={"x-user": "a"})
            denied = await client.get("/users/1", headers={"x-user": "a"})
        assert denied.status_code == 503
        assert denied.json() == {"error": "limited"}
        # The hook's own Retry-After wins; it is not sent twice.
        assert denied.headers.get_list("retry-after") == ["120"]

    async def test_on_limited_that_raises_httpexception_answers_with_it(
        self, app_kind: str, mw_backend: Backend
    ) -> None:
        from fastapi import HTTPException

        def on_limited(request: HTTPConnection, decisions: Sequence[Decision]) -> Response:
            raise HTTPException(status_code=429, detail="Slow down", headers={"x-reason": "quota"})

        rules = [Rule("/users/{id}", "1/minute", key=by_user, name="users")]
        app = build_app(app_kind, rules=rules, backend=mw_backend, on_limited=on_limited)
        async with client_for(app) as client:
            await client.get("/users/1", headers={"x-user": "a"})
            denied = await client.get("/users/1", headers={"x-user": "a"})
        assert denied.status_code == 429
        assert denied.json() == {"detail": "Slow down"}
        assert denied.headers["x-reason"] == "quota"
        assert int(denied.headers["retry-after"]) >= 1 and "users" in policies_of(denied)

    async def test_on_limited_that_fails_is_logged_and_the_default_429_is_sent(
        self, mw_backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        def on_limited(request: HTTPConnection, decisions: Sequence[Decision]) -> Response:
            raise KeyError("a bug in the callback")

        rules = [Rule("/users/{id}", "1/minute", key=by_user)]
        app = build_app("starlette", rules=rules, backend=mw_backend, on_limited=on_limited)
        with caplog.at_level(logging.ERROR, logger="asgi_ratelimit"):
            async with client_for(app) as client:
                await client.get("/users/1", headers={"x-user": "a"})
                denied = await client.get("/users/1", headers={"x-user": "a"})
        assert_problem_429(denied)
        (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert "on_limited raised" in record.getMessage() and record.exc_info is not None

    async def test_backend_failure_fails_open_by_default(self) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=by_user)], backend=BrokenBackend())
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(2)]
        assert [r.status_code for r in responses] == [200, 200]

    async def test_backend_failure_fails_closed_on_request(self) -> None:
        app = build_app(
            "starlette",
            rules=[Rule("/users/{id}", "1/minute", key=by_user)],
            backend=BrokenBackend(),
            fail_open=False,
        )
        async with client_for(app) as client:
            response = await client.get("/users/1", headers={"x-user": "a"})
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["cache-control"] == "no-store"

    @pytest.mark.parametrize("key", [Header("x-user"), by_user], ids=["built-in key", "callable key"])
    @pytest.mark.parametrize(("middleware_open", "rule_open", "status"), [(True, False, 503), (False, True, 200)])
    async def test_a_rules_fail_open_overrides_the_middlewares(
        self, key: Any, middleware_open: bool, rule_open: bool, status: int
    ) -> None:
        # Both the one-rule path (a built-in key) and the general one (a callable key) honour the rule's setting.
        app = build_app(
            "starlette",
            rules=[Rule("/users/{id}", "1/minute", key=key, fail_open=rule_open)],
            backend=BrokenBackend(),
            fail_open=middleware_open,
        )
        async with client_for(app) as client:
            response = await client.get("/users/1", headers={"x-user": "a"})
        assert response.status_code == status


# -- header modes --------------------------------------------------------------------------------


class TestHeaderModes:
    @pytest.mark.parametrize(
        ("mode", "ietf", "legacy"),
        [("ietf", True, False), ("legacy", False, True), ("both", True, True), ("none", False, False)],
    )
    async def test_modes(self, mode: str, ietf: bool, legacy: bool, mw_backend: Backend) -> None:
        rules = [Rule("/users/{id}", "2/minute", key=by_user)]
        app = build_app("starlette", rules=rules, backend=mw_backend, headers=mode)
        async with client_for(app) as client:
            responses = [await client.get("/users/1", headers={"x-user": "a"}) for _ in range(3)]
        for response in responses:
            assert ("ratelimit" in response.headers) is ietf
            assert ("ratelimit-policy" in response.headers) is ietf
            assert ("x-ratelimit-limit" in response.headers) is legacy
            assert ("x-ratelimit-remaining" in response.headers) is legacy
            assert ("x-ratelimit-reset" in response.headers) is legacy
        # Retry-After is part of every 429, whatever the mode.
        assert_problem_429(responses[2])
        if legacy:
            assert [r.headers["x-ratelimit-remaining"] for r in responses] == ["1", "0", "0"]
            assert {r.headers["x-ratelimit-limit"] for r in responses} == {"2"}
            # Seconds from now, not an epoch timestamp.
            for response in responses:
                assert 1 <= int(response.headers["x-ratelimit-reset"]) <= 60
            assert int(responses[2].headers["x-ratelimit-reset"]) <= int(responses[2].headers["retry-after"])

    async def test_app_headers_are_kept(self, mw_backend: Backend) -> None:
        async def endpoint(request: Request) -> Response:
            return PlainTextResponse("ok", headers={"x-app": "1"})

        app = Starlette(
            routes=[Route("/", endpoint)],
            middleware=[
                Middleware(RateLimitMiddleware, rules=[Rule("/", "5/minute", key=by_user)], backend=mw_backend)
            ],
        )
        async with client_for(app) as client:
            response = await client.get("/", headers={"x-user": "a"})
        assert response.headers["x-app"] == "1"
        assert response.headers["content-length"] == "2"
        assert state_of(response)["/"]["r"] == 4


# -- configuration errors --------------------------------------------------------------------------


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("ok")(scope, receive, send)


class TestConfiguration:
    """Mistakes fail when the middleware is built (Starlette builds it at the first request, so build it here)."""

    @pytest.mark.parametrize(
        ("make", "fragments"),
        [
            (lambda: Rule("/login", "5/fortnight", key=by_user), ["'/login'", "'5/fortnight'"]),
            (lambda: Rule("/login", ["5/minute", "ten/hour"], key=by_user, name="login"), ["'login'", "'ten/hour'"]),
            (lambda: Rule("/login", "5/minute", key=by_user, algorithm="leaky"), ["'/login'", "'leaky'"]),
            (lambda: Rule("/login", "5/minute", key=by_user, methods=["FETCH"]), ["'/login'", "'FETCH'"]),
            (lambda: Rule("/login", "5/minute", key=by_user, methods="POST"), ["'/login'", "'POST'"]),
            (lambda: Rule("/login", "5/minute", key=by_user, cost=0), ["'/login'", "0"]),
            (lambda: Rule("/login", [], key=by_user), ["'/login'"]),
            (lambda: Rule("login", "5/minute", key=by_user), ["'login'"]),
            (lambda: Rule("/login", "5/minute", key="ip"), ["'/login'", "'ip'"]),  # type: ignore[arg-type]
        ],
    )
    def test_bad_rules(self, make: Callable[[], Rule], fragments: list[str]) -> None:
        with pytest.raises(ConfigurationError) as info:
            make()
        for fragment in fragments:
            assert fragment in str(info.value)

    def test_two_rules_with_one_name(self) -> None:
        rules = [Rule("/a", "1/minute", key=by_user, name="api"), Rule("/b", "1/minute", key=by_user, name="api")]
        with pytest.raises(ConfigurationError, match="'api'"):
            RateLimitMiddleware(ok_app, rules=rules)

    def test_two_rules_with_one_derived_name(self) -> None:
        rules = [Rule("/a", "1/minute", key=by_user), Rule("/a", "5/hour", key=by_user)]
        with pytest.raises(ConfigurationError, match="'/a'"):
            RateLimitMiddleware(ok_app, rules=rules)

    def test_bad_header_mode(self) -> None:
        with pytest.raises(ConfigurationError, match="'draft'"):
            RateLimitMiddleware(ok_app, headers="draft")  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("kwargs", "fragment"),
        [
            ({"rules": ["/login"]}, "'/login'"),
            ({"exempt": "/health"}, "'/health'"),
            ({"fail_open": "yes"}, "'yes'"),
            ({"timeout": 0}, "0"),
        ],
    )
    def test_bad_middleware_settings(self, kwargs: dict[str, Any], fragment: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            RateLimitMiddleware(ok_app, **kwargs)
        assert fragment in str(info.value)

    async def test_a_starlette_app_raises_at_the_first_request(self) -> None:
        app = Starlette(middleware=[Middleware(RateLimitMiddleware, headers="draft")])
        async with client_for(app) as client:
            with pytest.raises(ConfigurationError, match="'draft'"):
                await client.get("/")

    def test_configuration_error_is_a_value_error(self) -> None:
        assert issubclass(ConfigurationError, ValueError)


# -- one backend call per request ----------------------------------------------------------------


class TestOneRoundTrip:
    async def test_one_hit_many_call_whatever_the_number_of_limits(self, mw_backend: Backend) -> None:
        counting = CountingBackend(mw_backend)
        rules = [
            Rule("/users/{id}", ["5/second", "100/minute", "1000/hour"], key=by_user, name="u"),
            Rule("/{p:path}", "1000/minute", key=lambda r: "all", name="global"),
            Rule("/users/{id}", "50/minute", key=by_user, algorithm="gcra", name="g"),
        ]
        app = build_app("starlette", rules=rules, backend=counting)
        async with client_for(app) as client:
            for _ in range(4):
                assert (await client.get("/users/1", headers={"x-user": "a"})).status_code == 200
        assert len(counting.calls) == 4
        assert all(len(call) == 5 for call in counting.calls)

    async def test_no_backend_call_when_no_rule_applies(self) -> None:
        counting = CountingBackend(MemoryBackend())
        app = build_app("starlette", rules=[Rule("/users/{id}", "5/second", key=by_user)], backend=counting)
        async with client_for(app) as client:
            await client.get("/other", headers={"x-user": "a"})
            await client.get("/users/1")  # no key
        assert counting.calls == []

    @pytest.mark.redis
    async def test_one_evalsha_per_request_on_redis(self, redis_server: RedisProcess) -> None:
        backend = RedisBackend(Redis.from_url(redis_server.url), prefix="one:")
        rules = [
            Rule("/users/{id}", ["50/second", "100/minute", "1000/hour"], key=by_user, name="u"),
            Rule("/{p:path}", "1000/minute", key=lambda r: "all", name="global"),
        ]
        app = build_app("starlette", rules=rules, backend=backend)
        admin = Redis.from_url(redis_server.url)
        try:
            async with client_for(app) as client:
                await client.get("/users/1", headers={"x-user": "a"})  # loads the script (NOSCRIPT, then SCRIPT LOAD)
                await admin.config_resetstat()
                for _ in range(5):
                    assert (await client.get("/users/1", headers={"x-user": "a"})).status_code == 200
            stats = await admin.info("commandstats")
        finally:
            await admin.aclose()
            await backend.aclose()
        calls = {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}
        # Commands the script runs are counted too; what matters is what the client sent.
        assert calls.get("evalsha") == 5
        assert not {"eval", "script|load", "multi", "exec"} & set(calls), calls


# -- pure ASGI behaviour -------------------------------------------------------------------------------


class Channel:
    """The server side of one hand-driven ASGI connection."""

    def __init__(self, *incoming: Message) -> None:
        self.incoming = list(incoming)
        self.sent: list[Message] = []
        self.on_send: Callable[[Message], None] | None = None

    async def receive(self) -> Message:
        if self.incoming:
            return self.incoming.pop(0)
        await asyncio.Event().wait()  # nothing more will come: block, as a live connection would
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            self.on_send(message)


def http_scope(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


def ws_scope(path: str, headers: dict[str, str], extensions: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "subprotocols": [],
        "extensions": extensions,
    }


def header_map(message: Message) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in message.get("headers", [])}


class TestPureASGI:
    async def test_streaming_chunks_pass_one_by_one(self, mw_backend: Backend) -> None:
        first_sent = asyncio.Event()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            # The second chunk waits until the first has reached the server: a middleware that
            # buffered the body would never let it arrive, and the bound below would fail the test.
            await first_sent.wait()
            yield b"second"

        async def stream(request: Request) -> StreamingResponse:
            return StreamingResponse(chunks(), media_type="text/plain")

        app = RateLimitMiddleware(
            Starlette(routes=[Route("/stream", stream)]),
            rules=[Rule("/stream", "5/minute", key=by_user)],
            backend=mw_backend,
            timeout=TIMEOUT,
        )
        channel = Channel({"type": "http.request", "body": b"", "more_body": False})

        def watch(message: Message) -> None:
            if message.get("body") == b"first":
                first_sent.set()

        channel.on_send = watch
        await asyncio.wait_for(app(http_scope("/stream", {"x-user": "a"}), channel.receive, channel.send), 5)
        start, *bodies = channel.sent
        assert start["type"] == "http.response.start" and start["status"] == 200
        assert b"ratelimit" in header_map(start)
        assert [m["body"] for m in bodies if m["body"]] == [b"first", b"second"]
        assert bodies[-1].get("more_body", False) is False

    async def test_background_tasks_run(self, app_kind: str, mw_backend: Backend) -> None:
        done: list[str] = []

        async def record(value: str) -> None:
            done.append(value)

        async def endpoint(request: Request) -> Response:
            return PlainTextResponse("ok", background=BackgroundTask(record, request.headers["x-user"]))

        if app_kind == "starlette":
            app: Starlette = Starlette(routes=[Route("/bg", endpoint)])
        else:
            app = FastAPI()
            app.add_api_route("/bg", endpoint)
        app.add_middleware(RateLimitMiddleware, rules=[Rule("/bg", "5/minute", key=by_user)], backend=mw_backend)
        async with client_for(app) as client:
            response = await client.get("/bg", headers={"x-user": "ann"})
        assert response.status_code == 200
        assert "ratelimit" in response.headers
        assert done == ["ann"]

    async def test_lifespan_passes_through(self, app_kind: str) -> None:
        events: list[str] = []

        @asynccontextmanager
        async def lifespan(app: Any) -> AsyncIterator[None]:
            events.append("startup")
            yield
            events.append("shutdown")

        app: Starlette = Starlette(lifespan=lifespan) if app_kind == "starlette" else FastAPI(lifespan=lifespan)
        app.add_middleware(RateLimitMiddleware, rules=[Rule("/{p:path}", "1/minute", key=by_user)])
        channel = Channel({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"})
        await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}}, channel.receive, channel.send), 5)
        assert events == ["startup", "shutdown"]
        assert [m["type"] for m in channel.sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

    async def test_lifespan_reaches_a_wrapped_app_untouched(self) -> None:
        received: list[Message] = []

        async def raw_app(scope: Any, receive: Any, send: Any) -> None:
            assert scope["type"] == "lifespan"
            while True:
                message = await receive()
                received.append(message)
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return

        app = RateLimitMiddleware(raw_app, rules=[Rule("/{p:path}", "1/minute", key=by_user)])
        channel = Channel({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"})
        await asyncio.wait_for(app({"type": "lifespan", "asgi": {"version": "3.0"}}, channel.receive, channel.send), 5)
        assert [m["type"] for m in received] == ["lifespan.startup", "lifespan.shutdown"]
        assert [m["type"] for m in channel.sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def websocket_app(backend: Backend) -> RateLimitMiddleware:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    return RateLimitMiddleware(
        Starlette(routes=[WebSocketRoute("/ws", echo)]),
        rules=[Rule("/ws", "1/minute", key=by_user, name="ws")],
        backend=backend,
        timeout=TIMEOUT,
    )


class TestWebSocket:
    async def test_allowed_handshake_carries_the_headers(self, mw_backend: Backend) -> None:
        app = websocket_app(mw_backend)
        channel = Channel({"type": "websocket.connect"})
        scope = ws_scope("/ws", {"x-user": "a"}, {"websocket.http.response": {}})
        await asyncio.wait_for(app(scope, channel.receive, channel.send), 5)
        accept = channel.sent[0]
        assert accept["type"] == "websocket.accept"
        assert sf_list(header_map(accept)[b"ratelimit"].decode()) == [("ws", {"r": 0, "t": 60})]
        assert b"retry-after" not in header_map(accept)
        assert [m["type"] for m in channel.sent[1:]] == ["websocket.send", "websocket.close"]

    async def test_denied_handshake_gets_http_429_with_the_extension(self, mw_backend: Backend) -> None:
        app = websocket_app(mw_backend)
        scope = ws_scope("/ws", {"x-user": "a"}, {"websocket.http.response": {}})
        await app(scope, Channel({"type": "websocket.connect"}).receive, Channel().send)
        channel = Channel({"type": "websocket.connect"})
        await asyncio.wait_for(app(scope, channel.receive, channel.send), 5)
        assert [m["type"] for m in channel.sent] == ["websocket.http.response.start", "websocket.http.response.body"]
        start, body = channel.sent
        assert start["status"] == 429
        headers = header_map(start)
        assert headers[b"content-type"] == b"application/problem+json"
        assert headers[b"cache-control"] == b"no-store"
        assert int(headers[b"retry-after"]) >= 1
        assert sf_list(headers[b"ratelimit"].decode())[0][1]["r"] == 0
        problem = json.loads(body["body"])
        assert problem["status"] == 429 and problem["retry_after"] == int(headers[b"retry-after"])
        assert int(headers[b"content-length"]) == len(body["body"])

    async def test_denied_handshake_closes_1008_without_the_extension(self, mw_backend: Backend) -> None:
        app = websocket_app(mw_backend)
        scope = ws_scope("/ws", {"x-user": "a"}, {})
        await app(scope, Channel({"type": "websocket.connect"}).receive, Channel().send)
        channel = Channel({"type": "websocket.connect"})
        await asyncio.wait_for(app(scope, channel.receive, channel.send), 5)
        assert len(channel.sent) == 1
        assert channel.sent[0]["type"] == "websocket.close"
        assert channel.sent[0]["code"] == 1008

    async def test_websocket_without_a_key_is_not_limited(self, mw_backend: Backend) -> None:
        app = websocket_app(mw_backend)
        for _ in range(3):
            channel = Channel({"type": "websocket.connect"})
            await asyncio.wait_for(app(ws_scope("/ws", {}, {}), channel.receive, channel.send), 5)
            assert channel.sent[0]["type"] == "websocket.accept"
            assert b"ratelimit" not in header_map(channel.sent[0])


# -- key extractors through the middleware --------------------------------------------------------

JWT_SECRET = "a-secret-of-at-least-32-bytes-for-hs256!"


def peer_client(app: ASGIApp, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


def all_header_values(response: httpx.Response) -> str:
    return "\n".join(f"{name}: {value}" for name, value in response.headers.multi_items())


class TestExtractors:
    async def test_client_ip_is_the_default_key(self, app_kind: str, mw_backend: Backend) -> None:
        app = build_app(app_kind, rules=[Rule("/users/{id}", "1/minute", name="u")], backend=mw_backend)
        async with peer_client(app, "198.51.100.7") as first, peer_client(app, "198.51.100.8") as second:
            a = [await first.get("/users/1") for _ in range(2)]
            b = await second.get("/users/1")
        assert [r.status_code for r in a] == [200, 429]
        assert b.status_code == 200
        # The identity never appears in a header value or the body.
        assert "198.51.100" not in all_header_values(a[1]) + a[1].text

    async def test_ipv6_clients_are_grouped_by_their_64(self, mw_backend: Backend) -> None:
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", name="u")], backend=mw_backend)
        async with peer_client(app, "2001:db8:1:2::1") as one, peer_client(app, "2001:db8:1:2:ffff::9") as other:
            assert (await one.get("/users/1")).status_code == 200
            assert (await other.get("/users/1")).status_code == 429

    async def test_client_ip_behind_a_trusted_proxy(self, mw_backend: Backend) -> None:
        key = ClientIP(trusted_proxies=["10.0.0.0/8"])
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=key, name="u")], backend=mw_backend)
        async with peer_client(app, "10.0.0.1") as proxy:
            first = await proxy.get("/users/1", headers={"x-forwarded-for": "203.0.113.5, 10.0.0.2"})
            # A client that prepends a fake address is still itself: the walk goes right to left.
            spoofed = await proxy.get("/users/1", headers={"x-forwarded-for": "192.0.2.1, 203.0.113.5"})
            other = await proxy.get("/users/1", headers={"x-forwarded-for": "203.0.113.6"})
        assert [first.status_code, spoofed.status_code, other.status_code] == [200, 429, 200]

    async def test_forwarding_headers_from_an_untrusted_peer_are_ignored(self, mw_backend: Backend) -> None:
        key = ClientIP(trusted_proxies=["10.0.0.0/8"])
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=key, name="u")], backend=mw_backend)
        async with peer_client(app, "198.51.100.7") as client:
            first = await client.get("/users/1", headers={"x-forwarded-for": "203.0.113.1"})
            rotated = await client.get("/users/1", headers={"x-forwarded-for": "203.0.113.2"})
        assert [first.status_code, rotated.status_code] == [200, 429]

    async def test_header_key(self, app_kind: str, mw_backend: Backend) -> None:
        rules = [Rule("/users/{id}", "1/minute", key=Header("x-api-key"), name="api")]
        app = build_app(app_kind, rules=rules, backend=mw_backend)
        async with client_for(app) as client:
            a = [await client.get("/users/1", headers={"x-api-key": "key-a"}) for _ in range(2)]
            b = await client.get("/users/1", headers={"x-api-key": "key-b"})
            anonymous = [await client.get("/users/1") for _ in range(2)]
        assert [r.status_code for r in a] == [200, 429]
        assert b.status_code == 200
        assert all(r.status_code == 200 and "ratelimit" not in r.headers for r in anonymous)
        assert "key-a" not in all_header_values(a[1]) + a[1].text

    async def test_jwt_claim_key(self, app_kind: str, mw_backend: Backend) -> None:
        import jwt

        key = JWTClaim("sub", key=JWT_SECRET, algorithms=["HS256"])
        rules = [Rule("/users/{id}", "1/minute", key=key, name="user"), Rule("/users/{id}", "100/minute", name="ip")]
        app = build_app(app_kind, rules=rules, backend=mw_backend)

        def bearer(token: str) -> dict[str, str]:
            return {"authorization": f"Bearer {token}"}

        alice = jwt.encode({"sub": "alice"}, JWT_SECRET, algorithm="HS256")
        bob = jwt.encode({"sub": "bob"}, JWT_SECRET, algorithm="HS256")
        forged = jwt.encode({"sub": "bob"}, "another-secret-that-is-32-bytes-long!!", algorithm="HS256")
        async with client_for(app) as client:
            first = await client.get("/users/1", headers=bearer(alice))
            second = await client.get("/users/1", headers=bearer(alice))
            forged_bob = await client.get("/users/1", headers=bearer(forged))
            real_bob = await client.get("/users/1", headers=bearer(bob))
        assert [first.status_code, second.status_code] == [200, 429]
        assert set(policies_of(first)) == {"user", "ip"}
        # A token that fails verification gives no key: only the per-IP rule applies, bob's quota is untouched.
        assert forged_bob.status_code == 200
        assert set(policies_of(forged_bob)) == {"ip"}
        assert real_bob.status_code == 200
        assert state_of(real_bob)["user"]["r"] == 0

    async def test_first_of(self, mw_backend: Backend) -> None:
        key = FirstOf(Header("x-api-key"), ClientIP())
        app = build_app("starlette", rules=[Rule("/users/{id}", "1/minute", key=key, name="u")], backend=mw_backend)
        async with peer_client(app, "198.51.100.7") as client:
            with_key = [await client.get("/users/1", headers={"x-api-key": "k"}) for _ in range(2)]
            by_ip = await client.get("/users/1")
        assert [r.status_code for r in with_key] == [200, 429]
        assert by_ip.status_code == 200

    async def test_built_in_extractors_need_no_request_but_user_code_gets_one(
        self, mw_backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A built-in key with static limits is read from the scope: no Request is built for it.
        # Whatever the rule, on_limited (user code) still receives a real Request.
        import asgi_ratelimit.middleware as middleware_module

        built: list[str] = []

        class CountedRequest(Request):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                built.append(self.url.path)

        monkeypatch.setattr(middleware_module, "Request", CountedRequest)
        seen: list[tuple[str, str]] = []

        def on_limited(request: HTTPConnection, decisions: Sequence[Decision]) -> Response:
            seen.append((type(request).__name__, request.url.path))
            return PlainTextResponse("slow down", status_code=429)

        rules = [Rule("/users/{id}", "2/minute", key=FirstOf(Header("x-api-key"), ClientIP()), name="u")]
        app = build_app("starlette", rules=rules, backend=mw_backend, on_limited=on_limited)
        async with client_for(app) as client:
            statuses = [(await client.get(f"/users/{n}")).status_code for n in range(3)]
        assert statuses == [200, 200, 429]
        assert seen == [("CountedRequest", "/users/2")]
        assert built == ["/users/2"]  # for on_limited only

    async def test_an_extractor_subclass_with_its_own_call_is_called(self, mw_backend: Backend) -> None:
        class PerTenant(Header):
            def __call__(self, request: HTTPConnection) -> str | None:
                tenant = super().__call__(request)
                return None if tenant is None else tenant.split(".")[0]

        rules = [Rule("/users/{id}", "1/minute", key=PerTenant("x-tenant"), name="u")]
        app = build_app("starlette", rules=rules, backend=mw_backend)
        async with client_for(app) as client:
            first = await client.get("/users/1", headers={"x-tenant": "acme.eu"})
            same_tenant = await client.get("/users/1", headers={"x-tenant": "acme.us"})
        assert [first.status_code, same_tenant.status_code] == [200, 429]

    async def test_client_ip_on_a_websocket_handshake(self, mw_backend: Backend) -> None:
        async def echo(websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.close()

        app = RateLimitMiddleware(
            Starlette(routes=[WebSocketRoute("/ws", echo)]),
            rules=[Rule("/ws", "1/minute", name="ws")],
            backend=mw_backend,
            timeout=TIMEOUT,
        )
        types = []
        for _ in range(2):
            channel = Channel({"type": "websocket.connect"})
            await asyncio.wait_for(app(ws_scope("/ws", {}, {}), channel.receive, channel.send), 5)
            types.append(channel.sent[0]["type"])
        assert types == ["websocket.accept", "websocket.close"]

    @pytest.mark.parametrize(
        ("make", "fragment"),
        [
            (lambda: ClientIP(trusted_proxies=["10.0.0.0/33"]), "10.0.0.0/33"),
            (lambda: ClientIP(trusted_proxies=["10.0.0.1/8"]), "10.0.0.1/8"),
            (lambda: ClientIP(trusted_proxies="10.0.0.0/8"), "'10.0.0.0/8'"),
            (lambda: Header("x api key"), "'x api key'"),
            (lambda: JWTClaim("sub", key=JWT_SECRET, algorithms=["none"]), "none"),
        ],
    )
    def test_bad_extractor_configuration_fails_at_build_time(self, make: Callable[[], Any], fragment: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            Rule("/login", "5/minute", key=make())
        assert fragment in str(info.value)
