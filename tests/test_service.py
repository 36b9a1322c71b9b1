"""The decision service (POST /check) on MemoryBackend and a real Redis: bad input never counts, good input decides.

Every bad request is checked for its status, its problem+json body, the field it names, and
that the backend holds no key afterwards.  Good requests run for every algorithm; their
RateLimit headers are read back with http_sfv.  The app is driven without lifespan events
(httpx.ASGITransport sends none) and with them (the lifespan protocol driven by hand).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from conftest import parse_sf_list
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from starlette.types import ASGIApp, Message

from asgi_ratelimit import Backend, BackendError, MemoryBackend, RedisBackend
from asgi_ratelimit.backends.base import Hit
from asgi_ratelimit.policies import Decision
from asgi_ratelimit.service import (
    ALGORITHMS,
    MAX_BODY_BYTES,
    MAX_KEY_BYTES,
    MAX_SLIDING_WINDOW_LIMIT,
    create_app,
    openapi_document,
)

PROBLEM = "application/problem+json"


@dataclass
class Store:
    """A backend under test and a way to count the keys it holds."""

    backend: Backend
    keys: Callable[[], Awaitable[int]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Store]:
    if request.param == "memory":
        memory = MemoryBackend(prefix=key_prefix)

        async def memory_keys() -> int:
            return len(memory)

        yield Store(memory, memory_keys)
        return
    client = Redis.from_url(request.getfixturevalue("redis_url"))
    backend = RedisBackend(client, prefix=key_prefix)

    async def redis_keys() -> int:
        return len([key async for key in client.scan_iter(match=f"{key_prefix}*")])

    try:
        yield Store(backend, redis_keys)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
        await backend.aclose()


async def post(app: ASGIApp, body: Any = None, *, raw: Any = None, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        if raw is not None:
            return await client.post("/check", content=raw, **kwargs)
        return await client.post("/check", json=body, **kwargs)


async def get(app: ASGIApp, path: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service") as client:
        return await client.get(path, **kwargs)


def counted(registry: CollectorRegistry, rule: str, result: str) -> float:
    value = registry.get_sample_value("asgi_ratelimit_decisions_total", {"rule": rule, "result": result})
    return 0.0 if value is None else value


TB = {"key": "user:123", "algorithm": "token_bucket", "capacity": 10, "refill_rate": 1}
SW = {"key": "user:123", "algorithm": "sliding_window", "limit": 100, "window": 60}
FW = {"key": "user:123", "algorithm": "fixed_window", "limit": 100, "window": 60}
SWC = {"key": "user:123", "algorithm": "sliding_window_counter", "limit": 100, "window": 60}
GC = {"key": "user:123", "algorithm": "gcra", "limit": 10, "period": 1, "burst": 5}


def without(body: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != name}


def bad(case_id: str, body: Any, status: int, field: str | None, raw: bytes | None = None) -> Any:
    return pytest.param(body, raw, status, field, id=case_id)


BAD_INPUTS = [
    # The body as a whole: 400 when it is not JSON or too large, 422 when it is not an object.
    bad("not-json", None, 400, None, raw=b"{"),
    bad("empty", None, 400, None, raw=b""),
    bad("not-utf8", None, 400, None, raw=b'{"key": "\xff"}'),
    bad("nan", None, 400, None, raw=b'{"key": "u", "algorithm": "fixed_window", "limit": 1, "window": NaN}'),
    bad("infinity", None, 400, None, raw=b'{"key": "u", "algorithm": "fixed_window", "limit": 1, "window": Infinity}'),
    bad("nested-too-deeply", None, 400, None, raw=b"[" * 60_000),
    bad("too-large", {**SW, "key": "k" * (MAX_BODY_BYTES + 1)}, 400, None),
    bad("list", [SW], 422, None),
    bad("number", 5, 422, None),
    bad("string", "user:123", 422, None),
    bad("null", None, 422, None, raw=b"null"),
    # algorithm
    bad("algorithm-missing", without(SW, "algorithm"), 422, "algorithm"),
    bad("algorithm-unknown", {**SW, "algorithm": "leaky_bucket"}, 422, "algorithm"),
    bad("algorithm-not-string", {**SW, "algorithm": 2}, 422, "algorithm"),
    # unknown fields, including another algorithm's
    bad("field-unknown", {**SW, "limti": 5}, 422, "limti"),
    bad("field-of-other-algorithm", {**TB, "window": 60}, 422, "window"),
    bad("field-lone-surrogate", None, 422, "\\ud800", raw=b'{"key": "u", "algorithm": "fixed_window", "\\ud800": 1}'),
    bad("field-very-long", {**SW, "x" * 50_000: 1}, 422, "x" * 61 + "..."),
    # key
    bad("key-missing", without(SW, "key"), 422, "key"),
    bad("key-number", {**SW, "key": 123}, 422, "key"),
    bad("key-null", {**SW, "key": None}, 422, "key"),
    bad("key-empty", {**SW, "key": ""}, 422, "key"),
    bad("key-over-1KiB", {**SW, "key": "k" * (MAX_KEY_BYTES + 1)}, 422, "key"),
    bad("key-over-1KiB-in-utf8", {**SW, "key": "é" * (MAX_KEY_BYTES // 2 + 1)}, 422, "key"),
    # The middleware's identity separator: a caller could otherwise name a middleware rule's counts.
    bad("key-with-the-identity-separator", {**SW, "key": "login\x1f203.0.113.7"}, 422, "key"),
    # missing parameters
    bad("capacity-missing", without(TB, "capacity"), 422, "capacity"),
    bad("refill_rate-missing", without(TB, "refill_rate"), 422, "refill_rate"),
    bad("limit-missing", without(SW, "limit"), 422, "limit"),
    bad("window-missing", without(FW, "window"), 422, "window"),
    bad("period-missing", without(GC, "period"), 422, "period"),
    # wrong types; a float is not an integer, even 10.0
    bad("limit-string", {**SW, "limit": "10"}, 422, "limit"),
    bad("limit-float", {**SW, "limit": 1.5}, 422, "limit"),
    bad("limit-whole-float", {**SW, "limit": 10.0}, 422, "limit"),
    bad("limit-bool", {**SW, "limit": True}, 422, "limit"),
    bad("limit-null", {**SW, "limit": None}, 422, "limit"),
    bad("window-string", {**SW, "window": "60"}, 422, "window"),
    bad("window-bool", {**SW, "window": False}, 422, "window"),
    bad("window-list", {**SW, "window": [60]}, 422, "window"),
    bad("burst-float", {**GC, "burst": 2.5}, 422, "burst"),
    bad("capacity-float", {**TB, "capacity": 10.0}, 422, "capacity"),
    bad("cost-float", {**SW, "cost": 1.5}, 422, "cost"),
    bad("cost-string", {**SW, "cost": "1"}, 422, "cost"),
    bad(
        "window-overflowing-float",
        None,
        422,
        "window",
        raw=b'{"key":"u","algorithm":"fixed_window","limit":1,"window":1e400}',
    ),
    # zero and negative numbers
    bad("limit-zero", {**SW, "limit": 0}, 422, "limit"),
    bad("limit-negative", {**SW, "limit": -1}, 422, "limit"),
    bad("window-zero", {**SW, "window": 0}, 422, "window"),
    bad("window-negative", {**SW, "window": -1.5}, 422, "window"),
    bad("capacity-zero", {**TB, "capacity": 0}, 422, "capacity"),
    bad("refill_rate-zero", {**TB, "refill_rate": 0}, 422, "refill_rate"),
    bad("period-negative", {**GC, "period": -1}, 422, "period"),
    bad("burst-zero", {**GC, "burst": 0}, 422, "burst"),
    bad("cost-zero", {**SW, "cost": 0}, 422, "cost"),
    bad("cost-negative", {**SW, "cost": -3}, 422, "cost"),
    # above the policies' bounds: the field named is the one out of range, not the first argument
    bad("limit-too-large", {**SW, "limit": 10**12}, 422, "limit"),
    bad("sliding-window-limit-over-the-log-cap", {**SW, "limit": MAX_SLIDING_WINDOW_LIMIT + 1}, 422, "limit"),
    bad("window-too-long", {**SW, "window": 10**9}, 422, "window"),
    bad("window-too-short", {**FW, "window": 0.0001}, 422, "window"),
    bad("window-huge-int", {**SWC, "window": 10**400}, 422, "window"),
    bad("capacity-too-large", {**TB, "capacity": 10**12}, 422, "capacity"),
    bad("refill_rate-too-small", {**TB, "refill_rate": 1e-9}, 422, "refill_rate"),
    bad("refill_rate-too-slow-for-capacity", {**TB, "capacity": 10**9, "refill_rate": 1}, 422, "refill_rate"),
    bad("period-too-long", {**GC, "period": 10**9}, 422, "period"),
    bad("burst-too-large", {**GC, "burst": 10**12}, 422, "burst"),
    bad("burst-tolerance-too-long", {**GC, "limit": 1, "period": 10**7, "burst": 10**6}, 422, "burst"),
    bad("cost-too-large", {**SW, "cost": 10**10}, 422, "cost"),
]


@pytest.mark.parametrize(("body", "raw", "status", "field"), BAD_INPUTS)
async def test_bad_input_is_refused_naming_the_field_and_counts_nothing(
    store: Store, body: Any, raw: bytes | None, status: int, field: str | None
) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    response = await post(app, body, raw=raw)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    assert isinstance(problem["title"], str) and problem["title"]
    if field is None:
        assert "field" not in problem
    else:
        assert problem["field"] == field
        assert f'"{field}"' in problem["detail"]
    assert len(problem["detail"]) < 400  # a 64 KiB value never comes back whole
    assert await store.keys() == 0
    assert "retry-after" not in response.headers
    assert "ratelimit" not in response.headers
    # A refused request is no decision: nothing is counted.
    samples = [s for m in registry.collect() if m.name == "asgi_ratelimit_decisions" for s in m.samples]
    assert samples and all(s.value == 0 for s in samples if s.name.endswith("_total"))


async def test_a_body_too_large_without_content_length_is_refused_while_streaming() -> None:
    backend = MemoryBackend()
    app = create_app(backend, registry=CollectorRegistry())
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"key": "'
        while sent < 4 * MAX_BODY_BYTES:
            sent += 8192
            yield b"k" * 8192

    response = await post(app, raw=chunks())
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert "65,536 bytes" in response.json()["detail"]
    assert len(backend) == 0


async def test_declared_length_over_the_cap_is_refused_before_reading() -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    response = await post(app, raw=b"{}", headers={"content-length": str(MAX_BODY_BYTES + 1)})
    assert response.status_code == 400


GOOD = [pytest.param(body, id=str(body["algorithm"])) for body in (TB, SW, FW, SWC, GC)]


@pytest.mark.parametrize("body", GOOD)
async def test_good_input_decides_with_headers(store: Store, body: dict[str, Any]) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    response = await post(app, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    decision = response.json()
    assert set(decision) == {"allowed", "limit", "remaining", "retry_after", "reset_after", "never"}
    limit = body.get("burst", body.get("limit", body.get("capacity")))
    assert decision["allowed"] is True
    assert decision["never"] is False
    assert decision["limit"] == limit
    assert decision["remaining"] == limit - 1
    assert decision["retry_after"] == 0
    assert decision["reset_after"] > 0
    name = body["algorithm"]
    ((policy_name, policy),) = parse_sf_list(response.headers["ratelimit-policy"])
    assert policy_name == name
    assert policy["q"] == limit
    assert policy["w"] >= 1
    ((state_name, state),) = parse_sf_list(response.headers["ratelimit"])
    assert state_name == name
    # t, the effective window: until the allowance is full, and never faster than the policy's q per w.
    assert state == {
        "r": limit - 1,
        "t": max(math.ceil(decision["reset_after"]), -(-(limit - 1) * policy["w"] // limit)),
    }
    # Retry-After never goes on a 2xx, not even on a denial.
    assert "retry-after" not in response.headers
    assert await store.keys() >= 1
    assert counted(registry, f"service:{name}", "allowed") == 1
    # The key is stored hashed: it appears in no Redis key and no metric label.
    exposition = (await get(app, "/metrics")).text
    assert "user:123" not in exposition


@pytest.mark.parametrize("body", GOOD)
async def test_a_key_runs_out_and_is_told_when_to_retry(store: Store, body: dict[str, Any]) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    small = {**body, "key": "runs-out"}
    for name in ("capacity", "limit", "burst"):
        if name in small:
            small[name] = 2
    first = await post(app, {**small, "cost": 2})
    assert first.json()["allowed"] is True
    assert first.json()["remaining"] == 0
    denied = await post(app, small)
    assert denied.status_code == 200
    decision = denied.json()
    assert decision["allowed"] is False
    assert decision["never"] is False
    assert decision["remaining"] == 0
    assert decision["retry_after"] > 0
    ((_, state),) = parse_sf_list(denied.headers["ratelimit"])
    # On a denial, t is what the middleware's Retry-After would say: whole seconds, rounded up, at least 1.
    assert state["t"] == max(1, math.ceil(decision["retry_after"]))
    assert "retry-after" not in denied.headers
    assert counted(registry, f"service:{body['algorithm']}", "denied") == 1
    assert counted(registry, f"service:{body['algorithm']}", "allowed") == 1


@pytest.mark.parametrize("body", GOOD)
async def test_a_cost_above_capacity_is_never_with_a_null_retry_after(store: Store, body: dict[str, Any]) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    capacity = body.get("burst", body.get("limit", body.get("capacity")))
    assert isinstance(capacity, int)
    response = await post(app, {**body, "cost": capacity + 1})
    assert response.status_code == 200
    raw = response.text
    decision = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in {raw}"))
    assert decision["allowed"] is False
    assert decision["never"] is True
    assert decision["retry_after"] is None
    assert math.isfinite(decision["reset_after"])
    ((_, state),) = parse_sf_list(response.headers["ratelimit"])
    assert state["t"] == 365 * 86_400  # the middleware's finite "never": a year
    # A "never" hit takes nothing: the whole allowance is still there.
    after = (await post(app, body)).json()
    assert after["allowed"] is True
    assert after["remaining"] == capacity - 1


async def test_a_key_of_exactly_1KiB_is_accepted(store: Store) -> None:
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=2.0)
    response = await post(app, {**SW, "key": "é" * (MAX_KEY_BYTES // 2)})
    assert response.status_code == 200


async def test_one_request_writes_at_most_the_sliding_window_cap(store: Store) -> None:
    # The exact log keeps one entry per admitted unit: a client asking for limit=cost=10**9
    # would have made one request write 10**9 entries (minutes of CPU, gigabytes of memory).
    app = create_app(store.backend, registry=CollectorRegistry(), timeout=5)
    largest = {**SW, "limit": MAX_SLIDING_WINDOW_LIMIT, "cost": MAX_SLIDING_WINDOW_LIMIT}
    started = time.perf_counter()
    response = await post(app, largest)
    assert response.status_code == 200, response.text
    assert response.json()["remaining"] == 0
    assert time.perf_counter() - started < 2
    huge = await post(app, {**SW, "key": "other", "limit": 10**9, "cost": 10**9})
    assert huge.status_code == 422
    assert huge.json()["field"] == "limit"
    assert "sliding_window_counter" in huge.json()["detail"]


async def test_gcra_burst_defaults_to_limit() -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    response = await post(app, without(GC, "burst"))
    assert response.json()["limit"] == GC["limit"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_valid_json_is_accepted_whatever_the_content_type(content_type: str | None) -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    headers = {} if content_type is None else {"content-type": content_type}
    response = await post(app, raw=json.dumps(SW).encode(), headers=headers)
    assert response.status_code == 200, response.text


async def test_unknown_paths_and_methods_answer_problem_json() -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    missing = await get(app, "/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == PROBLEM
    wrong = await get(app, "/check")
    assert wrong.status_code == 405
    assert wrong.headers["content-type"] == PROBLEM
    assert wrong.headers["allow"] == "POST"


class Failing(MemoryBackend):
    # Decided through its own async methods, as a network backend is: the Limiter awaits them.
    in_process = False
    submit = Backend.submit

    async def hit_many(self, hits: list[Hit]) -> list[Decision]:  # type: ignore[override]
        raise BackendError("down")

    async def ping(self) -> None:
        raise BackendError("down")


async def test_a_failing_backend_answers_503_and_counts_failed_closed() -> None:
    registry = CollectorRegistry()
    app = create_app(Failing(), registry=registry)
    response = await post(app, SW)
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.headers["retry-after"] == "1"
    assert counted(registry, "service:sliding_window", "failed_closed") == 1
    health = await get(app, "/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unavailable"


async def test_health_liveness_and_metrics(store: Store) -> None:
    registry = CollectorRegistry()
    app = create_app(store.backend, registry=registry, timeout=2.0)
    health = await get(app, "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["backend"] == type(store.backend).__name__
    live = await get(app, "/health/live")
    assert live.json() == {"status": "ok"}
    await post(app, GC)
    metrics = await get(app, "/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'asgi_ratelimit_decisions_total{result="allowed",rule="service:gcra"} 1.0' in metrics.text
    # Every algorithm is exported at zero from the start; the rule label takes no other values.
    rules = {s.labels["rule"] for m in registry.collect() for s in m.samples if "rule" in s.labels}
    assert rules == {
        f"service:{name}"
        for name in ("token_bucket", "sliding_window", "fixed_window", "sliding_window_counter", "gcra")
    }
    openmetrics = await get(app, "/metrics", headers={"accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")


async def test_openapi_document_lists_every_route() -> None:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    response = await get(app, "/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document == openapi_document()
    assert set(document["paths"]) == {"/check", "/reset", "/health", "/health/live", "/metrics", "/openapi.json"}
    *variants, batch = document["paths"]["/check"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "oneOf"
    ]
    assert batch == {"$ref": "#/components/schemas/Batch"}
    assert document["components"]["schemas"]["Batch"]["properties"]["checks"]["items"]["oneOf"] == variants
    assert {v["properties"]["algorithm"]["const"] for v in variants} == {
        "token_bucket",
        "sliding_window",
        "fixed_window",
        "sliding_window_counter",
        "gcra",
    }


# -- random bodies --------------------------------------------------------------------------------

ALGORITHM_NAMES = ["token_bucket", "sliding_window", "fixed_window", "sliding_window_counter", "gcra"]
FIELDS = ["key", "algorithm", "cost", "capacity", "refill_rate", "limit", "window", "period", "burst"]
# Any code point, lone surrogates included: JSON's \ud800 escapes reach the service as such.
any_text = st.text(st.characters(exclude_categories=()) | st.characters(categories=["Cs"]), max_size=20)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
    | st.sampled_from(ALGORITHM_NAMES)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
# Objects made of the real field names and mostly plausible values, so that many examples decide.
plausible = {"integer": st.integers(1, 100) | json_scalars, "number": st.floats(0.001, 1000) | st.integers(1, 100)}
check_bodies = st.dictionaries(st.sampled_from(FIELDS), json_scalars, max_size=6) | st.one_of(
    st.fixed_dictionaries(
        {
            "key": any_text,
            "algorithm": st.just(name),
            **{field: plausible[kind] | json_scalars for field, kind in spec.fields.items()},
        },
        optional={"cost": plausible["integer"]},
    )
    for name, spec in ALGORITHMS.items()
)
# ... and now and then a field of the client's invention, which the answer names.
check_bodies = check_bodies | st.tuples(
    check_bodies, st.dictionaries(any_text, json_scalars, min_size=1, max_size=2)
).map(lambda parts: {**parts[1], **parts[0]})


@given(body=json_values | check_bodies)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_random_json_bodies_never_get_a_5xx(body: Any) -> None:
    backend = MemoryBackend()
    app = create_app(backend, registry=CollectorRegistry())
    response = await post(app, raw=json.dumps(body).encode())
    assert response.status_code in (200, 400, 422), response.text
    event(f"status {response.status_code}")
    if response.status_code == 200:
        assert isinstance(body, dict)
        assert response.json()["allowed"] in (True, False)
    else:
        assert response.headers["content-type"] == PROBLEM
        assert len(backend) == 0


@given(raw=st.binary(max_size=200))
@settings(max_examples=200, deadline=None)
async def test_random_bytes_never_get_a_5xx(raw: bytes) -> None:
    backend = MemoryBackend()
    response = await post(create_app(backend, registry=CollectorRegistry()), raw=raw)
    assert response.status_code in (200, 400, 422), response.text
    if response.status_code != 200:
        assert len(backend) == 0


# -- lifespan ------------------------------------------------------------------------------------


class Closing(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    async def aclose(self) -> None:
        self.closed += 1


async def lifespan(app: ASGIApp, then: Callable[[], Awaitable[None]]) -> list[str]:
    """Drive the ASGI lifespan protocol by hand around ``then()``; the messages the app sent."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[str] = []
    done = asyncio.Event()

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        sent.append(message["type"])
        if message["type"].startswith("lifespan.shutdown"):
            done.set()

    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send))
    await inbox.put({"type": "lifespan.startup"})
    while not sent:
        await asyncio.sleep(0)
    assert sent == ["lifespan.startup.complete"]
    await then()
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(done.wait(), 5)
    await asyncio.wait_for(task, 5)
    return sent


