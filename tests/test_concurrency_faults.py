"""Concurrency slots under Redis faults: a stall longer than the budget, and an outage that opens the breaker.

A redis-server of the test's own is frozen (SIGSTOP) and thawed (SIGCONT), as in test_faults.py.
Whatever happened while it was frozen, once it answers again no slot may stay held by a request
that is not running: each test asks for that within a few seconds, far inside the 60 s lease, so
no slot can pass by expiring.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import RedisProcess
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from asgi_ratelimit import Concurrency, RateLimitMiddleware, RedisBackend, Rule
from asgi_ratelimit._keys import digest, slots_key

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    # redis-py drops the socket of a command cut short by a frozen server without closing it; the
    # garbage collector closes it later (as in test_faults.py).
    pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
]

LEASE = 60.0
RECOVERED_WITHIN = 5.0  # seconds after Redis answers again; the lease is twelve times longer
SEPARATOR = "\x1f"


class Held:
    """An endpoint that holds requests until released, counting those inside."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inside = 0

    async def endpoint(self, request: Request) -> PlainTextResponse:
        self.inside += 1
        try:
            if request.query_params.get("hold"):
                await self.release.wait()
            return PlainTextResponse("ok")
        finally:
            self.inside -= 1


@pytest.fixture
def server(redis_server: RedisProcess) -> Iterator[RedisProcess]:
    """The test's own Redis, thawed whatever happens before the fixture stops it."""
    yield redis_server
    if redis_server.process is not None and redis_server.process.poll() is None:
        os.kill(redis_server.process.pid, signal.SIGCONT)


def setup(server: RedisProcess, limit: int) -> tuple[Held, RateLimitMiddleware, httpx.AsyncClient]:
    held = Held()
    app = Starlette(routes=[Route("/work", held.endpoint)])
    middleware = RateLimitMiddleware(
        app,
        backend=RedisBackend.from_url(server.url),
        rules=[Rule("/work", Concurrency(limit, timeout=LEASE), key=lambda request: "tenant", name="work")],
        registry=CollectorRegistry(),
        breaker_cooldown=0.5,
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://test")
    return held, middleware, client


async def held_slots(server: RedisProcess) -> int:
    """Slots taken (scored by the end of their lease, above zero); tombstones are scored below zero."""
    admin = Redis.from_url(server.url)
    try:
        return int(await admin.zcount(slots_key("rl:", digest("work" + SEPARATOR + "tenant")), "(0", "+inf"))
    finally:
        await admin.aclose()


async def until(condition: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``condition`` holds; fails after ``within``."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def freeze(server: RedisProcess) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)


def thaw(server: RedisProcess) -> None:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGCONT)


async def no_slot_held_but_by(server: RedisProcess, held: Held) -> bool:
    return await held_slots(server) == held.inside


async def test_a_stall_during_acquires_leaves_no_slot_behind(server: RedisProcess) -> None:
    held, middleware, client = setup(server, limit=1)
    try:
        assert (await client.get("/work")).status_code == 200  # connected, scripts loaded
        freeze(server)
        try:
            # Each acquire is abandoned at the 50 ms budget and the request runs without a slot
            # (fail open); the acquires are still on their way to Redis.
            stalled = await asyncio.gather(*(client.get("/work") for _ in range(3)))
            await asyncio.sleep(0.2)
        finally:
            thaw(server)
        assert [r.status_code for r in stalled] == [200] * 3
        assert "ratelimit" not in stalled[0].headers  # undecided: failed open
        waited = await until(lambda: no_slot_held_but_by(server, held), RECOVERED_WITHIN)
        print(f"slots free {waited * 1000:.0f} ms after Redis answered again")
        await asyncio.sleep(0.6)  # the breaker's cooldown, should the stall have opened it
        assert (await client.get("/work")).status_code == 200
        assert await held_slots(server) == 0
    finally:
        await client.aclose()
        await middleware.limiter.releases.wait()
        await middleware.backend.aclose()


async def test_a_stall_during_releases_leaves_no_slot_behind(server: RedisProcess) -> None:
    held, middleware, client = setup(server, limit=2)
    try:
        running = [asyncio.ensure_future(client.get("/work?hold=1")) for _ in range(2)]
        await until(lambda: _true(held.inside == 2), 5)
        assert await held_slots(server) == 2
        freeze(server)
        try:
            held.release.set()
            # The releases are abandoned at the budget: the responses do not wait for Redis.
            done = await asyncio.wait_for(asyncio.gather(*running), 2.0)
            await asyncio.sleep(1.0)  # longer than the 0.5 s socket timeout: the first attempts fail
        finally:
            thaw(server)
        assert [r.status_code for r in done] == [200, 200]
        waited = await until(lambda: no_slot_held_but_by(server, held), RECOVERED_WITHIN)
        print(f"slots free {waited * 1000:.0f} ms after Redis answered again")
        again = await asyncio.gather(*(client.get("/work") for _ in range(2)))
        assert [r.status_code for r in again] == [200, 200]
        retried = middleware.registry.get_sample_value(
            "asgi_ratelimit_slot_release_retries_total", {"result": "released"}
        )
        assert retried == 2
    finally:
        await client.aclose()
        await middleware.limiter.releases.wait()
        await middleware.backend.aclose()


async def test_an_outage_that_opens_the_breaker_leaves_no_slot_behind(server: RedisProcess) -> None:
    held, middleware, client = setup(server, limit=3)
    try:
        running = [asyncio.ensure_future(client.get("/work?hold=1")) for _ in range(2)]
        await until(lambda: _true(held.inside == 2), 5)
        freeze(server)
        try:
            # Failures open the breaker: the later requests are not even sent (and fail open).
            for _ in range(8):
                await client.get("/work")
            assert middleware.limiter.state == "open"
            # The two running requests end while the breaker is open: their releases go out anyway.
            held.release.set()
            done = await asyncio.wait_for(asyncio.gather(*running), 2.0)
            await asyncio.sleep(1.0)
        finally:
            thaw(server)
        assert [r.status_code for r in done] == [200, 200]
        waited = await until(lambda: no_slot_held_but_by(server, held), RECOVERED_WITHIN)
        print(f"slots free {waited * 1000:.0f} ms after Redis answered again")
        await asyncio.sleep(0.6)  # the breaker lets a probe through after its cooldown
        statuses = [(await client.get("/work")).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        assert middleware.limiter.state == "closed"
        assert await held_slots(server) == 0
    finally:
        await client.aclose()
        await middleware.limiter.releases.wait()
        await middleware.backend.aclose()


async def _true(value: Any) -> bool:
    return bool(value)
