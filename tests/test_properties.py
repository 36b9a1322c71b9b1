"""Property: MemoryBackend and the Lua script give exactly equal Decisions on any sequence of hits.

Random sequences of (time, entries, cost) are played on MemoryBackend and on RedisBackend
(fakeredis, and a real Redis), each on its own injected clock.  Time never goes back.

The Redis keys' TTLs run on real time while the injected clock jumps, so the memory twin
expires keys (on its clock) that Redis still holds: the equality therefore also checks that a
key's state at its TTL is the same as no state at all.  For Redis not to expire a key in real
time that the twin still holds, every TTL must outlast an example: windows are whole seconds,
times are whole seconds plus less than half a second (so no window ends within 0.5 s of a hit),
and every rate refills slower than a token per second.
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
    parse_limit,
)
from asgi_ratelimit.policies import ALGORITHMS, Policy

T0 = 1_699_999_200_000_000  # a multiple of every window below

POLICIES: list[Policy] = [
    TokenBucket(3, 3 / 11),  # a rate whose ceil(deficit / rate) falls short by a microsecond
    TokenBucket(5, 0.7),
    SlidingWindow(3, 2),
    SlidingWindow(4, 5),
    GCRA(3, 2),  # interval 666,667 us
    GCRA(2, 3, burst=4),
    FixedWindow(4, 3),
    FixedWindow(2, 1),
    SlidingWindowCounter(5, 2),
    SlidingWindowCounter(3, 1),
]
IDENTITIES = ["alice", "bob", "{carol}"]

# An absolute time: whole seconds since T0, plus under half a second.
times = st.tuples(st.integers(0, 40), st.integers(0, 499_999)).map(lambda t: T0 + t[0] * 1_000_000 + t[1])
entry_sets = st.lists(
    st.tuples(st.sampled_from(IDENTITIES), st.integers(0, len(POLICIES) - 1)),
    min_size=1,
    max_size=4,
    unique=True,
)
steps = st.lists(st.tuples(times, entry_sets, st.integers(1, 6)), min_size=1, max_size=30).map(
    lambda found: sorted(found, key=lambda step: step[0])  # non-decreasing time
)

SETTINGS = settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


async def play(client: Any, sequence: list[tuple[int, list[tuple[str, int]], int]]) -> None:
    prefix = f"prop:{uuid.uuid4().hex[:12]}:"
    memory_clock, redis_clock = Clock(), Clock()
    memory = MemoryBackend(clock=memory_clock, prefix=prefix)
    redis = RedisBackend(client, clock=redis_clock, prefix=prefix)
    for number, (at, entries, cost) in enumerate(sequence):
        memory_clock.now = redis_clock.now = at
        hits = [(identity, POLICIES[index], cost) for identity, index in entries]
        expected = await memory.hit_many(hits)
        got = await redis.hit_many(hits)
        assert got == expected, f"step {number}: {hits} at t0+{at - T0}us"


@given(sequence=steps)
@SETTINGS
async def test_memory_twin_equals_lua_on_fakeredis(sequence: list[tuple[int, list[tuple[str, int]], int]]) -> None:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    try:
        await play(client, sequence)
    finally:
        await client.aclose()


@pytest.mark.redis
@given(sequence=steps)
@SETTINGS
async def test_memory_twin_equals_lua_on_redis(
    redis_url: str, sequence: list[tuple[int, list[tuple[str, int]], int]]
) -> None:
    client = Redis.from_url(redis_url)
    try:
        await play(client, sequence)
    finally:
        await client.aclose()


@given(sequence=steps)
@SETTINGS
async def test_denied_hits_change_nothing(sequence: list[tuple[int, list[tuple[str, int]], int]]) -> None:
    """A denied hit leaves the state as it was: the next decision is the same as without it."""
    with_denials, without = Clock(), Clock()
    a = MemoryBackend(clock=with_denials)
    b = MemoryBackend(clock=without)
    for at, entries, cost in sequence:
        with_denials.now = without.now = at
        hits = [(identity, POLICIES[index], cost) for identity, index in entries]
        decisions = a.submit(hits, (), "")
        if all(d.allowed for d in decisions):
            assert b.submit(hits, (), "") == decisions
        else:
            # Replaying the denied hit on `a` again gives the very same answer.
            assert a.submit(hits, (), "") == decisions
    probe = [(identity, policy, 1) for identity in IDENTITIES for policy in POLICIES]
    assert a.submit(probe, (), "") == b.submit(probe, (), "")


@settings(max_examples=60, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    gaps=st.lists(st.integers(min_value=0, max_value=3_000_000), min_size=1, max_size=300),
)
def test_what_a_limit_string_admits_in_any_window(algorithm: str, gaps: list[int]) -> None:
    """docs/algorithms.md: "10/minute" admits at most 10 in any 60 s under the exact log, 20 under the others."""
    policy = parse_limit("10/minute", algorithm)
    now = [1_800_000_000_000_000]
    backend = MemoryBackend(clock=lambda: now[0])
    admitted: list[int] = []
    for gap in gaps:
        now[0] += gap
        (decision,) = backend.submit([("client", policy, 1)], (), "")
        if decision.allowed:
            admitted.append(now[0])
    bound = 10 if algorithm == "sliding_window" else 20
    low = 0
    for high, at in enumerate(admitted):
        while admitted[low] <= at - 60_000_000:
            low += 1
        assert high - low + 1 <= bound
