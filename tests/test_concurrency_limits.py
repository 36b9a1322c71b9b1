"""Concurrency limits: at most N requests in flight per key, slots always given back, crashed slots expire."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import http_sfv
import httpx
import pytest
from conftest import ManualClock, RedisProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_ratelimit import (
    Backend,
    BackendError,
    Concurrency,
    ConfigurationError,
    FixedWindow,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
)
from asgi_ratelimit._keys import digest, slots_key
from asgi_ratelimit._limiter import Limiter

SEPARATOR = "\x1f"  # between the rule's name and the key in the identity the backend hashes


@pytest.fixture
def backend(mw_backend: Any) -> Any:
    """MemoryBackend, or RedisBackend on the machine's Redis (conftest's ``mw_backend``)."""
    return mw_backend


async def slots_in_use(backend: Any, rule: str, key: str) -> int:
    name = slots_key(backend.prefix, digest(rule + SEPARATOR + key))
    if isinstance(backend, MemoryBackend):
        entry = backend._store.get(name)
        return 0 if entry is None else len(entry[1])
    return int(await backend.client.zcount(name, "(0", "+inf"))  # taken slots; tombstones score below zero


class Gate:
    """An endpoint that holds every request until the test opens the gate, counting those inside."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.inside = 0
        self.most_inside = 0

    async def endpoint(self, request: Request) -> JSONResponse:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            if request.query_params.get("fail"):
                raise RuntimeError("the endpoint failed")
            await self.open.wait()
            return JSONResponse({"ok": True})
        finally:
            self.inside -= 1


def build(gate: Gate, backend: Any, limits: Any) -> Starlette:
    app = Starlette(routes=[Route("/work", gate.endpoint)])
    app.add_middleware(
        RateLimitMiddleware,
        backend=backend,
        rules=[Rule("/work", limits, key=lambda request: "tenant", name="work")],
        timeout=2.0,
        registry=CollectorRegistry(),  # metrics on: each test's decisions are counted on its own registry
    )
    return app


def decisions_counted(app: Starlette) -> dict[str, float]:
    """asgi_ratelimit_decisions_total of rule "work", by result (the middleware is built on the first request)."""
    middleware = app.middleware_stack
    while not isinstance(middleware, RateLimitMiddleware):
        middleware = middleware.app  # type: ignore[union-attr]
    counts = {}
    for result in ("allowed", "denied", "dry_run_denied", "failed_open", "failed_closed"):
        value = middleware.registry.get_sample_value(
            "asgi_ratelimit_decisions_total", {"rule": "work", "result": result}
        )
        if value:
            counts[result] = value
    return counts


async def settle(condition: Any, rounds: int = 400) -> None:
    for _ in range(rounds):
        if await condition():
            return
        await asyncio.sleep(0.005)


async def test_never_more_than_the_limit_in_flight_and_no_slot_leaks(backend: Any) -> None:
    gate = Gate()
    app = build(gate, backend, Concurrency(3, timeout=30))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        pending = [asyncio.ensure_future(client.get("/work")) for _ in range(10)]
        await settle(lambda: _true_when(sum(task.done() for task in pending) == 7))
        assert gate.inside == 3
        refused = [task.result() for task in pending if task.done()]
        assert [r.status_code for r in refused] == [429] * 7
        for response in refused:
            assert response.headers["retry-after"] == "1"
            policy = http_sfv.List()
            policy.parse(response.headers["ratelimit-policy"].encode())
            item = policy[0]
            assert item.value == "work"
            assert item.params["q"] == 3
            assert item.params["qu"] == "concurrent-requests"
        gate.open.set()
        served = await asyncio.gather(*[task for task in pending if not task.done()])
    assert [r.status_code for r in served] == [200] * 3
    assert gate.most_inside == 3
    assert decisions_counted(app) == {"allowed": 3, "denied": 7}  # one decision per request
    await settle(lambda: _zero(backend))
    assert await slots_in_use(backend, "work", "tenant") == 0
    # The slots are back: the next three get in again.
    gate2 = Gate()
    gate2.open.set()
    app2 = build(gate2, backend, Concurrency(3, timeout=30))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app2), base_url="http://test") as client:
        again = await asyncio.gather(*(client.get("/work") for _ in range(3)))
    assert [r.status_code for r in again] == [200] * 3


async def _true_when(value: bool) -> bool:
    return value


async def test_a_slot_is_released_when_the_app_raises(backend: Any) -> None:
    gate = Gate()
    app = build(gate, backend, Concurrency(1, timeout=30))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        failed = await client.get("/work?fail=1")
        assert failed.status_code == 500
        await settle(lambda: _zero(backend))
        gate.open.set()
        after = await client.get("/work")
    assert after.status_code == 200


