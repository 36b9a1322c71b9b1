"""The two modes charging rules use, on every backend: a check that spends nothing, and a charge into debt.

A check answers as a hit would and writes nothing; a charge takes its cost even past the limit, once per
token, and answers with what the key's next request of one unit would meet.  MemoryBackend and hit.lua
are held equal on random sequences of hits, checks and charges (repeated tokens included), as
test_properties.py holds them equal on hits.
"""

from __future__ import annotations

import uuid
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from asgi_ratelimit import (
    GCRA,
    FixedWindow,
    MemoryBackend,
    RedisBackend,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
)
from asgi_ratelimit.policies import Policy

T0 = 1_699_999_200_000_000
US = 1_000_000


# Charges in debt keep their keys for hours: every test deletes what it wrote to the machine's Redis.
pytestmark = pytest.mark.usefixtures("forget_prefixed_keys")


async def test_check_spends_nothing_and_refuses_only_an_exhausted_key(backend: Any, clock: Any) -> None:
    policy = SlidingWindow(2, 10)
    clock.now = T0
    for _ in range(3):
        [decision] = await backend.check([("k", policy, 1)])
        assert decision.allowed and decision.remaining == 2  # nothing taken, however often asked
    await backend.hit("k", [policy], 2)
    [decision] = await backend.check([("k", policy, 1)])
    assert not decision.allowed and decision.retry_after == 10.0


@pytest.mark.parametrize(
    "policy",
    [TokenBucket(1000, 1000 / 60), GCRA(1000, 60), FixedWindow(1000, 60), SlidingWindowCounter(1000, 60)],
    ids=lambda policy: policy.algorithm,
)
async def test_a_charge_past_the_limit_is_a_debt(backend: Any, clock: Any, policy: Policy) -> None:
    clock.now = T0
    [after], owed = await backend.charge([("k", policy, 1500)], "request-1", 60 * US)
    assert not after.allowed and after.remaining == 0
    if policy.algorithm in ("token_bucket", "gcra", "fixed_window"):
        assert owed == 500  # 1,500 of 1,000: 500 owed
    [check] = await backend.check([("k", policy, 1)])
    assert not check.allowed and check.retry_after == after.retry_after
    if policy.algorithm in ("token_bucket", "gcra"):
        # Repaid at the refill rate: 501 tokens at 1000/60 per second, 30.06 s (one unit must be back).
        assert after.retry_after == pytest.approx(30.06, abs=0.001)
        clock.now = T0 + round(after.retry_after * US) - 1
        [check] = await backend.check([("k", policy, 1)])
        assert not check.allowed
        clock.now = T0 + round(after.retry_after * US)
        [check] = await backend.check([("k", policy, 1)])
        assert check.allowed
    elif policy.algorithm == "fixed_window":
        assert after.retry_after == 60.0  # a fixed window counts it until it ends
    else:
        # The next window weighs the 1,500 down: 1500 * (1 - e / 60) + 1 <= 1000 from e = 20.04 s on.
        assert after.retry_after == pytest.approx(80.04)


async def test_the_same_charge_sent_twice_is_taken_once(backend: Any, clock: Any) -> None:
    policy = TokenBucket(10, 1)
    clock.now = T0
    first = await backend.charge([("k", policy, 4)], "token-a", 10 * US)
    again = await backend.charge([("k", policy, 4)], "token-a", 10 * US)
    assert first == again and first[0][0].remaining == 6
    other, _ = await backend.charge([("k", policy, 4)], "token-b", 10 * US)
    assert other[0].remaining == 2


@pytest.mark.parametrize(
    "policy", [TokenBucket(10, 1), GCRA(10, 10), FixedWindow(10, 10)], ids=lambda policy: policy.algorithm
)
async def test_a_refund_gives_back_no_more_than_a_full_allowance(backend: Any, clock: Any, policy: Policy) -> None:
    clock.now = T0
    await backend.hit("k", [policy], 6)  # an estimate of 6, spent up front
    [after], _ = await backend.charge([("k", policy, -4)], "r1", 10 * US)  # the response cost 2
    assert after.remaining == 8
    [after], _ = await backend.charge([("k", policy, -9)], "r2", 10 * US)
    assert after.remaining == 10