@pytest.mark.parametrize("owned", [False, True])
async def test_with_lifespan(owned: bool) -> None:
    backend = Closing()
    app = create_app(backend, registry=CollectorRegistry(), close_backend=owned)

    async def requests() -> None:
        assert (await post(app, SW)).json()["remaining"] == 99
        assert (await get(app, "/health")).status_code == 200

    assert await lifespan(app, requests) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert backend.closed == (1 if owned else 0)


async def test_without_lifespan() -> None:
    # httpx.ASGITransport sends no lifespan events: nothing may depend on startup having run.
    backend = Closing()
    app = create_app(backend, registry=CollectorRegistry())
    assert (await post(app, SW)).json()["remaining"] == 99
    assert (await post(app, SW)).json()["remaining"] == 98
    assert backend.closed == 0


def test_importing_the_module_builds_no_app() -> None:
    # The command line (and any ASGI server, through from_environment) builds the app: an import must
    # not open a backend, nor register metrics on the global registry.
    import subprocess
    import sys

    code = (
        "import asgi_ratelimit.service as s, prometheus_client as p; "
        "assert not hasattr(s, 'app'); "
        "assert b'asgi_ratelimit' not in p.generate_latest()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_a_service_without_a_backend_builds_its_own() -> None:
    app = create_app(registry=CollectorRegistry())
    assert isinstance(app.state.backend, MemoryBackend)
    assert (await post(app, FW)).status_code == 200
