"""The local deny cache: exact (Redis would deny every hit it answers), bounded, and cheap under a flood."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from redis.asyncio import Redis

from asgi_ratelimit import GCRA, Decision, FixedWindow, RedisBackend, SlidingWindow, SlidingWindowCounter, TokenBucket
from asgi_ratelimit._deny_cache import DenyCache
from asgi_ratelimit._limiter import Limiter
from asgi_ratelimit.policies import Policy


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def denied(retry: float, reset: float = 10.0) -> Decision:
    return Decision(allowed=False, limit=5, remaining=0, retry_after=retry, reset_after=reset)


def allowed(remaining: int = 3) -> Decision:
    return Decision(allowed=True, limit=5, remaining=remaining, retry_after=0.0, reset_after=4.0)


def test_a_denial_is_answered_until_the_earliest_retry_counted_from_when_the_call_was_sent() -> None:
    clock = FakeClock()
    cache = DenyCache(clock=clock)
    sent_at = clock.now
    clock.now += 0.004  # the round trip
    cache.put("sig", [allowed(), denied(2.0), denied(5.0)], sent_at)
    clock.now = sent_at + 1.5
    answer = cache.get("sig")
    assert answer is not None
    assert [d.allowed for d in answer] == [True, False, False]
    assert [d.retry_after for d in answer] == [0.0, 0.5, 3.5]
    assert answer[1].reset_after == pytest.approx(8.5)
    clock.now = sent_at + 2.0  # the first denying policy could pass now: ask Redis again
    assert cache.get("sig") is None
    assert len(cache) == 0


def test_allowed_hits_and_other_signatures_are_not_answered() -> None:
    cache = DenyCache(clock=FakeClock())
    cache.put("ok", [allowed(), allowed()], 100.0)
    cache.put("sig", [denied(2.0)], 100.0)
    assert cache.get("ok") is None
    assert cache.get("other") is None
    assert cache.get("sig") is not None


def test_a_never_denial_stays_until_evicted() -> None:
    clock = FakeClock()
    cache = DenyCache(clock=clock)
    cache.put("sig", [denied(math.inf)], clock.now)
    clock.now += 10**9
    answer = cache.get("sig")
    assert answer is not None and answer[0].never


def test_memory_is_bounded() -> None:
    clock = FakeClock()
    cache = DenyCache(max_entries=100, clock=clock)
    for i in range(10_000):
        cache.put(i, [denied(60.0)], clock.now)
    assert len(cache) == 100
    assert cache.get(9_999) is not None  # the newest are kept
    assert cache.get(0) is None


EVERY_ALGORITHM: list[Policy] = [
    SlidingWindow(3, 0.25),
    FixedWindow(3, 0.25),
    SlidingWindowCounter(3, 0.25),
    GCRA(3, 0.25),
    TokenBucket(3, 12),
]


@pytest.mark.redis
@pytest.mark.parametrize("policy", EVERY_ALGORITHM, ids=lambda p: p.algorithm)
async def test_every_local_denial_is_one_redis_would_give(redis_url: str, key_prefix: str, policy: Policy) -> None:
    """Hammer one key for a while; each time the cache answers, ask Redis directly: it must deny too.

    Asking costs nothing: a denied hit consumes from no policy.
    """
    cached = Limiter(RedisBackend(Redis.from_url(redis_url), prefix=key_prefix), timeout=2.0)
    truth = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    assert cached.deny_cache is not None
    hits = [("one-key", policy, 1)]
    local = admitted = 0
    try:
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            before = cached.deny_cache.hits
            asked_at = time.monotonic()
            (decision,) = await cached.decide(hits)
            if cached.deny_cache.hits > before:
                local += 1
                assert not decision.allowed
                (redis_says,) = await truth.hit_many(hits)
                answered_at = time.monotonic()
                # Redis answers a moment later than the cache did.  It may allow the hit only if the
                # cache's own deadline fell within that moment; anything else would be a wrong denial.
                if redis_says.allowed:
                    assert asked_at + decision.retry_after <= answered_at, "the cache denied a hit Redis would allow"
                else:
                    assert decision.retry_after == pytest.approx(redis_says.retry_after, abs=0.05)
            admitted += decision.allowed
            await asyncio.sleep(0.002)
    finally:
        await cached.backend.aclose()
        await truth.aclose()
    assert local > 10  # the cache did answer, many times
    assert admitted >= 3  # and limiting still let the allowance through as time passed


@pytest.mark.redis
async def test_a_flood_on_one_key_makes_few_round_trips(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    limiter = Limiter(backend, timeout=2.0)
    try:
        results = [await limiter.decide([("flood", SlidingWindow(5, 60), 1)]) for _ in range(500)]
    finally:
        await backend.aclose()
    assert sum(d.allowed for (d,) in results) == 5
    assert backend.round_trips == 6  # five admitted, one denial, then 494 answered locally


@pytest.mark.redis
async def test_it_can_be_switched_off(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    limiter = Limiter(backend, timeout=2.0, deny_cache=False)
    try:
        for _ in range(20):
            await limiter.decide([("k", SlidingWindow(1, 60), 1)])
    finally:
        await backend.aclose()
    assert limiter.deny_cache is None
    assert backend.round_trips == 20
