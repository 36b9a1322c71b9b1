"""One behavioural suite, run on every backend: memory, fakeredis and a real Redis.

Every expected value is computed by hand from the algorithm's definition (the comment beside
each step shows the arithmetic), on an injected clock, so the three backends are held to the
same numbers and not merely to each other.  T0 is aligned to every window used here, because
fixed windows are aligned to the Unix epoch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from asgi_ratelimit import GCRA, Decision, FixedWindow, SlidingWindow, SlidingWindowCounter, TokenBucket
from asgi_ratelimit.policies import Policy

T0 = 1_699_999_200_000_000  # a multiple of one hour, in microseconds
US = 1_000_000

# A step: (time since T0 in us, cost, expected (allowed, remaining, retry_after, reset_after)).
Step = tuple[int, int, tuple[bool, int, float, float]]


async def run_steps(backend: Any, clock: Any, policy: Policy, steps: Sequence[Step], key: str = "client") -> None:
    for number, (at, cost, expected) in enumerate(steps):
        clock.now = T0 + at
        [decision] = await backend.hit(key, [policy], cost)
        got = (decision.allowed, decision.remaining, decision.retry_after, decision.reset_after)
        assert got == expected, f"step {number} (t0+{at}us, cost {cost})"
        assert decision.limit == policy.quota
        assert decision.policy is policy


def seen(decision: Decision) -> tuple[bool, int, float, float]:
    return (decision.allowed, decision.remaining, decision.retry_after, decision.reset_after)


INF = math.inf


async def test_fixed_window_table(backend: Any, clock: Any) -> None:
    await run_steps(
        backend,
        clock,
        FixedWindow(3, 10),
        [
            (0, 1, (True, 2, 0, 10.0)),  # window [T0, T0+10s)
            (2_500_000, 1, (True, 1, 0, 7.5)),
            (2_500_000, 1, (True, 0, 0, 7.5)),
            (2_500_000, 1, (False, 0, 7.5, 7.5)),  # full: wait for the window to end
            (9_999_999, 1, (False, 0, 0.000001, 0.000001)),
            (10 * US, 1, (True, 2, 0, 10.0)),  # rollover: a fresh window
            (10 * US, 2, (True, 0, 0, 10.0)),  # cost 2
            (10 * US, 4, (False, 0, INF, 10.0)),  # cost above the limit: never
            (25 * US, 3, (True, 0, 0, 5.0)),  # a skipped window leaves nothing behind
        ],
    )


async def test_sliding_window_log_table(backend: Any, clock: Any) -> None:
    await run_steps(
        backend,
        clock,
        SlidingWindow(3, 10),
        [
            (0, 1, (True, 2, 0, 10.0)),
            (1 * US, 1, (True, 1, 0, 10.0)),
            (2 * US, 1, (True, 0, 0, 10.0)),
            # Full: the oldest entry (T0) leaves at T0+10; the newest (T0+2) at T0+12.
            (3 * US, 1, (False, 0, 7.0, 9.0)),
            (9_999_999, 1, (False, 0, 0.000001, 2.000001)),  # not recorded: nothing moved
            (10 * US, 1, (True, 0, 0, 10.0)),  # T0 is out (scores <= now - window are gone)
            # Live: T0+1, T0+2, T0+10; cost 2 needs the two oldest out, the 2nd leaves at T0+12.
            (10 * US, 2, (False, 0, 2.0, 10.0)),
            (12 * US, 2, (True, 0, 0, 10.0)),  # live: T0+10 only, so 2 fit
            (12 * US, 4, (False, 0, INF, 10.0)),
            (30 * US, 1, (True, 2, 0, 10.0)),
        ],
    )


async def test_gcra_table(backend: Any, clock: Any) -> None:
    # 2 per second, burst 2: interval 0.5 s, tolerance 1 s.
    await run_steps(
        backend,
        clock,
        GCRA(2, 1),
        [
            (0, 1, (True, 1, 0, 0.5)),  # tat T0 -> T0+0.5
            (0, 1, (True, 0, 0, 1.0)),  # tat -> T0+1
            (0, 1, (False, 0, 0.5, 1.0)),  # new tat T0+1.5 exceeds now+1 by 0.5
            (250_000, 1, (False, 0, 0.25, 0.75)),
            (500_000, 1, (True, 0, 0, 1.0)),  # tat -> T0+1.5
            (500_000, 3, (False, 0, INF, 1.0)),
            (1_250_000, 1, (True, 0, 0, 0.75)),  # tat T0+1.5 -> T0+2.0; (1 - 0.75) / 0.5 = 0.5 -> 0
            (5 * US, 2, (True, 0, 0, 1.0)),  # idle: tat = now, cost 2 uses the whole burst
            (7 * US, 1, (True, 1, 0, 0.5)),
        ],
    )


async def test_gcra_interval_rounds_up(backend: Any, clock: Any) -> None:
    # 3 per second, burst 1: interval ceil(1e6 / 3) = 333,334 us.
    await run_steps(
        backend,
        clock,
        GCRA(3, 1, burst=1),
        [
            (0, 1, (True, 0, 0, 0.333334)),
            (333_333, 1, (False, 0, 0.000001, 0.000001)),
            (333_334, 1, (True, 0, 0, 0.333334)),
        ],
    )


async def test_token_bucket_table(backend: Any, clock: Any) -> None:
    # 4 tokens, 2 tokens per second: one token every 0.5 s, empty to full in 2 s.
    await run_steps(
        backend,
        clock,
        TokenBucket(4, 2),
        [
            (0, 1, (True, 3, 0, 0.5)),
            (0, 3, (True, 0, 0, 2.0)),
            (0, 1, (False, 0, 0.5, 2.0)),
            (250_000, 1, (False, 0, 0.25, 1.75)),  # half a token refilled
            (500_000, 1, (True, 0, 0, 2.0)),
            (1_500_000, 2, (True, 0, 0, 2.0)),  # refilled 2 tokens in 1 s
            (1_500_000, 5, (False, 0, INF, 2.0)),  # above capacity
            (2_750_000, 3, (False, 2, 0.25, 0.75)),  # 2.5 tokens: half a token (0.25 s) short of 3
            (3_250_000, 3, (True, 0, 0, 1.75)),  # 3.5 tokens, 0.5 left: 3.5 tokens to refill
            (9 * US, 1, (True, 3, 0, 0.5)),  # refill stops at capacity
        ],
    )


async def test_token_bucket_slow_refill(backend: Any, clock: Any) -> None:
    # 1 token per 4 s = 0.25 micro-tokens per us: floor(t * rate) reaches 1e6 at t = 4,000,000.
    await run_steps(
        backend,
        clock,
        TokenBucket(1, 0.25),
        [
            (0, 1, (True, 0, 0, 4.0)),
            (3_999_999, 1, (False, 0, 0.000001, 0.000001)),
            (4 * US, 1, (True, 0, 0, 4.0)),
        ],
    )


async def test_sliding_window_counter_table(backend: Any, clock: Any) -> None:
    # 4 per 10 s windows; the previous window counts in proportion to its overlap.
    await run_steps(
        backend,
        clock,
        SlidingWindowCounter(4, 10),
        [
            (1 * US, 1, (True, 3, 0, 19.0)),  # current 1; weighs until the next window ends
            (1 * US, 3, (True, 0, 0, 19.0)),
            # Only the next window can take it: 9 s to get there, then 4*(10-e)/10 + 1 <= 4
            # needs e >= 2.5 s.
            (1 * US, 1, (False, 0, 11.5, 19.0)),
            # Next window, e = 2.5 s - 1 us: 4 * 7.500001 / 10 = 3.0000004, + 1 > 4.
            (12_499_999, 1, (False, 0, 0.000001, 7.500001)),
            (12_500_000, 1, (True, 0, 0, 17.5)),  # 3.0 + 1 = 4
            # weighted 4 * 2.5 / 10 = 1, current 1: floor(4 - 1 - 1) = 2 remain.
            (17_500_000, 2, (True, 0, 0, 12.5)),
            (17_500_000, 5, (False, 0, INF, 12.5)),
            (40 * US, 4, (True, 0, 0, 20.0)),  # two windows later nothing weighs
        ],
    )


async def test_window_counter_waits_inside_the_window_for_the_previous_to_fade(backend: Any, clock: Any) -> None:
    policy = SlidingWindowCounter(10, 10)
    clock.now = T0
    assert seen((await backend.hit("k", [policy], 10))[0]) == (True, 0, 0, 20.0)
    # T0+10: previous 10 weighs 10 * (10 - 0) / 10 = 10.  Cost 2 fits once 10*(10-e)/10 <= 8, e = 2 s.
    clock.now = T0 + 10 * US
    assert seen((await backend.hit("k", [policy], 2))[0]) == (False, 0, 2.0, 10.0)
    clock.now = T0 + 12 * US
    assert seen((await backend.hit("k", [policy], 2))[0]) == (True, 0, 0, 18.0)


ALL_POLICIES: list[Policy] = [
    FixedWindow(3, 10),
    SlidingWindow(3, 10),
    GCRA(3, 10),
    TokenBucket(3, 0.3),
    SlidingWindowCounter(3, 10),
]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.algorithm)
async def test_cost_above_capacity_is_never_allowed_and_takes_nothing(backend: Any, clock: Any, policy: Policy) -> None:
    clock.now = T0
    [decision] = await backend.hit("k", [policy], 4)
    assert decision.allowed is False
    assert decision.retry_after == math.inf
    assert decision.never is True
    assert decision.remaining == 3
    assert decision.reset_after == 0
    # Nothing was taken: the full capacity is still there.
    [decision] = await backend.hit("k", [policy], 3)
    assert decision.allowed is True
    assert decision.never is False


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.algorithm)
async def test_a_denied_hit_takes_nothing(backend: Any, clock: Any, policy: Policy) -> None:
    clock.now = T0
    assert [d.allowed for d in await backend.hit("k", [policy], 3)] == [True]
    for _ in range(5):
        [denied] = await backend.hit("k", [policy], 1)
        assert not denied.allowed
        assert 0 < denied.retry_after < math.inf
    # Waiting exactly the promised time lets the hit through: the denials recorded nothing.
    clock.now += round(denied.retry_after * US)
    [decision] = await backend.hit("k", [policy], 1)
    assert decision.allowed


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.algorithm)
async def test_identities_and_policies_are_independent(backend: Any, clock: Any, policy: Policy) -> None:
    clock.now = T0
    assert (await backend.hit("alice", [policy], 3))[0].allowed
    assert not (await backend.hit("alice", [policy], 1))[0].allowed
    assert (await backend.hit("bob", [policy], 3))[0].allowed
    other = FixedWindow(1, 10) if not isinstance(policy, FixedWindow) else FixedWindow(1, 20)
    assert (await backend.hit("alice", [other], 1))[0].allowed


async def test_multi_policy_hit_is_all_or_nothing(backend: Any, clock: Any) -> None:
    generous, strict = FixedWindow(5, 10), SlidingWindow(2, 10)
    clock.now = T0
    assert [seen(d) for d in await backend.hit("k", [generous, strict])] == [(True, 4, 0, 10.0), (True, 1, 0, 10.0)]
    assert [seen(d) for d in await backend.hit("k", [generous, strict])] == [(True, 3, 0, 10.0), (True, 0, 0, 10.0)]
    # The strict policy denies: each decision carries its own verdict, and neither takes the hit.
    third = await backend.hit("k", [generous, strict])
    assert [seen(d) for d in third] == [(True, 3, 0, 10.0), (False, 0, 10.0, 10.0)]
    assert [d.policy for d in third] == [generous, strict]
    assert seen((await backend.hit("k", [generous]))[0]) == (True, 2, 0, 10.0)


async def test_multi_policy_cost_counts_once_per_policy(backend: Any, clock: Any) -> None:
    policies = [
        FixedWindow(10, 10),
        GCRA(10, 10),
        TokenBucket(10, 1),
        SlidingWindow(10, 10),
        SlidingWindowCounter(10, 10),
    ]
    clock.now = T0
    decisions = await backend.hit("k", policies, 4)
    assert [(d.allowed, d.remaining) for d in decisions] == [(True, 6)] * 5
    # A cost that one policy cannot take is refused by all of them.
    decisions = await backend.hit("k", [*policies, FixedWindow(3, 10)], 4)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].never
    assert [d.remaining for d in await backend.hit("k", policies, 6)] == [0] * 5


async def test_hit_many_is_all_or_nothing_across_identities(backend: Any, clock: Any) -> None:
    per_user, per_key = FixedWindow(1, 10), SlidingWindow(5, 10)
    clock.now = T0
    decisions = await backend.hit_many([("user", per_user, 1), ("api-key", per_key, 1)])
    assert [seen(d) for d in decisions] == [(True, 0, 0, 10.0), (True, 4, 0, 10.0)]
    decisions = await backend.hit_many([("user", per_user, 1), ("api-key", per_key, 1)])
    assert [seen(d) for d in decisions] == [(False, 0, 10.0, 10.0), (True, 4, 0, 10.0)]
    # The api key's allowance was not touched by the denied call.
    assert seen((await backend.hit("api-key", [per_key]))[0]) == (True, 3, 0, 10.0)
    # Different costs per entry.
    decisions = await backend.hit_many([("other", per_user, 1), ("api-key", per_key, 3)])
    assert [seen(d) for d in decisions] == [(True, 0, 0, 10.0), (True, 0, 0, 10.0)]


async def test_one_state_twice_in_a_hit_is_refused(backend: Any) -> None:
    from asgi_ratelimit import ConfigurationError

    with pytest.raises(ConfigurationError):
        await backend.hit("k", [GCRA(10, 1), GCRA(10, 1, burst=10)])
    with pytest.raises(ConfigurationError):
        await backend.hit_many([("k", FixedWindow(1, 1), 1), ("k", FixedWindow(1, 1), 1)])


@pytest.mark.parametrize("cost", [0, -3, 1.5])
async def test_bad_costs_are_refused(backend: Any, cost: Any) -> None:
    from asgi_ratelimit import ConfigurationError

    with pytest.raises(ConfigurationError):
        await backend.hit("k", [FixedWindow(1, 1)], cost)


async def test_no_policies_no_decisions(backend: Any) -> None:
    assert await backend.hit("k", []) == []
    assert await backend.hit_many([]) == []


async def test_large_timestamps_stay_exact(backend: Any, clock: Any) -> None:
    # Year 2096, an odd microsecond: 2^52 is about 4.5e15, so these numbers need all 53 bits
    # of a double and would lose the microsecond through any float seconds.
    base = 4_000_003_200_000_000  # a multiple of 7200 s
    # 2^-12 tokens per second is an exact double: one token per 4096 s.
    policies = [FixedWindow(2, 3600), SlidingWindow(2, 3600), GCRA(2, 7200), TokenBucket(2, 2**-12)]
    clock.now = base + 1
    assert [seen(d) for d in await backend.hit("k", policies, 2)] == [
        (True, 0, 0, 3599.999999),
        (True, 0, 0, 3600.0),
        (True, 0, 0, 7200.0),
        (True, 0, 0, 8192.0),
    ]
    clock.now = base + 3_599_999_999
    assert [seen(d) for d in await backend.hit("k", policies, 1)] == [
        (False, 0, 0.000001, 0.000001),  # the window ends at base + 3600 s
        (False, 0, 0.000002, 0.000002),  # both entries (base + 1us) leave at base + 3600 s + 1us
        (False, 0, 0.000002, 3600.000002),  # tat = base + 7200 s + 1us
        (False, 0, 496.000002, 4592.000002),  # refill counted from base + 1us: 4096 s a token
    ]
    clock.now = base + 3_600_000_002
    [fixed] = await backend.hit("k", policies[:1], 1)
    assert seen(fixed) == (True, 1, 0, 3599.999998)


@pytest.mark.parametrize(
    "policy",
    [
        TokenBucket(3, 3 / 11),
        TokenBucket(11, 0.7),
        TokenBucket(7, 13 / 9),
        GCRA(7, 3),
        GCRA(5, 1, burst=2),
        SlidingWindow(4, 1.5),
        FixedWindow(3, 0.7),
    ],
    ids=str,
)
async def test_retry_after_and_reset_after_are_exact_to_the_microsecond(
    backend: Any, clock: Any, policy: Policy
) -> None:
    """Retrying one microsecond early fails, retrying at retry_after succeeds; same for the full reset."""
    clock.now = T0 + 123_457
    capacity = policy.capacity
    steps = [1, capacity - 1, 1, 2]
    for cost in steps:
        [decision] = await backend.hit("k", [policy], min(cost, capacity))
        if decision.allowed:
            continue
        wait = round(decision.retry_after * US)
        assert wait >= 1
        clock.now += wait - 1
        assert not (await backend.hit("k", [policy], min(cost, capacity)))[0].allowed
        clock.now += 1
        assert (await backend.hit("k", [policy], min(cost, capacity)))[0].allowed
    # Back to full after reset_after: a hit of the whole capacity fits then, not a microsecond before.
    clock.now += 17
    [probe] = await backend.hit("k", [policy], capacity + 1)
    assert probe.never
    reset = round(probe.reset_after * US)
    assert reset > 0
    clock.now += reset - 1
    [early] = await backend.hit("k", [policy], capacity)
    assert not early.allowed
    assert early.remaining < capacity
    clock.now += 1
    [full] = await backend.hit("k", [policy], capacity)
    assert full.allowed
