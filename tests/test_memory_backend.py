"""MemoryBackend: bounded memory under a flood of identities, expiry on its own clock, configuration."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from asgi_ratelimit import (
    GCRA,
    Concurrency,
    ConfigurationError,
    FixedWindow,
    Header,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    SlidingWindow,
    TokenBucket,
)
from asgi_ratelimit._keys import digest, state_key
from asgi_ratelimit.backends.base import Backend

T0 = 1_699_999_200_000_000
US = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def test_a_flood_of_unique_identities_never_exceeds_max_keys() -> None:
    clock = Clock()
    cap = 10_000
    backend = MemoryBackend(max_keys=cap, clock=clock)
    policy = [FixedWindow(5, 3600)]
    largest = 0
    for number in range(1_000_000):
        backend.submit([(f"203.0.{number}", policy[0], 1)], (), "")
        if number % 997 == 0:
            largest = max(largest, len(backend))
            clock.now += 1_000  # a millisecond every thousand requests: nothing expires here
    largest = max(largest, len(backend))
    assert largest == cap
    # The most recent identities are the ones kept; the flood's start was evicted.
    assert backend.submit([("203.0.999999", policy[0], 1)], (), "")[0].remaining == 3
    assert backend.submit([("203.0.0", policy[0], 1)], (), "")[0].remaining == 4


def test_expired_keys_are_dropped() -> None:
    clock = Clock()
    backend = MemoryBackend(max_keys=100_000, clock=clock)
    short = FixedWindow(1, 1)
    for number in range(5_000):
        backend.submit([(f"old-{number}", short, 1)], (), "")
    assert len(backend) == 5_000
    clock.now += 2 * US  # every old window (and key) is over
    long = FixedWindow(1, 3600)
    for number in range(20_000):
        backend.submit([(f"new-{number}", long, 1)], (), "")
    # Nothing needed evicting (20,000 + 5,000 is below the cap): the old keys went as they expired.
    assert len(backend) == 20_000


def test_an_expired_key_is_dropped_when_met() -> None:
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    policy = GCRA(1, 1)
    backend.submit([("k", policy, 1)], (), "")
    assert len(backend) == 1
    clock.now += US
    # A denied hit writes nothing, and the expired state it met is gone.
    decisions = backend.submit([("other", policy, 1), ("k", policy, 1), ("other", FixedWindow(1, 1), 2)], (), "")
    assert [d.allowed for d in decisions] == [True, True, False]
    assert len(backend) == 0


@pytest.mark.parametrize(
    "policy", [FixedWindow(3, 2), SlidingWindow(3, 2), GCRA(3, 2), TokenBucket(3, 1.5)], ids=lambda p: p.algorithm
)
def test_keys_live_exactly_as_long_as_their_state_matters(policy: object) -> None:
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    [decision] = backend.submit([("k", policy, 3)], (), "")  # type: ignore[list-item]
    ttl_us = -(-round(decision.reset_after * US) // 1000) * 1000  # whole ms, rounded up
    clock.now += ttl_us - 1
    backend.submit([("probe", FixedWindow(1, 1), 2)], (), "")  # a denied hit: writes nothing, touches nothing
    assert len(backend) == 1
    still = backend.submit([("k", policy, 1), ("probe", FixedWindow(1, 1), 2)], (), "")[0]  # type: ignore[list-item]
    assert len(backend) == 1
    clock.now += 1
    fresh = backend.submit([("k", policy, 1), ("probe", FixedWindow(1, 1), 2)], (), "")[0]  # type: ignore[list-item]
    assert len(backend) == 0
    assert fresh.remaining == 3  # as good as new
    assert still.remaining <= 3


def test_eviction_takes_the_key_with_the_fewest_units_consumed_and_the_oldest_among_them() -> None:
    clock = Clock()
    backend = MemoryBackend(max_keys=3, clock=clock)
    policy = SlidingWindow(5, 60)
    for identity in ("a", "b", "c"):
        backend.submit([(identity, policy, 1)], (), "")
    backend.submit([("a", policy, 1)], (), "")  # "a" has consumed two: "b" and "c" one each, "b" is older
    backend.submit([("d", policy, 1)], (), "")
    assert len(backend) == 3
    assert backend.evictions == {"at_rest": 0, "live": 1}
    assert backend.submit([("a", policy, 1)], (), "")[0].remaining == 2  # kept: third hit
    assert backend.submit([("b", policy, 1)], (), "")[0].remaining == 4  # evicted: starts over


def test_keys_back_to_full_are_evicted_before_any_key_in_use() -> None:
    clock = Clock()
    backend = MemoryBackend(max_keys=3, clock=clock)
    lease = Concurrency(2, timeout=60)
    policy = FixedWindow(5, 60)
    backend.submit([("busy", policy, 1)], (), "")
    backend.submit([], [("api", lease)], "token")
    backend.submit([("heavy", policy, 4)], (), "")
    asyncio.run(backend.release([("api", lease)], "token"))  # no slot taken: the slots key is at rest
    backend.submit([("new", policy, 1)], (), "")
    assert backend.evictions == {"at_rest": 1, "live": 0}
    assert backend.submit([("busy", policy, 1)], (), "")[0].remaining == 3  # kept
    assert backend.submit([("heavy", policy, 1)], (), "")[0].remaining == 0  # kept


def test_an_exhausted_key_outlives_floods_of_fresh_identities(caplog: pytest.LogCaptureFixture) -> None:
    """/login at 5/hour per X-User; each flood brings 100,000 junk X-User values to a 100,000-key cap."""
    backend = MemoryBackend(max_keys=100_000)
    registry = CollectorRegistry()
    app = RateLimitMiddleware(
        _ok, backend=backend, rules=[Rule("/login", "5/hour", key=Header("x-user"))], registry=registry
    )
    largest = 0

    async def login(user: str) -> int:
        status = 0

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http", "method": "POST", "path": "/login", "root_path": "", "query_string": b"",
            "headers": [(b"x-user", user.encode())], "client": ("203.0.113.9", 4000),
        }  # fmt: skip
        await app(scope, _receive, send)
        return status

    async def attack() -> list[int]:
        nonlocal largest
        victim = [await login("victim") for _ in range(5)]
        for flood in range(2):
            for number in range(100_000):
                await login(f"junk-{flood}-{number}")
                if number % 4096 == 0:
                    largest = max(largest, len(backend))
            largest = max(largest, len(backend))
            victim += [await login("victim") for _ in range(10)]
        return victim

    statuses = asyncio.run(attack())
    assert statuses == [200] * 5 + [429] * 20  # not one extra attempt for the victim
    assert largest <= 100_000
    evicted = registry.get_sample_value("asgi_ratelimit_memory_evictions_total", {"kind": "live"})
    assert evicted == backend.evictions["live"] >= 100_000
    # Logged, but not once per eviction.
    lines = [r for r in caplog.records if "max_keys" in r.getMessage()]
    assert 1 <= len(lines) <= 2


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 12), st.integers(1, 3), st.booleans()), min_size=1, max_size=60),
)
def test_no_key_is_evicted_while_one_with_half_its_units_or_fewer_is_kept(steps: list[tuple[int, int, bool]]) -> None:
    clock = Clock()
    backend = MemoryBackend(max_keys=4, clock=clock)
    policies = {False: FixedWindow(6, 60), True: GCRA(6, 60)}
    units: dict[str, int] = {}  # what each kept identity has consumed, by its allowed hits
    for identity, cost, gcra in steps:
        name = f"{'g' if gcra else 'f'}{identity}"
        decision = backend.submit([(name, policies[gcra], cost)], (), "")[0]
        if decision.allowed:  # written first, then the cap is enforced: the key itself may go
            units[name] = units.get(name, 0) + cost
        assert len(backend) <= 4
        kept = {key for key in units if _kept(backend, key, policies)}
        for key in set(units) - kept:
            # Levels, not units (see MemoryBackend._evict): none kept may have half as many or fewer.
            lighter = [other for other in kept if units[other].bit_length() < units[key].bit_length()]
            assert not lighter, f"{key} ({units[key]} units) evicted while {lighter} kept"
            del units[key]


@pytest.mark.parametrize("max_keys", [0, -1, 1.5, True, "10"])
def test_max_keys_must_be_a_positive_whole_number(max_keys: object) -> None:
    with pytest.raises(ConfigurationError, match="max_keys") as info:
        MemoryBackend(max_keys=max_keys)  # type: ignore[arg-type]
    assert repr(max_keys) in str(info.value)


async def test_protocol_ping_and_aclose() -> None:
    backend = MemoryBackend(clock=Clock())
    assert isinstance(backend, Backend)
    await backend.ping()
    await backend.hit("k", [FixedWindow(1, 1)])
    assert len(backend) == 1
    await backend.aclose()
    assert len(backend) == 0


def test_the_default_clock_is_wall_clock_microseconds() -> None:
    import time

    backend = MemoryBackend()
    before = time.time_ns() // 1000
    [decision] = backend.submit([("k", FixedWindow(1, 3600), 1)], (), "")
    after = time.time_ns() // 1000
    window = 3600 * US
    reset_us = round(decision.reset_after * US)
    if before // window == after // window:
        assert (after // window + 1) * window - after <= reset_us <= (before // window + 1) * window - before


def test_the_sliding_log_drops_expired_entries_in_batches_and_stays_exact() -> None:
    # A steady stream through a sliding log: entries expire one or two per hit.  Dropping them on
    # every hit would shift the whole log each time (O(limit) per request); the log instead keeps
    # them until they are half of it, and the answers stay those of a plain count over the window.
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    policy = SlidingWindow(1_000, 1)
    allowed_at: list[int] = []
    longest = 0
    for step in range(5_000):
        clock.now += 700 + (step % 3) * 300  # 0.7 to 1.3 ms apart: about a thousand hits per window
        live = [t for t in allowed_at if t > clock.now - US]
        decision = backend.submit([("k", policy, 1)], (), "")[0]
        assert decision.allowed == (len(live) < 1_000)
        if decision.allowed:
            assert decision.remaining == 1_000 - len(live) - 1
            live.append(clock.now)
        allowed_at = live
        log = next(iter(backend._store.values()))[1]
        assert log == sorted(log)
        longest = max(longest, len(log))
    assert 1_000 < longest <= 2 * 1_000 + 1


def _kept(backend: MemoryBackend, name: str, policies: dict[bool, Any]) -> bool:
    policy = policies[name.startswith("g")]
    return state_key(backend.prefix, digest(name), policy) in backend._store


def test_a_reset_key_leaves_nothing_behind_for_eviction() -> None:
    clock = Clock()
    backend = MemoryBackend(max_keys=3, clock=clock)
    policy = FixedWindow(5, 60)
    for identity in ("a", "b", "c"):
        backend.submit([(identity, policy, 1)], (), "")
    asyncio.run(backend.reset("a", [policy]))
    for identity in ("d", "e", "f", "g"):  # the cap is reached again and again; "a" is in no bucket
        backend.submit([(identity, policy, 1)], (), "")
    assert len(backend) == 3
    assert backend.evictions == {"at_rest": 0, "live": 3}  # "b", "c" and "d", oldest first