async def _zero(backend: Any) -> bool:
    return await slots_in_use(backend, "work", "tenant") == 0


async def test_a_slot_is_released_when_the_client_goes_away(backend: Any) -> None:
    gate = Gate()
    app = build(gate, backend, Concurrency(1, timeout=30))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never sends anything more
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/work", "raw_path": b"/work", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test")], "client": ("127.0.0.1", 5000), "server": ("test", 80),
    }  # fmt: skip
    call = asyncio.ensure_future(app(scope, receive, send))
    await settle(lambda: _true_when(gate.inside == 1))
    assert await slots_in_use(backend, "work", "tenant") == 1
    call.cancel()  # what a server does when the connection drops
    with pytest.raises(asyncio.CancelledError):
        await call
    # Given back before the cancelled call returned, not some time later.
    assert await slots_in_use(backend, "work", "tenant") == 0


async def test_a_crashed_process_slot_expires_after_the_timeout(backend: Any) -> None:
    claim = [("work" + SEPARATOR + "tenant", Concurrency(1, timeout=0.2))]
    [taken] = await backend.acquire([], claim, "first")
    assert taken.allowed and taken.remaining == 0
    [refused] = await backend.acquire([], claim, "second")
    assert not refused.allowed and refused.remaining == 0 and 0 < refused.retry_after <= 0.2
    await asyncio.sleep(0.3)  # the process that took the slot "crashed": nobody releases it
    [later] = await backend.acquire([], claim, "third")
    assert later.allowed and later.remaining == 0


@pytest.mark.redis
async def test_the_slots_key_expires_in_redis(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    try:
        await backend.acquire([], [("someone", Concurrency(5, timeout=10))], "a-token")
        ttl = await backend.client.pttl(slots_key(key_prefix, digest("someone")))
        assert 0 < ttl <= 10_000
    finally:
        await backend.aclose()


async def test_a_rate_limit_and_a_concurrency_limit_on_one_rule(backend: Any) -> None:
    gate = Gate()
    gate.open.set()
    app = build(gate, backend, ["2/minute", Concurrency(5, timeout=30)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        responses = [await client.get("/work") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    policy = http_sfv.List()
    policy.parse(responses[0].headers["ratelimit-policy"].encode())
    assert [item.value for item in policy] == ["work", "work:concurrency"]
    state = http_sfv.List()
    state.parse(responses[0].headers["ratelimit"].encode())
    assert state[1].params["r"] == 4  # this request holds one of the five slots
    await settle(lambda: _zero(backend))


def test_two_concurrency_limits_on_one_rule_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="only one Concurrency"):
        Rule("/x", [Concurrency(1, 1), Concurrency(2, 1)])


@pytest.mark.parametrize("bad", [{"limit": 0, "timeout": 1}, {"limit": 1, "timeout": 0}, {"limit": "1", "timeout": 1}])
def test_bad_concurrency_settings_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Concurrency(**bad)


async def test_a_sequential_client_is_never_refused_by_its_own_finished_request(backend: Any) -> None:
    gate = Gate()
    gate.open.set()
    app = build(gate, backend, Concurrency(1, timeout=30))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        statuses = [(await client.get("/work")).status_code for _ in range(100)]
    assert statuses == [200] * 100


async def test_the_slot_is_free_before_the_asgi_call_returns(backend: Any) -> None:
    gate = Gate()
    gate.open.set()
    app = build(gate, backend, Concurrency(1, timeout=30))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for _ in range(5):
        await app(http_scope(), receive, send)
        # Not one turn of the event loop in between: nothing left in the background may still hold it.
        assert await slots_in_use(backend, "work", "tenant") == 0
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 5


def http_scope() -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": "/work", "raw_path": b"/work", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test")], "client": ("127.0.0.1", 5000), "server": ("test", 80),
    }  # fmt: skip