@pytest.mark.redis
async def test_a_check_and_a_charge_are_one_round_trip_each(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    hits = [("k", TokenBucket(10, 1), 1), ("k", GCRA(10, 10), 1), ("k", FixedWindow(10, 10), 1)]
    try:
        await backend.check(hits)  # connects and loads the script
        before = backend.round_trips
        await backend.check(hits)
        await backend.charge([(identity, policy, 12) for identity, policy, _ in hits], "t", 10 * US)
        assert backend.round_trips - before == 2
    finally:
        keys = [key async for key in backend.client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await backend.client.delete(*keys)
        await backend.aclose()


POLICIES: list[Policy] = [
    TokenBucket(3, 3 / 11),
    TokenBucket(5, 0.7),
    SlidingWindow(3, 2),
    GCRA(3, 2),
    GCRA(2, 3, burst=4),
    FixedWindow(4, 3),
    SlidingWindowCounter(5, 2),
]
IDENTITIES = ["alice", "bob"]
MODES = ["hit", "check", "charge"]

times = st.tuples(st.integers(0, 40), st.integers(0, 499_999)).map(lambda t: T0 + t[0] * US + t[1])
entry_sets = st.lists(
    st.tuples(st.sampled_from(IDENTITIES), st.integers(0, len(POLICIES) - 1)), min_size=1, max_size=3, unique=True
)
steps = st.lists(
    st.tuples(
        times,
        entry_sets,
        st.integers(-6, 12).filter(bool),
        st.sampled_from(MODES),
        st.sampled_from(["t1", "t2", "t3", ""]),  # "": a charge remembered nowhere
    ),
    min_size=1,
    max_size=30,
).map(lambda found: sorted(found, key=lambda step: step[0]))

SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
Step = tuple[int, list[tuple[str, int]], int, str, str]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


async def play(client: Any, sequence: list[Step]) -> None:
    prefix = f"prop:{uuid.uuid4().hex[:12]}:"
    memory_clock, redis_clock = Clock(), Clock()
    memory = MemoryBackend(clock=memory_clock, prefix=prefix)
    redis = RedisBackend(client, clock=redis_clock, prefix=prefix)
    for number, (at, entries, cost, mode, token) in enumerate(sequence):
        memory_clock.now = redis_clock.now = at
        # A charge may go past every limit, or be a refund (below 0); hits and checks cost 1 to 6.
        hits = [
            (identity, POLICIES[index], cost if mode == "charge" else max(1, min(abs(cost), 6)))
            for identity, index in entries
        ]
        expected: Any
        got: Any
        if mode == "hit":
            expected, got = await memory.hit_many(hits), await redis.hit_many(hits)
        elif mode == "check":
            expected, got = await memory.check(hits), await redis.check(hits)
        else:
            expected = await memory.charge(hits, token, 5 * US)
            got = await redis.charge(hits, token, 5 * US)
        assert got == expected, f"step {number}: {mode} {hits} ({token}) at t0+{at - T0}us"
    await client.delete(*[key async for key in client.scan_iter(match=f"{prefix}*")] or ["-"])


@given(sequence=steps)
@SETTINGS
async def test_memory_twin_equals_lua_in_every_mode_on_fakeredis(sequence: list[Step]) -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        await play(client, sequence)
    finally:
        await client.aclose()


@pytest.mark.redis
@given(sequence=steps)
@SETTINGS
async def test_memory_twin_equals_lua_in_every_mode_on_redis(redis_url: str, sequence: list[Step]) -> None:
    client = Redis.from_url(redis_url)
    try:
        await play(client, sequence)
    finally:
        await client.aclose()
