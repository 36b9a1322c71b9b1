"""Resetting a key: POST /reset on the service, ``middleware.reset()`` in Python, and the backends' reset().

A reset clears one key's state under the policies named and nothing else: other keys, and the same
key under other policies, keep their counts.  It is checked on MemoryBackend, fakeredis and a real
Redis, and through the deny cache, which must forget the key too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from test_service import PROBLEM, TB, Failing, Store, get, post, store

from asgi_ratelimit import (
    Backend,
    BackendError,
    ConfigurationError,
    FixedWindow,
    Header,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
    rate_limit,
)
from asgi_ratelimit._deny_cache import DenyCache
from asgi_ratelimit._keys import digest
from asgi_ratelimit.service import create_app

__all__ = ["store"]  # the fixture, imported for this module's tests


async def reset(app: Any, body: Any, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        return await client.post("/reset", json=body, **kwargs)


SMALL = {"key": "customer:42", "algorithm": "fixed_window", "limit": 2, "window": 3600}


async def test_reset_makes_a_denied_key_allowed_again(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    await post(app, {**SMALL, "cost": 2})
    assert (await post(app, SMALL)).json()["allowed"] is False
    response = await reset(app, SMALL)
    assert response.status_code == 204
    assert response.content == b""
    assert await store.keys() == 0
    again = await post(app, SMALL)
    assert again.json()["allowed"] is True
    assert again.json()["remaining"] == 1


async def test_reset_touches_only_that_key_and_policy(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    other_key = {**SMALL, "key": "customer:43"}
    other_policy = {**SMALL, "limit": 5}
    for body in (SMALL, other_key, other_policy):
        await post(app, body)
    assert (await reset(app, SMALL)).status_code == 204
    assert (await post(app, SMALL)).json()["remaining"] == 1
    assert (await post(app, other_key)).json()["remaining"] == 0
    assert (await post(app, other_policy)).json()["remaining"] == 3


async def test_resetting_a_key_without_state_is_no_error(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    assert (await reset(app, TB)).status_code == 204
    assert await store.keys() == 0


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        pytest.param({**SMALL, "cost": 1}, 422, "cost", id="a-cost"),
        pytest.param({k: v for k, v in SMALL.items() if k != "key"}, 422, "key", id="no-key"),
        pytest.param({**SMALL, "limit": 0}, 422, "limit", id="bad-limit"),
        pytest.param({**SMALL, "algorithm": "leaky"}, 422, "algorithm", id="bad-algorithm"),
        pytest.param({"checks": [SMALL]}, 422, "checks", id="a-batch"),
        pytest.param([SMALL], 422, None, id="an-array"),
    ],
)
async def test_a_bad_reset_is_refused_naming_the_field(store: Store, body: Any, status: int, field: str | None) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    await post(app, SMALL)
    response = await reset(app, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json().get("field") == field
    assert (await post(app, SMALL)).json()["remaining"] == 0  # nothing was reset


async def test_reset_needs_the_token() -> None:
    token = "reset-token-0123456789abcdef"
    app = create_app(MemoryBackend(), registry=CollectorRegistry(), token=token)
    refused = await reset(app, SMALL)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert (await reset(app, SMALL, headers={"authorization": f"Bearer {token}"})).status_code == 204


class FailingReset(Failing):
    async def reset(self, key: str, policies: Any) -> None:
        raise BackendError("down")


async def test_a_failing_backend_answers_503() -> None:
    response = await reset(create_app(FailingReset(), registry=CollectorRegistry()), SMALL)
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["retry-after"] == "1"


async def test_a_reset_is_logged_with_the_key_hashed(caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    with caplog.at_level(logging.INFO, logger="asgi_ratelimit"):
        await reset(app, SMALL)
    assert f"reset key {digest('customer:42')} under fixed_window" in caplog.text
    assert "customer:42" not in caplog.text


async def test_the_openapi_document_describes_reset() -> None:
    document = (await get(create_app(MemoryBackend(), registry=CollectorRegistry()), "/openapi.json")).json()
    operation = document["paths"]["/reset"]["post"]
    assert set(operation["responses"]) == {"204", "400", "422", "503"}
    variants = operation["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert len(variants) == 5
    assert all("cost" not in variant["properties"] for variant in variants)


# -- the backends ---------------------------------------------------------------------------------


async def test_backend_reset_clears_only_the_named_policies(backend: Backend) -> None:
    hourly, daily, bucket = FixedWindow(2, 3600), FixedWindow(10, 86400), TokenBucket(5, 1)
    await backend.hit("alice", [hourly, daily, bucket], cost=2)
    await backend.hit("bob", [hourly], cost=2)
    await backend.reset("alice", [hourly, bucket])
    after = await backend.hit("alice", [hourly, daily, bucket])
    assert [decision.remaining for decision in after] == [1, 7, 4]
    assert not (await backend.hit("bob", [hourly]))[0].allowed
    await backend.reset("nobody", [hourly])  # no state: nothing to do, no error
    await backend.reset("alice", [])


async def test_redis_reset_deletes_the_keys(redis_url: str, key_prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    backend = RedisBackend(client, prefix=key_prefix)
    try:
        await backend.hit("carol", [FixedWindow(2, 60), TokenBucket(5, 1)])
        assert len([key async for key in client.scan_iter(match=f"{key_prefix}*")]) == 2
        await backend.reset("carol", [FixedWindow(2, 60), TokenBucket(5, 1)])
        assert [key async for key in client.scan_iter(match=f"{key_prefix}*")] == []
    finally:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await backend.aclose()


def test_the_deny_cache_forgets_an_identity() -> None:
    cache = DenyCache(clock=lambda: 0.0)
    policy = FixedWindow(1, 60)

    def denied() -> Any:
        from asgi_ratelimit.policies import new_decision

        return [new_decision(False, 1, 0, 30.0, 30.0, policy)]

    cache.put((("a", policy, 1),), denied(), 0.0)
    cache.put((("a", policy, 1), ("b", policy, 1)), denied(), 0.0)
    cache.put((("b", policy, 1),), denied(), 0.0)
    cache.forget("a")
    assert len(cache) == 1
    assert cache.get((("b", policy, 1),)) is not None


# -- the middleware -------------------------------------------------------------------------------


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


def limited(backend: Backend, rules: list[Rule]) -> RateLimitMiddleware:
    app = Starlette(routes=[Route("/login", hello, methods=["POST"]), Route("/api", hello)])
    return RateLimitMiddleware(app, rules=rules, backend=backend, registry=CollectorRegistry(), timeout=2.0)


async def test_middleware_reset_lets_a_denied_client_through(mw_backend: Backend) -> None:
    middleware = limited(mw_backend, [Rule("/login", "2/hour", methods=["POST"], name="login")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as client:
        statuses = [(await client.post("/login")).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]  # the last may come from the deny cache, on Redis
        await middleware.reset("login", "127.0.0.1")
        assert (await client.post("/login")).status_code == 200


async def test_middleware_reset_keys_by_what_the_extractor_returns(mw_backend: Backend) -> None:
    middleware = limited(mw_backend, [Rule("/api", "1/hour", key=Header("x-api-key"), name="api")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as client:
        for api_key in ("k1", "k2"):
            await client.get("/api", headers={"x-api-key": api_key})
        await middleware.reset("api", "k1")
        assert (await client.get("/api", headers={"x-api-key": "k1"})).status_code == 200
        assert (await client.get("/api", headers={"x-api-key": "k2"})).status_code == 429


async def test_middleware_reset_covers_every_tier_applied() -> None:
    def tier(request: Any) -> str:
        return "1/hour" if request.headers.get("x-plan") == "free" else "2/hour"

    middleware = limited(MemoryBackend(), [Rule("/api", tier, key=Header("x-api-key"), name="tiered")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as client:
        free = {"x-api-key": "k", "x-plan": "free"}
        paid = {"x-api-key": "k", "x-plan": "pro"}
        await client.get("/api", headers=free)
        await client.get("/api", headers=paid)
        await client.get("/api", headers=paid)
        await middleware.reset("tiered", "k")
        assert (await client.get("/api", headers=free)).status_code == 200
        assert (await client.get("/api", headers=paid)).status_code == 200


async def test_middleware_reset_of_an_unknown_rule_names_the_rules() -> None:
    middleware = limited(MemoryBackend(), [Rule("/login", "2/hour", name="login")])
    message = "No rule is named 'logins'; the rules are: 'login'; nor is any @rate_limit endpoint."
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        await middleware.reset("logins", "127.0.0.1")


@rate_limit("2/hour", name="endpoint-login")
async def endpoint_login(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello")


async def test_middleware_reset_of_an_endpoint_rule(mw_backend: Backend) -> None:
    app = Starlette(routes=[Route("/login", endpoint_login, methods=["POST"])])
    middleware = RateLimitMiddleware(app, backend=mw_backend, registry=CollectorRegistry(), timeout=2.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://app") as client:
        statuses = [(await client.post("/login")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        await middleware.reset("endpoint-login", "127.0.0.1")
        assert (await client.post("/login")).status_code == 200