async def test_a_request_refused_for_concurrency_spends_no_rate_limit(backend: Any) -> None:
    gate = Gate()
    app = build(gate, backend, ["3/minute", Concurrency(1, timeout=30)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        holder = asyncio.ensure_future(client.get("/work"))
        await settle(lambda: _true_when(gate.inside == 1))
        refused = [await client.get("/work") for _ in range(2)]
        assert [r.status_code for r in refused] == [429, 429]
        assert [state_of(r) for r in refused] == [{"work": 2, "work:concurrency": 0}] * 2
        gate.open.set()
        assert (await holder).status_code == 200
        after = [await client.get("/work") for _ in range(3)]
    # Three served in all, as the limit says: the two refused took nothing from it.
    assert [r.status_code for r in after] == [200, 200, 429]
    assert [state_of(r)["work"] for r in after] == [1, 0, 0]
    assert decisions_counted(app) == {"allowed": 3, "denied": 3}


async def test_a_request_refused_by_a_rate_limit_takes_no_slot(backend: Any) -> None:
    gate = Gate()
    app = build(gate, backend, ["1/minute", Concurrency(2, timeout=30)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        holder = asyncio.ensure_future(client.get("/work"))
        await settle(lambda: _true_when(gate.inside == 1))
        refused = await client.get("/work")
        assert refused.status_code == 429
        assert state_of(refused) == {"work": 0, "work:concurrency": 1}
        assert await slots_in_use(backend, "work", "tenant") == 1
        gate.open.set()
        assert (await holder).status_code == 200
    assert await slots_in_use(backend, "work", "tenant") == 0


def state_of(response: httpx.Response) -> dict[str, int]:
    """Each RateLimit item's remaining quota, by name."""
    state = http_sfv.List()
    state.parse(response.headers["ratelimit"].encode())
    return {item.value: item.params["r"] for item in state}


class TestOneCall:
    """The rate limits and the slots are decided in one call, in memory and on Redis: all taken, or none."""

    CLAIM = "rule" + SEPARATOR + "someone"

    async def test_a_refused_slot_takes_nothing_from_the_rate_limits(self, backend: Any) -> None:
        hits = [(self.CLAIM, FixedWindow(5, 60), 1), (self.CLAIM, TokenBucket(5, 1), 2)]
        claim = [(self.CLAIM, Concurrency(1, timeout=30))]
        first = await backend.acquire(hits, claim, "first")
        assert [d.allowed for d in first] == [True, True, True]
        assert [d.remaining for d in first] == [4, 3, 0]
        for token in ("second", "third"):
            refused = await backend.acquire(hits, claim, token)
            assert [d.allowed for d in refused] == [True, True, False]
            assert [d.remaining for d in refused] == [4, 3, 0]  # as they stand: nothing taken
        await backend.release(claim, "first")
        again = await backend.acquire(hits, claim, "fourth")
        assert [d.remaining for d in again] == [3, 1, 0]

    async def test_a_refused_rate_limit_takes_no_slot(self, backend: Any) -> None:
        hits = [(self.CLAIM, FixedWindow(1, 60), 1)]
        claim = [(self.CLAIM, Concurrency(3, timeout=30))]
        assert [d.remaining for d in await backend.acquire(hits, claim, "first")] == [0, 2]
        refused = await backend.acquire(hits, claim, "second")
        assert [d.allowed for d in refused] == [False, True]
        assert [d.remaining for d in refused] == [0, 2]
        # Without the rate limit the slots show it: one in use, not two.
        assert [d.remaining for d in await backend.acquire([], claim, "third")] == [1]

    async def test_a_release_that_comes_first_bars_the_late_acquire(self, backend: Any) -> None:
        hits = [(self.CLAIM, FixedWindow(5, 60), 1)]
        claim = [(self.CLAIM, Concurrency(1, timeout=30))]
        await backend.release(claim, "late")  # the request gave up; its acquire is still on its way
        late = await backend.acquire(hits, claim, "late")
        if isinstance(backend, MemoryBackend):
            # In memory an acquire is decided when called: none can arrive late, and none is barred.
            assert [d.allowed for d in late] == [True, True]
            return
        assert [d.allowed for d in late] == [True, False]
        assert [d.remaining for d in late] == [5, 1]  # nothing taken
        assert [d.allowed for d in await backend.acquire(hits, claim, "next")] == [True, True]


@pytest.mark.redis
async def test_a_request_with_a_slot_costs_one_round_trip_to_decide(redis_server: RedisProcess) -> None:
    """Seen by Redis itself (MONITOR): one script call decides the rate limit and the slot, one gives it back."""
    backend = RedisBackend.from_url(redis_server.url)
    gate = Gate()
    gate.open.set()
    app = build(gate, backend, ["100/minute", Concurrency(2, timeout=30)])
    watcher = Redis.from_url(redis_server.url)
    admin = Redis.from_url(redis_server.url)
    commands: list[str] = []
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            await client.get("/work")  # loads the scripts
            before = backend.round_trips
            async with watcher.monitor() as monitor:
                await monitor.connect()
                await admin.echo("start")
                while (await monitor.next_command())["command"] != "ECHO start":
                    pass
                statuses = [(await client.get("/work")).status_code for _ in range(20)]
                await admin.echo("end")
                while True:
                    seen = await monitor.next_command()
                    if seen["command"] == "ECHO end":
                        break
                    if seen["client_type"] != "lua":  # a script's own commands are not round trips
                        commands.append(seen["command"].split(" ", 1)[0])
    finally:
        await admin.aclose()
        await watcher.aclose()
        await backend.aclose()
    assert statuses == [200] * 20
    assert backend.round_trips - before == 20  # one decision per request
    assert commands == ["EVALSHA"] * 40  # per request: the decision, then the release; nothing else


class FlakyReleases(MemoryBackend):
    """MemoryBackend whose first ``failures`` releases fail, as a Redis that cannot be reached."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    async def release(self, claims: Any, token: str) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise BackendError("unreachable")
        await super().release(claims, token)


@pytest.mark.parametrize(("failures", "result"), [(3, "released"), (10_000, "expired")])
async def test_a_failed_release_is_retried_until_it_succeeds_or_its_lease_ends(
    failures: int, result: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FlakyReleases(failures)
    limiter = Limiter(backend, registry=CollectorRegistry())
    claims = [("someone", Concurrency(1, timeout=0.5))]
    [taken] = await limiter.acquire([], claims, "token")
    assert taken.allowed
    await limiter.release(claims, "token")  # fails within the budget, and is handed to the retries
    await limiter.releases.wait()
    if result == "released":
        assert backend.attempts == failures + 1
    else:
        assert backend.attempts >= 4  # tried again and again, then given up
    counted = limiter.registry.get_sample_value("asgi_ratelimit_slot_release_retries_total", {"result": result})
    assert counted == 1
    [again] = await limiter.acquire([], claims, "next")
    assert again.allowed  # released, or expired at the end of its lease
    if result == "expired":
        assert "given up at the end of its lease" in caplog.text


async def test_a_refused_request_in_a_dry_run_is_counted_once(backend: Any) -> None:
    gate = Gate()
    app = Starlette(routes=[Route("/work", gate.endpoint)])
    app.add_middleware(
        RateLimitMiddleware,
        backend=backend,
        rules=[Rule("/work", ["5/minute", Concurrency(1, timeout=30)], key=lambda request: "tenant", name="work")],
        timeout=2.0,
        dry_run=True,
        registry=CollectorRegistry(),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        holder = asyncio.ensure_future(client.get("/work"))
        await settle(lambda: _true_when(gate.inside == 1))
        # The slot is held: this one is refused, but a dry run lets it through (holding no slot).
        second = asyncio.ensure_future(client.get("/work"))
        await settle(lambda: _true_when(gate.inside == 2))
        gate.open.set()
        assert [r.status_code for r in await asyncio.gather(holder, second)] == [200, 200]
    assert decisions_counted(app) == {"allowed": 1, "dry_run_denied": 1}
    assert await slots_in_use(backend, "work", "tenant") == 0


class Unreachable(MemoryBackend):
    """A backend that cannot decide: every acquire fails."""

    # Decided through its own async methods, as a network backend is: the Limiter awaits them.
    in_process = False
    submit = Backend.submit

    async def acquire(self, hits: Any, claims: Any, token: str) -> Any:
        raise BackendError("unreachable")


@pytest.mark.parametrize(("fail_open", "result", "status"), [(True, "failed_open", 200), (False, "failed_closed", 503)])
async def test_a_request_the_backend_cannot_decide_is_counted_once(fail_open: bool, result: str, status: int) -> None:
    gate = Gate()
    gate.open.set()
    app = build(gate, Unreachable(), ["5/minute", Concurrency(1, timeout=30)])
    app.user_middleware[0].kwargs["fail_open"] = fail_open
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/work")).status_code == status
    assert decisions_counted(app) == {result: 1}


@pytest.mark.redis
async def test_a_flood_refused_by_a_rate_limit_costs_no_round_trips(redis_url: str, key_prefix: str) -> None:
    """The deny cache answers a rule with a slot too, once its rate limits have refused: no slot is looked at."""
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    gate = Gate()
    gate.open.set()
    app = build(gate, backend, ["2/minute", Concurrency(5, timeout=30)])
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            served = [await client.get("/work") for _ in range(2)]
            before = backend.round_trips
            refused = [await client.get("/work") for _ in range(20)]
            sent = backend.round_trips - before
        held = await slots_in_use(backend, "work", "tenant")
    finally:
        await backend.aclose()
    assert held == 0
    assert [r.status_code for r in served + refused] == [200] * 2 + [429] * 20
    assert sent == 1  # the first refusal; the other 19 from the cache
    assert state_of(refused[0]) == {"work": 0, "work:concurrency": 5}  # decided by Redis: the slots are free
    assert state_of(refused[-1]) == {"work": 0}  # from the cache: the slots were not looked at
    assert refused[-1].json()["violated-policies"] == ["work"]
    assert decisions_counted(app) == {"allowed": 2, "denied": 20}


Step = tuple[str, int, int]  # ("acquire", identity, cost) | ("release", nth acquire, 0) | ("advance", seconds, 0)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(0, 2), st.integers(1, 2)),
        st.tuples(st.just("release"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("advance"), st.integers(0, 25), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


@pytest.mark.redis
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=steps)
def test_memory_and_redis_take_slots_and_rate_limits_alike(steps: list[Step], redis_url: str) -> None:
    """Any sequence of combined acquires, releases and waits: both backends give the same Decisions."""
    hits_of = {n: [(f"user-{n}", FixedWindow(3, 30), 0), (f"user-{n}", TokenBucket(4, 0.25), 0)] for n in range(3)}
    lease = Concurrency(2, timeout=20)

    async def run() -> None:
        clock = ManualClock()
        prefix = f"test:{uuid.uuid4().hex[:12]}:"
        memory = MemoryBackend(prefix=prefix, clock=clock)
        redis = RedisBackend(Redis.from_url(redis_url), prefix=prefix, clock=clock)
        taken: list[tuple[list[Any], str]] = []
        try:
            for index, (kind, a, b) in enumerate(steps):
                if kind == "advance":
                    clock.advance(a)
                elif kind == "release" and taken:
                    claims, token = taken[a % len(taken)]
                    await memory.release(claims, token)
                    await redis.release(claims, token)
                elif kind == "acquire":
                    hits = [(identity, policy, b) for identity, policy, _ in hits_of[a]]
                    claims = [(f"user-{a}", lease)]
                    token = f"token-{index}"
                    expected = await memory.acquire(hits, claims, token)
                    assert await redis.acquire(hits, claims, token) == expected, (index, kind, a, b)
                    if all(d.allowed for d in expected):
                        taken.append((claims, token))
        finally:
            keys = [key async for key in redis.client.scan_iter(f"{prefix}*")]
            if keys:
                await redis.client.delete(*keys)
            await redis.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("last", ["body", "pathsend"])
async def test_the_slot_is_held_until_the_last_part_of_the_response(backend: Any, last: str) -> None:
    """Held while the body streams; given back as its last part (or a server-sent file) goes out."""
    held_when: list[tuple[str, int]] = []

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        if last == "body":
            await send({"type": "http.response.body", "body": b"last", "more_body": False})
        else:
            await send({"type": "http.response.pathsend", "path": "/dev/null"})
        held_when.append(("returned", await slots_in_use(backend, "work", "tenant")))

    app = RateLimitMiddleware(
        streaming,
        backend=backend,
        rules=[Rule("/work", Concurrency(1, timeout=30), key=lambda request: "tenant", name="work")],
        registry=CollectorRegistry(),
    )

    async def send(message: dict[str, Any]) -> None:
        held_when.append((message["type"], await slots_in_use(backend, "work", "tenant")))

    await app(http_scope(), _receive, send)
    assert held_when == [
        ("http.response.start", 1),
        ("http.response.body", 1),
        ("http.response.body" if last == "body" else "http.response.pathsend", 0),
        ("returned", 0),
    ]


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def test_a_websocket_holds_its_slot_until_it_closes(backend: Any) -> None:
    closing = asyncio.Event()

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await closing.wait()
        await send({"type": "websocket.close", "code": 1000})

    app = RateLimitMiddleware(
        echo,
        backend=backend,
        rules=[Rule("/ws", Concurrency(1, timeout=30), key=lambda request: "tenant", name="work")],
        registry=CollectorRegistry(),
    )
    scope = {**http_scope(), "type": "websocket", "path": "/ws", "raw_path": b"/ws", "scheme": "ws"}
    del scope["method"]
    sent: list[dict[str, Any]] = []

    async def connect() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    first = asyncio.ensure_future(app(scope, connect, send))
    await settle(lambda: _true_when(any(m["type"] == "websocket.accept" for m in sent)))
    assert await slots_in_use(backend, "work", "tenant") == 1
    await app(scope, connect, send)  # a second one while the first is open: refused
    assert sent[-1]["type"] == "websocket.close" and sent[-1]["code"] == 1008  # a policy violation
    closing.set()
    await first
    assert await slots_in_use(backend, "work", "tenant") == 0
