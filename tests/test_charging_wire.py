"""Counting and charging rules through a real uvicorn server on both backends, and a charge across a Redis stall.

The stall freezes a redis-server of the test's own (SIGSTOP) while a charge is on its way, as
test_concurrency_faults.py does: the charge must still be taken, and exactly once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from conftest import RedisProcess, parse_sf_list
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from test_charging import PASSWORD, login, login_rule
from test_uvicorn import closing, serve

from asgi_ratelimit import (
    GCRA,
    Backend,
    BackendError,
    FromState,
    Header,
    RateLimitMiddleware,
    RedisBackend,
    ResponseHeader,
    Rule,
    TokenBucket,
)

# Charges in debt keep their keys for hours: every test deletes what it wrote to the machine's Redis.
pytestmark = pytest.mark.usefixtures("forget_prefixed_keys")


def test_failed_logins_over_real_http(make_backend: Callable[[], Backend]) -> None:
    backend = make_backend()

    app = RateLimitMiddleware(
        Starlette(routes=[Route("/login", login, methods=["POST"])], lifespan=closing(backend)),
        rules=[login_rule()],
        backend=backend,
        registry=CollectorRegistry(),
        timeout=2.0,
    )
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        ann = {"x-account": "ann"}
        assert all(client.post("/login", content=PASSWORD, headers=ann).status_code == 200 for _ in range(20))
        assert [client.post("/login", content="guess", headers=ann).status_code for _ in range(5)] == [401] * 5
        sixth = client.post("/login", content="guess", headers=ann)
        assert sixth.status_code == 429
        assert 890 <= int(sixth.headers["retry-after"]) <= 900  # the oldest failure leaves the window then
        again = client.post("/login", content="guess", headers=ann)
        assert again.status_code == 429 and int(again.headers["retry-after"]) <= int(sixth.headers["retry-after"])


def test_a_token_budget_streamed_over_real_http(make_backend: Callable[[], Backend]) -> None:
    """1,000 tokens, refilled at 250 a second: a key that spends 1,500 owes 500, and waits 2.004 s for one more."""
    backend = make_backend()

    async def complete(request: Request) -> Response:
        async def words() -> AsyncIterator[bytes]:
            yield b"thinking... "
            await asyncio.sleep(0.01)
            request.state.tokens = int(request.query_params["tokens"])
            yield b"done"

        return StreamingResponse(words(), media_type="text/plain")

    app = RateLimitMiddleware(
        Starlette(routes=[Route("/complete", complete)], lifespan=closing(backend)),
        rules=[Rule("/complete", TokenBucket(1000, 250), key=Header("x-key"), charge=FromState("tokens"))],
        backend=backend,
        registry=CollectorRegistry(),
        timeout=2.0,
    )
    with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        key = {"x-key": "k"}
        first = client.get("/complete", params={"tokens": 1500}, headers=key)
        assert first.status_code == 200 and first.text == "thinking... done"
        charged_at = time.monotonic()
        refused = client.get("/complete", params={"tokens": 1}, headers=key)
        assert refused.status_code == 429
        # 2.004 s after the charge, less the time since, rounded up to whole seconds.
        assert refused.headers["retry-after"] in ("2", "3")
        assert parse_sf_list(refused.headers["ratelimit"])[0][1]["r"] == 0
        time.sleep(max(0.0, 2.1 - (time.monotonic() - charged_at)))
        repaid = client.get("/complete", params={"tokens": 1}, headers=key)
        assert repaid.status_code == 200


def test_requests_in_flight_together_overshoot_by_their_cost_over_real_http(
    make_backend: Callable[[], Backend],
) -> None:
    """Ten requests of one key, 300 tokens each, all in the app at once on a fresh 1,000-token budget: all pass
    the check, and the key then owes exactly what they cost beyond the quota, 2,000 tokens, and no more."""
    backend = make_backend()
    inside = 0
    everyone_in = asyncio.Event()

    async def slow(request: Request) -> Response:
        nonlocal inside
        inside += 1
        if inside == 10:
            everyone_in.set()
        await asyncio.wait_for(everyone_in.wait(), 10)
        return PlainTextResponse("ok", headers={"x-tokens-used": "300"})

    app = RateLimitMiddleware(
        Starlette(routes=[Route("/slow", slow)], lifespan=closing(backend)),
        rules=[Rule("/slow", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))],
        backend=backend,
        registry=CollectorRegistry(),
        timeout=2.0,
    )

    async def together(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            answers = await asyncio.gather(*(client.get("/slow", headers={"x-key": "k"}) for _ in range(10)))
            return [answer.status_code for answer in answers]

    with serve(app) as url:
        assert asyncio.run(together(url)) == [200] * 10
        refused = httpx.get(f"{url}/slow", headers={"x-key": "k"}, timeout=10)
        assert refused.status_code == 429
        # 2,000 owed and one more token needed, at 3.6 s a token: 7,203.6 s.
        assert refused.headers["retry-after"] == "7204"


@pytest.fixture
def server(redis_server: RedisProcess) -> Iterator[RedisProcess]:
    """The test's own Redis, thawed whatever happens before the fixture stops it."""
    yield redis_server
    if redis_server.process is not None and redis_server.process.poll() is None:
        os.kill(redis_server.process.pid, signal.SIGCONT)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_a_redis_stall_during_a_charge_still_charges_exactly_once(server: RedisProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    loop = asyncio.get_running_loop()

    async def priced(request: Request) -> Response:
        if request.query_params.get("stall"):
            # Frozen once the check has answered: the charge at the response start meets the stall.
            os.kill(pid, signal.SIGSTOP)
            loop.call_later(1.5, os.kill, pid, signal.SIGCONT)
        return PlainTextResponse("ok", headers={"x-tokens-used": "300"})

    rule = Rule("/priced", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    registry = CollectorRegistry()
    backend = RedisBackend.from_url(server.url)
    middleware = RateLimitMiddleware(
        Starlette(routes=[Route("/priced", priced)]), rules=[rule], backend=backend, registry=registry
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://test")
    try:
        assert (await client.get("/priced", headers={"x-key": "warm"})).status_code == 200  # connected, loaded
        started = time.monotonic()
        response = await client.get("/priced?stall=1", headers={"x-key": "k"})
        assert response.status_code == 200
        assert time.monotonic() - started < 1.0  # answered at the budget, not after the stall
        pending = middleware._settler.pending
        assert pending is not None
        await asyncio.wait_for(pending.wait(), 15)
        # Charged once: 300 of 1,000, however many times the charge reached Redis.
        [after], owed = await backend.charge([(rule.identity("k"), GCRA(1000, 3600), 1)], "probe", 10**6)
        assert after.remaining == 699 and owed == 0
        retried = registry.get_sample_value("asgi_ratelimit_charges_total", {"rule": "/priced", "result": "retried"})
        assert retried == 1
    finally:
        os.kill(pid, signal.SIGCONT)
        await client.aclose()
        await backend.aclose()
        admin = Redis.from_url(server.url)
        await admin.flushall()
        await admin.aclose()


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_a_redis_stall_during_a_charge_over_real_http(server: RedisProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    rule = Rule("/priced", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    backend = RedisBackend.from_url(server.url)

    async def priced(request: Request) -> Response:
        if request.query_params.get("stall"):
            os.kill(pid, signal.SIGSTOP)  # the check has answered: the charge meets the stall
            asyncio.get_running_loop().call_later(1.5, os.kill, pid, signal.SIGCONT)
        return PlainTextResponse("ok", headers={"x-tokens-used": "300"})

    app = RateLimitMiddleware(
        Starlette(routes=[Route("/priced", priced)], lifespan=closing(backend)),
        rules=[rule],
        backend=backend,
        registry=CollectorRegistry(),
    )

    async def remaining() -> int:
        probe = RedisBackend.from_url(server.url)
        try:
            [decision] = await probe.check([(rule.identity("k"), GCRA(1000, 3600), 1)])
            return decision.remaining
        except BackendError:
            return -1  # still frozen
        finally:
            await probe.aclose()

    try:
        with serve(app) as url, httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/priced", headers={"x-key": "warm"}).status_code == 200
            started = time.monotonic()
            assert client.get("/priced?stall=1", headers={"x-key": "k"}).status_code == 200
            assert time.monotonic() - started < 1.0  # answered at the budget, not after the stall
            deadline = time.monotonic() + 15
            while asyncio.run(remaining()) != 700:  # the charge arrives once Redis answers again
                assert time.monotonic() < deadline, "the charge was lost"
                time.sleep(0.1)
            time.sleep(1.0)  # a retry still on its way would show now
            assert asyncio.run(remaining()) == 700  # 300 of 1,000: charged exactly once
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
async def test_a_charge_during_an_outage_waits_for_redis_not_the_response(server: RedisProcess) -> None:
    assert server.process is not None
    pid = server.process.pid
    rule = Rule("/priced", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    backend = RedisBackend.from_url(server.url)

    async def priced(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"x-tokens-used": "300"})

    middleware = RateLimitMiddleware(
        Starlette(routes=[Route("/priced", priced)]),
        rules=[rule],
        backend=backend,
        registry=CollectorRegistry(),
        timeout=0.5,  # a response that waited on the frozen Redis would take this long
        breaker_threshold=1,
        breaker_cooldown=30,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://test")
    try:
        assert (await client.get("/priced", headers={"x-key": "warm"})).status_code == 200
        os.kill(pid, signal.SIGSTOP)
        assert (await client.get("/priced", headers={"x-key": "k"})).status_code == 200  # failed open
        assert middleware.limiter.state == "open"
        started = time.monotonic()
        assert (await client.get("/priced", headers={"x-key": "k"})).status_code == 200
        assert time.monotonic() - started < 0.4  # neither the check nor the charge waited on the frozen Redis
        os.kill(pid, signal.SIGCONT)
        pending = middleware._settler.pending
        assert pending is not None
        await asyncio.wait_for(pending.wait(), 15)
        # Both charges arrived, once each, although the breaker stays open for its cooldown.
        [decision] = await backend.check([(rule.identity("k"), GCRA(1000, 3600), 1)])
        assert decision.remaining == 400
    finally:
        os.kill(pid, signal.SIGCONT)
        await client.aclose()
        await backend.aclose()


def test_redis_keys_of_a_charge_share_the_identity_hash_tag() -> None:
    from asgi_ratelimit._keys import digest, ledger_key, state_key

    hashed = digest("rule\x1fk")
    assert ledger_key("rl:", hashed).startswith(state_key("rl:", hashed, GCRA(1, 1)).split("}")[0])
