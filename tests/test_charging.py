"""Rules that count by outcome (counts=) and charge what the response cost (charge=), in process, on both backends.

Backends as an application runs them (MemoryBackend; RedisBackend on the machine's Redis), with the clock moved
by hand where a wait is the point (Redis then in client-clock mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest
from conftest import ManualClock, parse_sf_list
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from test_service import lifespan
from test_uvicorn import serve

import asgi_ratelimit.middleware as middleware_module
from asgi_ratelimit import (
    GCRA,
    Backend,
    BackendError,
    BodyBytes,
    Concurrency,
    ConfigurationError,
    FromState,
    Header,
    MemoryBackend,
    RateLimitMiddleware,
    ResponseHeader,
    Rule,
    TokenBucket,
)
from asgi_ratelimit.backends.base import Charged, Claim, Hit

PASSWORD = "right horse battery staple"


# Charges in debt keep their keys for hours: every test deletes what it wrote to the machine's Redis.
pytestmark = pytest.mark.usefixtures("forget_prefixed_keys")


def login_rule(**extra: Any) -> Rule:
    return Rule(
        "/login",
        "5 per 15 minutes",
        algorithm="sliding_window",  # exact: never a sixth failure in any 15 minutes
        key=Header("x-account"),
        methods=["POST"],
        counts=lambda status: status in (401, 403),
        **extra,
    )


async def login(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse("welcome") if body.decode() == PASSWORD else PlainTextResponse("no", status_code=401)


def tokens_app(**extra: Any) -> Starlette:
    """An LLM-like endpoint: streams its answer and knows the tokens it used only at the end."""

    async def complete(request: Request) -> Response:
        used = int(request.query_params.get("tokens", "100"))

        async def words() -> AsyncIterator[bytes]:
            yield b"thinking... "
            await asyncio.sleep(0)
            request.state.tokens = used  # known once the answer is done
            yield b"done"

        return StreamingResponse(words())

    async def header_priced(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"x-tokens-used": request.query_params.get("tokens", "1")})

    return Starlette(routes=[Route("/complete", complete), Route("/priced", header_priced)], **extra)


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_failed_logins_count_and_right_passwords_never_do(
    mw_clocked_backend: Any, clock: ManualClock, registry: CollectorRegistry
) -> None:
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/login", login, methods=["POST"])]),
        rules=[login_rule()],
        backend=mw_clocked_backend,
        registry=registry,
        timeout=2.0,
    )
    async with client_of(app) as client:
        ann = {"x-account": "ann"}
        for _ in range(20):  # the right password, again and again: never refused, never counted
            assert (await client.post("/login", content=PASSWORD, headers=ann)).status_code == 200
        for attempt in range(5):
            response = await client.post("/login", content="guess", headers=ann)
            assert response.status_code == 401, attempt
        sixth = await client.post("/login", content="guess", headers=ann)
        assert sixth.status_code == 429
        wait = int(sixth.headers["retry-after"])
        assert 0 < wait <= 15 * 60
        # Refused while the window holds, even with the right password (the key is out of quota) ...
        clock.advance(wait - 1)
        assert (await client.post("/login", content=PASSWORD, headers=ann)).status_code == 429
        # ... and let through once the Retry-After has passed.
        clock.advance(1)
        assert (await client.post("/login", content=PASSWORD, headers=ann)).status_code == 200
        # Another account is untouched.
        assert (await client.post("/login", content="guess", headers={"x-account": "bob"})).status_code == 401
    assert registry.get_sample_value("asgi_ratelimit_checks_total", {"rule": "/login", "result": "denied"}) == 2
    assert registry.get_sample_value("asgi_ratelimit_charges_total", {"rule": "/login", "result": "charged"}) == 6


@pytest.mark.redis
async def test_a_flood_of_wrong_passwords_on_a_locked_account_costs_no_round_trips(
    redis_url: str, key_prefix: str
) -> None:
    from redis.asyncio import Redis

    from asgi_ratelimit import RedisBackend

    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/login", login, methods=["POST"])]),
        rules=[login_rule()],
        backend=backend,
        metrics=False,
        timeout=2.0,
    )
    try:
        async with client_of(app) as client:
            ann = {"x-account": "ann"}
            for _ in range(5):
                assert (await client.post("/login", content="guess", headers=ann)).status_code == 401
            assert (await client.post("/login", content="guess", headers=ann)).status_code == 429
            before = backend.round_trips
            for _ in range(20):
                refused = await client.post("/login", content="guess", headers=ann)
                assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            assert backend.round_trips == before  # answered from the deny cache
    finally:
        await backend.aclose()


async def test_a_streamed_cost_known_at_the_end_is_a_debt_repaid_at_the_refill_rate(
    mw_clocked_backend: Any, clock: ManualClock, registry: CollectorRegistry
) -> None:
    # 1,000 tokens per minute, refilled at 1000/60 a second.
    rule = Rule("/complete", TokenBucket(1000, 1000 / 60), key=Header("x-key"), charge=FromState("tokens"))
    app = RateLimitMiddleware(tokens_app(), rules=[rule], backend=mw_clocked_backend, registry=registry, timeout=2.0)
    key = {"x-key": "k1"}
    async with client_of(app) as client:
        first = await client.get("/complete?tokens=1500", headers=key)
        assert first.status_code == 200 and first.text == "thinking... done"
        # Its headers went out before the cost was known: the state then (checked, nothing spent).
        assert parse_sf_list(first.headers["ratelimit"])[0][1]["r"] == 1000
        refused = await client.get("/complete?tokens=1", headers=key)
        assert refused.status_code == 429
        # 500 tokens owed, and one more needed: 501 at 1000/60 per second is 30.06 s, said as 31.
        assert refused.headers["retry-after"] == "31"
        state = parse_sf_list(refused.headers["ratelimit"])[0][1]
        assert state["r"] == 0
        clock.advance(30)
        assert (await client.get("/complete?tokens=1", headers=key)).status_code == 429
        clock.advance(1)
        assert (await client.get("/complete?tokens=1", headers=key)).status_code == 200
    assert registry.get_sample_value("asgi_ratelimit_charges_total", {"rule": "/complete", "result": "in_debt"}) == 1
    assert registry.get_sample_value("asgi_ratelimit_debt_units_total", {"rule": "/complete"}) == 500
    assert registry.get_sample_value("asgi_ratelimit_charged_units_total", {"rule": "/complete"}) == 1501


async def test_a_cost_in_a_response_header_is_charged_at_the_start_and_hidden(
    mw_clocked_backend: Any, registry: CollectorRegistry
) -> None:
    rule = Rule("/priced", GCRA(1000, 60), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    app = RateLimitMiddleware(tokens_app(), rules=[rule], backend=mw_clocked_backend, registry=registry, timeout=2.0)
    async with client_of(app) as client:
        response = await client.get("/priced?tokens=300", headers={"x-key": "k"})
        assert response.status_code == 200 and "x-tokens-used" not in response.headers
        # Known at the start: the headers show the state after the charge.
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 700
        response = await client.get("/priced?tokens=900", headers={"x-key": "k"})
        assert response.status_code == 200  # checked with 700 left: it may spend more than that
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 0
        assert (await client.get("/priced?tokens=1", headers={"x-key": "k"})).status_code == 429


async def test_an_estimate_is_spent_up_front_and_the_excess_after(mw_clocked_backend: Any) -> None:
    rule = Rule(
        "/priced", TokenBucket(100, 1), key=Header("x-key"), cost=10, charge=ResponseHeader("x-tokens-used", keep=True)
    )
    app = RateLimitMiddleware(tokens_app(), rules=[rule], backend=mw_clocked_backend, timeout=2.0, metrics=False)
    async with client_of(app) as client:
        response = await client.get("/priced?tokens=25", headers={"x-key": "k"})
        assert response.headers["x-tokens-used"] == "25"
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 75  # 10 up front, 15 after
        response = await client.get("/priced?tokens=3", headers={"x-key": "k"})
        # A smaller cost: 10 spent up front, 7 given back after.
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 72


async def test_an_estimate_stands_when_the_app_reports_no_cost(mw_clocked_backend: Any) -> None:
    async def silent(request: Request) -> Response:
        return PlainTextResponse("ok", headers={"x-tokens-used": request.query_params.get("tokens", "")})

    rule = Rule("/silent", TokenBucket(100, 1), key=Header("x-key"), cost=10, charge=ResponseHeader("x-tokens-used"))
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/silent", silent)]),
        rules=[rule],
        backend=mw_clocked_backend,
        metrics=False,
        timeout=2.0,
    )
    async with client_of(app) as client:
        for query, left in (("", 90), ("?tokens=lots", 80), ("?tokens=-3", 70)):
            response = await client.get(f"/silent{query}", headers={"x-key": "k"})
            assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == left, query


async def test_an_estimate_is_given_back_when_the_response_does_not_count(mw_clocked_backend: Any) -> None:
    async def model(request: Request) -> Response:
        status = int(request.query_params.get("status", "200"))
        return PlainTextResponse("answer", status_code=status, headers={"x-tokens-used": "4"})

    rule = Rule(
        "/model",
        TokenBucket(100, 1),
        key=Header("x-key"),
        cost=10,
        charge=ResponseHeader("x-tokens-used"),
        counts=lambda status: status < 500,  # the model failing costs the client nothing
    )
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/model", model)]), rules=[rule], backend=mw_clocked_backend, timeout=2.0, metrics=False
    )
    async with client_of(app) as client:
        response = await client.get("/model", headers={"x-key": "k"})
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 96  # 10 up front, 6 back
        response = await client.get("/model?status=503", headers={"x-key": "k"})
        assert response.status_code == 503
        assert parse_sf_list(response.headers["ratelimit"])[0][1]["r"] == 96  # 10 up front, 10 back


async def test_body_bytes_are_charged_as_sent(mw_clocked_backend: Any) -> None:
    async def blob(request: Request) -> Response:
        return PlainTextResponse("x" * 600)

    rule = Rule("/blob", "1000 per minute", algorithm="fixed_window", key=Header("x-key"), charge=BodyBytes())
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/blob", blob)]), rules=[rule], backend=mw_clocked_backend, timeout=2.0, metrics=False
    )
    async with client_of(app) as client:
        assert (await client.get("/blob", headers={"x-key": "k"})).status_code == 200
        assert (await client.get("/blob", headers={"x-key": "k"})).status_code == 200  # 400 left: may overshoot
        assert (await client.get("/blob", headers={"x-key": "k"})).status_code == 429  # 1,200 of 1,000 spent


async def test_a_failing_app_is_counted_as_a_500_with_the_bytes_it_sent(mw_clocked_backend: Any) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/half":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"y" * 700, "more_body": True})
        raise RuntimeError("the app broke")

    server_errors = Rule("/boom", "2 per minute", key=Header("x-key"), counts=lambda status: status >= 500)
    sent = Rule("/half", "1000 per minute", algorithm="fixed_window", key=Header("x-key"), charge=BodyBytes())
    app = RateLimitMiddleware(
        broken, rules=[server_errors, sent], backend=mw_clocked_backend, timeout=2.0, metrics=False
    )
    async with client_of(app) as client:
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await client.get("/boom", headers={"x-key": "k"})
        assert (await client.get("/boom", headers={"x-key": "k"})).status_code == 429
        with pytest.raises(RuntimeError):
            await client.get("/half", headers={"x-key": "k"})
        with pytest.raises(RuntimeError):
            await client.get("/half", headers={"x-key": "k"})  # 700 of 1,000 spent: still allowed
        assert (await client.get("/half", headers={"x-key": "k"})).status_code == 429


async def test_concurrent_requests_overshoot_by_no_more_than_their_cost_in_flight(mw_backend: Any) -> None:
    """Ten requests of one key in flight together, each costing 300 of 1,000: all pass the check, and the key
    owes at most what they cost together beyond the quota."""
    gate = asyncio.Event()
    inside = 0

    async def slow(request: Request) -> Response:
        nonlocal inside
        inside += 1
        if inside == 10:
            gate.set()
        await gate.wait()
        return PlainTextResponse("ok", headers={"x-tokens-used": "300"})

    rule = Rule("/slow", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/slow", slow)]), rules=[rule], backend=mw_backend, timeout=2.0, metrics=False
    )
    async with client_of(app) as client:
        answers = await asyncio.wait_for(
            asyncio.gather(*(client.get("/slow", headers={"x-key": "k"}) for _ in range(10))), 10
        )
        assert [answer.status_code for answer in answers] == [200] * 10
    # The key owes 3,000 - 1,000 = 2,000: the ten costs beyond the quota, and no more (the probe adds its 1).
    _, owed = await mw_backend.charge([(rule.identity("k"), rule.static.policies[0], 1)], "probe", 10**6)
    assert owed == 2001


async def test_a_concurrency_rule_beside_a_charging_one_bounds_the_requests_in_flight(mw_backend: Any) -> None:

    release = asyncio.Event()
    inside = 0

    async def held(request: Request) -> Response:
        nonlocal inside
        inside += 1
        await release.wait()
        inside -= 1
        return PlainTextResponse("ok", headers={"x-tokens-used": "100"})

    tokens = Rule("/held", GCRA(1000, 3600), key=Header("x-key"), charge=ResponseHeader("x-tokens-used"))
    in_flight = Rule("/held", Concurrency(2, timeout=60), key=Header("x-key"), name="in-flight")
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/held", held)]),
        rules=[tokens, in_flight],
        backend=mw_backend,
        timeout=2.0,
        metrics=False,
    )
    key = {"x-key": "k"}
    async with client_of(app) as client:
        running = [asyncio.ensure_future(client.get("/held", headers=key)) for _ in range(2)]
        for _ in range(200):
            if inside == 2:
                break
            await asyncio.sleep(0.01)
        assert inside == 2
        third = await client.get("/held", headers=key)
        assert third.status_code == 429  # no slot: the two in flight bound the overshoot to their cost
        release.set()
        answers = await asyncio.gather(*running)
        assert [answer.status_code for answer in answers] == [200, 200]
        policy = answers[0].headers["ratelimit-policy"]
        assert policy.startswith('"/held";') and '"in-flight";q=2' in policy
        # The slots came back, and the two charges were taken: 200 of 1,000.
        after = await client.get("/held", headers=key)
        assert after.status_code == 200
        state = dict(parse_sf_list(after.headers["ratelimit"]))
        assert state["/held"]["r"] == 700  # charged at the start: the third charge shows


def test_bad_configuration_names_the_rule_and_the_value() -> None:
    with pytest.raises(ConfigurationError, match=r"Rule '/login'.*counts.*'yes'"):
        Rule("/login", "5/minute", counts="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"Rule '/x'.*charge.*'x-tokens'"):
        Rule("/x", "5/minute", charge="x-tokens")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"Rule '/x'.*3 arguments"):
        Rule("/x", "5/minute", counts=lambda a, b, c: True)  # type: ignore[arg-type,misc]
    with pytest.raises(ConfigurationError, match="not an HTTP header name"):
        ResponseHeader("x tokens")
    with pytest.raises(ConfigurationError, match="Concurrency"):
        from asgi_ratelimit import Concurrency

        Rule("/x", ["5/minute", Concurrency(2, timeout=60)], counts=lambda status: True)


class PlainBackend(Backend):
    """A Backend that can only hit: no check, no charge."""

    async def hit(self, key: str, policies: Any, cost: int = 1) -> list[Any]:
        return []

    async def hit_many(self, hits: Any) -> list[Any]:
        return []

    async def acquire(self, hits: Any, claims: Any, token: str) -> list[Any]:
        return []

    async def release(self, claims: Any, token: str) -> None:
        return None

    async def reset(self, key: str, policies: Any) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return "PlainBackend()"


def test_a_backend_that_cannot_charge_is_refused_for_a_charging_rule() -> None:
    with pytest.raises(ConfigurationError, match=r"Rule '/login'.*check\(\) and charge\(\).*PlainBackend\(\)"):
        RateLimitMiddleware(tokens_app(), rules=[login_rule()], backend=PlainBackend(), metrics=False)
    RateLimitMiddleware(tokens_app(), rules=[Rule("/x", "1/second")], backend=PlainBackend(), metrics=False)


def test_counts_may_read_the_headers() -> None:
    rule = Rule("/x", "5/minute", counts=lambda status, headers: headers.get("x-cache") != "hit")
    assert rule.settlement is not None and rule.settlement.counts is not None
    from starlette.datastructures import Headers

    assert rule.settlement.counts(200, Headers({"x-cache": "miss"}))
    assert not rule.settlement.counts(200, Headers({"x-cache": "hit"}))


def test_the_metrics_of_a_charging_rule_are_exported_at_zero(registry: CollectorRegistry) -> None:
    RateLimitMiddleware(tokens_app(), rules=[login_rule()], registry=registry)
    for name, result in (("checks", "denied"), ("charges", "lost"), ("charges", "retried")):
        sample = registry.get_sample_value(f"asgi_ratelimit_{name}_total", {"rule": "/login", "result": result})
        assert sample == 0
    assert registry.get_sample_value("asgi_ratelimit_debt_units_total", {"rule": "/login"}) == 0


async def test_a_counting_rule_on_the_default_backend() -> None:
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/login", login, methods=["POST"])]), rules=[login_rule()], metrics=False
    )
    assert isinstance(app.backend, MemoryBackend)
    async with client_of(app) as client:
        statuses = [
            (await client.post("/login", content="guess", headers={"x-account": "a"})).status_code for _ in range(6)
        ]
    assert statuses == [401] * 5 + [429]


# -- what is still owed at shutdown ---------------------------------------------------------------


class Blipping(MemoryBackend):
    """Fails its first ``failures`` charges and slot releases, as Redis does through a blip; counts what it took."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.charged = self.released = 0

    def _blip(self) -> None:
        if self.failures:
            self.failures -= 1
            raise BackendError("Redis failed: ConnectionError: Connection reset by peer")

    async def charge(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        self._blip()
        self.charged += 1
        return await super().charge(hits, token, remember_us)

    async def release(self, claims: Sequence[Claim], token: str) -> None:
        self._blip()
        self.released += 1
        await super().release(claims, token)


def app_with_shutdown(backend: Blipping, seen_at_shutdown: list[tuple[int, int]]) -> RateLimitMiddleware:
    """A login route (counted by outcome) and a route holding a slot; the app's own shutdown notes what was taken."""

    @contextlib.asynccontextmanager
    async def app_lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        seen_at_shutdown.append((backend.charged, backend.released))  # where an app would close its backend

    held = Rule("/held", Concurrency(2, timeout=60), key=Header("x-key"), name="in-flight")
    routes = [Route("/login", login, methods=["POST"]), Route("/held", ok)]
    return RateLimitMiddleware(
        Starlette(routes=routes, lifespan=app_lifespan), rules=[login_rule(), held], backend=backend, metrics=False
    )


async def ok(request: Request) -> Response:
    return PlainTextResponse("ok")


async def a_wrong_password_and_a_held_slot(app: RateLimitMiddleware, backend: Blipping) -> None:
    async with client_of(app) as client:
        assert (await client.post("/login", content="guess", headers={"x-account": "a"})).status_code == 401
        assert (await client.get("/held", headers={"x-key": "k"})).status_code == 200
    assert (backend.charged, backend.released) == (0, 0)  # both failed at once: they are being retried


async def test_what_is_owed_at_shutdown_is_sent_before_the_app_shuts_down() -> None:
    # Eight failures: the retries (after 0.02, 0.04, ... 0.5 s) are still at it when the shutdown comes.
    backend = Blipping(failures=8)
    seen_at_shutdown: list[tuple[int, int]] = []
    app = app_with_shutdown(backend, seen_at_shutdown)

    sent = await lifespan(app, lambda: a_wrong_password_and_a_held_slot(app, backend))

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen_at_shutdown == [(1, 1)]


def test_what_is_owed_is_sent_before_uvicorn_shuts_the_app_down() -> None:
    backend = Blipping(failures=8)
    seen_at_shutdown: list[tuple[int, int]] = []
    app = app_with_shutdown(backend, seen_at_shutdown)
    with serve(app) as base, httpx.Client(base_url=base) as client:
        assert client.post("/login", content="guess", headers={"x-account": "a"}).status_code == 401
        assert client.get("/held", headers={"x-key": "k"}).status_code == 200
        assert (backend.charged, backend.released) == (0, 0)
    assert seen_at_shutdown == [(1, 1)]


async def test_a_shutdown_waits_for_what_is_owed_no_longer_than_its_grace(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(middleware_module, "SHUTDOWN_GRACE", 0.3)
    backend = Blipping(failures=1_000_000)  # Redis stays down
    seen_at_shutdown: list[tuple[int, int]] = []
    app = app_with_shutdown(backend, seen_at_shutdown)

    with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
        sent = await lifespan(app, lambda: a_wrong_password_and_a_held_slot(app, backend))

    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen_at_shutdown == [(0, 0)]
    assert (
        "shutting down with 2 charges or slot releases the backend has not taken after 0.3 s; "
        "they are lost when the process exits"
    ) in caplog.text
    # This test's event loop goes on: once Redis is back the retries deliver both (within a few of their pauses).
    backend.failures = 0
    for _ in range(100):
        if (backend.charged, backend.released) == (1, 1):
            break
        await asyncio.sleep(0.05)
    assert (backend.charged, backend.released) == (1, 1)


async def test_a_shutdown_with_nothing_owed_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    backend = Blipping(failures=0)
    seen_at_shutdown: list[tuple[int, int]] = []
    app = app_with_shutdown(backend, seen_at_shutdown)
    with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
        await lifespan(app, lambda: a_wrong_password_and_a_held_slot_taken(app))
    assert seen_at_shutdown == [(1, 1)]
    assert "shutting down" not in caplog.text


async def a_wrong_password_and_a_held_slot_taken(app: RateLimitMiddleware) -> None:
    async with client_of(app) as client:
        assert (await client.post("/login", content="guess", headers={"x-account": "a"})).status_code == 401
        assert (await client.get("/held", headers={"x-key": "k"})).status_code == 200
