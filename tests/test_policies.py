"""Policies: validation, the derived parameters both backends share, parse_limit, Decision, keys."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asgi_ratelimit import (
    GCRA,
    ConfigurationError,
    Decision,
    FixedWindow,
    Rule,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
    parse_limit,
    parse_limits,
)
from asgi_ratelimit._keys import digest, state_key
from asgi_ratelimit.backends.base import check_hits, decisions_from_flat
from asgi_ratelimit.policies import Concurrency, Policy

# (constructor, the field its message must name, the bad value as the message quotes it)
INVALID_POLICIES = [
    (lambda: FixedWindow(0, 60), "limit", "0"),
    (lambda: FixedWindow(-5, 60), "limit", "-5"),
    (lambda: FixedWindow(1.5, 60), "limit", "1.5"),  # type: ignore[arg-type]
    (lambda: FixedWindow(True, 60), "limit", "True"),
    (lambda: FixedWindow("10", 60), "limit", "'10'"),  # type: ignore[arg-type]
    (lambda: FixedWindow(1_000_000_001, 60), "limit", "1000000001"),
    (lambda: FixedWindow(10, 0), "window", "0"),
    (lambda: FixedWindow(10, -1), "window", "-1"),
    (lambda: FixedWindow(10, 0.0001), "window", "0.0001"),
    (lambda: FixedWindow(10, math.nan), "window", "nan"),
    (lambda: FixedWindow(10, math.inf), "window", "inf"),
    (lambda: FixedWindow(10, "60"), "window", "'60'"),  # type: ignore[arg-type]
    (lambda: FixedWindow(10, 366 * 86400 + 1), "window", "31622401"),
    (lambda: SlidingWindow(0, 1), "limit", "0"),
    (lambda: SlidingWindow(5, 0), "window", "0"),
    (lambda: SlidingWindowCounter(0, 1), "limit", "0"),
    (lambda: SlidingWindowCounter(5, None), "window", "None"),  # type: ignore[arg-type]
    (lambda: GCRA(0, 1), "limit", "0"),
    (lambda: GCRA(10, 0), "period", "0"),
    (lambda: GCRA(10, 1, burst=0), "burst", "0"),
    (lambda: GCRA(10, 1, burst=2.5), "burst", "2.5"),  # type: ignore[arg-type]
    # A tolerance (burst intervals) beyond two years would leave the scripts' exact range.
    (lambda: GCRA(1, 366 * 86400, burst=3), "burst", "3"),
    (lambda: TokenBucket(0, 1), "capacity", "0"),
    (lambda: TokenBucket(10, 0), "refill_rate", "0"),
    (lambda: TokenBucket(10, -1), "refill_rate", "-1"),
    (lambda: TokenBucket(10, math.inf), "refill_rate", "inf"),
    (lambda: TokenBucket(10, "1"), "refill_rate", "'1'"),  # type: ignore[arg-type]
    (lambda: TokenBucket(10, 1e-7), "refill_rate", "1e-07"),
    # An empty bucket that takes longer than the longest window to fill.
    (lambda: TokenBucket(1_000_000_000, 1e-6), "refill_rate", "1e-06"),
    (lambda: Concurrency(0, 30), "limit", "0"),
    (lambda: Concurrency(10, 0), "timeout", "0"),
]


@pytest.mark.parametrize(("build", "field_name", "quoted"), INVALID_POLICIES)
def test_invalid_policy_raises_configuration_error_naming_field_and_value(
    build: object, field_name: str, quoted: str
) -> None:
    assert callable(build)
    with pytest.raises(ConfigurationError) as info:
        build()
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert field_name in message
    assert quoted in message


@pytest.mark.parametrize(
    ("policy", "quota", "window_seconds", "capacity", "params"),
    [
        (FixedWindow(10, 60), 10, 60, 10, ("10", "60000000")),
        (SlidingWindow(5, 0.5), 5, 1, 5, ("5", "500000")),
        (SlidingWindowCounter(100, 3600), 100, 3600, 100, ("100", "3600000000")),
        # The emission interval rounds up: 1 s / 3 is 333,334 us, never a faster rate.
        (GCRA(3, 1), 3, 2, 3, ("333334", "3")),
        (GCRA(10, 60, burst=2), 2, 12, 2, ("6000000", "2")),
        # Token bucket: quota = capacity, window = time to fill from empty, rate in tokens/s.
        (TokenBucket(10, 2), 10, 5, 10, ("2.0", "10")),
        (TokenBucket(3, 3 / 11), 3, 11, 3, ("0.2727272727272727", "3")),
    ],
)
def test_derived_parameters(
    policy: Policy, quota: int, window_seconds: int, capacity: int, params: tuple[str, str]
) -> None:
    assert policy.quota == quota
    assert policy.window_seconds == window_seconds
    assert policy.capacity == capacity
    assert policy.script_args == (str(policy.code).encode(), params[0].encode(), params[1].encode())
    assert policy.key_suffix == f"{policy.code}:{params[0]}:{params[1]}"


def test_policies_are_frozen_and_hashable() -> None:
    policy = FixedWindow(10, 60)
    with pytest.raises(AttributeError):
        policy.limit = 11  # type: ignore[misc]
    assert {policy: 1}[FixedWindow(10, 60)] == 1


def test_policy_key_suffixes_differ_by_algorithm_and_parameters() -> None:
    policies = [
        FixedWindow(10, 60),
        FixedWindow(10, 61),
        FixedWindow(11, 60),
        SlidingWindow(10, 60),
        SlidingWindowCounter(10, 60),
        GCRA(10, 60),
        GCRA(10, 60, burst=5),
        TokenBucket(10, 1),
    ]
    assert len({p.key_suffix for p in policies}) == len(policies)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/second", SlidingWindow(10, 1)),
        ("100/minute", SlidingWindow(100, 60)),
        ("5000/hour", SlidingWindow(5000, 3600)),
        ("10000/day", SlidingWindow(10000, 86400)),
        ("5 per 10 seconds", SlidingWindow(5, 10)),
        ("5 per 10 second", SlidingWindow(5, 10)),
        ("2/seconds", SlidingWindow(2, 1)),
        ("100/Minute", SlidingWindow(100, 60)),
        ("100 PER MINUTE", SlidingWindow(100, 60)),
        ("  7 / 2 hours  ", SlidingWindow(7, 7200)),
        ("3 per 1.5 minutes", SlidingWindow(3, 90)),
        ("1 per 0.5 seconds", SlidingWindow(1, 0.5)),
        ("1/day", SlidingWindow(1, 86400)),
        ("100/week", SlidingWindow(100, 7 * 86400)),
        ("100 per 2 weeks", SlidingWindow(100, 14 * 86400)),
        ("1000/month", SlidingWindow(1000, 30 * 86400)),
        ("5 per 3 Months", SlidingWindow(5, 90 * 86400)),
        ("10000/year", SlidingWindow(10000, 365 * 86400)),
        ("1 per 1 years", SlidingWindow(1, 365 * 86400)),
    ],
)
def test_parse_limit(text: str, expected: Policy) -> None:
    assert parse_limit(text, "sliding_window") == expected


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("sliding_window", SlidingWindow(100, 60)),
        ("fixed_window", FixedWindow(100, 60)),
        ("sliding_window_counter", SlidingWindowCounter(100, 60)),
        ("gcra", GCRA(100, 60)),
        ("token_bucket", TokenBucket(100, 100 / 60)),
    ],
)
def test_parse_limit_algorithms(algorithm: str, expected: Policy) -> None:
    policy = parse_limit("100/minute", algorithm)
    assert policy == expected
    assert type(policy) is type(expected)
    assert policy.quota == 100


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "ten/second",
        "10/fortnight",
        "10/sec",
        "10 per",
        "/second",
        "-1/second",
        "1.5/second",
        "10//second",
        "10 / 0 seconds",
        "0/second",
        "10/second extra",
        "\u0661\u0660/second",  # Arabic-Indic digits: not ASCII
        "10/-5 seconds",
    ],
)
def test_parse_limit_rejects_bad_text_quoting_it(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_limit(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10/second;1000/hour", (SlidingWindow(10, 1), SlidingWindow(1000, 3600))),
        ("10/second, 1000/hour", (SlidingWindow(10, 1), SlidingWindow(1000, 3600))),
        (
            "10 per second; 100 per 5 minutes, 1000 per day",
            (SlidingWindow(10, 1), SlidingWindow(100, 300), SlidingWindow(1000, 86400)),
        ),
        ("5/minute", (SlidingWindow(5, 60),)),
        (" 1/week ;1/year ", (SlidingWindow(1, 7 * 86400), SlidingWindow(1, 365 * 86400))),
    ],
)
def test_parse_limits_reads_several_limits_in_order(text: str, expected: tuple[Policy, ...]) -> None:
    assert parse_limits(text, "sliding_window") == expected


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("10/second;10/fortnight", "'10/fortnight' in '10/second;10/fortnight'"),
        ("10/second, ten/hour", "'ten/hour' in '10/second, ten/hour'"),
        ("10/second;", "Invalid limits '10/second;': an empty limit"),
        (";10/second", "Invalid limits ';10/second': an empty limit"),
        ("10/second;;1/hour", "an empty limit"),
        ("0/second;1/hour", "'0/second' in '0/second;1/hour': the count and the window must be above zero"),
        ("1/second|1/hour", "Invalid limit '1/second|1/hour': expected"),
        ("", "Invalid limit '': expected"),
    ],
)
def test_parse_limits_errors_quote_the_bad_part(text: str, quoted: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_limits(text)
    assert quoted in str(info.value)
    assert "week, month = 30 days or year = 365 days" in str(info.value) or "empty" in quoted or "zero" in quoted


def test_parse_limit_points_a_list_to_parse_limits() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("it holds several limits; parse_limits()")):
        parse_limit("10/second;1000/hour")


def test_a_rule_takes_several_limits_in_one_string_and_names_itself_in_errors() -> None:
    rule = Rule("/x", ["10/second;1000/hour", "1/year"], algorithm="fixed_window")
    assert rule.static is not None
    assert rule.static.policies == (FixedWindow(10, 1), FixedWindow(1000, 3600), FixedWindow(1, 365 * 86400))
    with pytest.raises(
        ConfigurationError, match=re.escape("Rule '/x': Invalid limit '10/fortnight' in '1/second;10/fortnight'")
    ):
        Rule("/x", "1/second;10/fortnight")
    with pytest.raises(ConfigurationError, match="the same limit appears twice"):
        Rule("/x", "1/second, 1 per second")


UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 604800,
    "month": 2592000,
    "year": 31536000,
}


@st.composite
def limit_texts(draw: st.DrawFn) -> tuple[str, int, int]:
    """A limit written any accepted way, with the count and window in seconds it means."""
    count = draw(st.integers(1, 10_000))
    unit = draw(st.sampled_from(sorted(UNIT_SECONDS)))
    max_mult = 366 * 86400 // UNIT_SECONDS[unit]
    mult = draw(st.none() | st.integers(1, max(1, min(max_mult, 1000))))
    per = draw(st.sampled_from(["/", "per", " per ", " / ", "PER"]))
    spelled = draw(st.sampled_from([unit, unit + "s", unit.upper(), unit.capitalize()]))
    space = draw(st.sampled_from(["", " ", "  "]))
    multiplier = "" if mult is None else f"{mult}{space}"
    if per.strip() == "per" or per.strip() == "PER":
        per = f" {per.strip()} "
    text = f"{space}{count}{per}{multiplier}{spelled}{space}"
    return text, count, UNIT_SECONDS[unit] * (mult or 1)


@given(
    st.lists(limit_texts(), min_size=1, max_size=4),
    st.lists(st.sampled_from([";", ",", " ; ", ", "]), min_size=3, max_size=3),
)
def test_parse_limits_reads_what_it_is_given(limits: list[tuple[str, int, int]], separators: list[str]) -> None:
    text = limits[0][0]
    for (part, _, _), separator in zip(limits[1:], separators, strict=False):
        text += separator + part
    assert parse_limits(text, "sliding_window") == tuple(SlidingWindow(count, seconds) for _, count, seconds in limits)


def test_parse_limit_rejects_values_out_of_range_naming_the_field() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("limit must be between 1 and 1,000,000,000")):
        parse_limit("2000000000/second")
    with pytest.raises(ConfigurationError, match="window"):
        parse_limit("1 per 400 days", "sliding_window")
    with pytest.raises(ConfigurationError, match="period"):
        parse_limit("1 per 400 days")


def test_parse_limit_rejects_non_strings_and_unknown_algorithms() -> None:
    with pytest.raises(ConfigurationError, match="Invalid limit 10"):
        parse_limit(10)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Unknown algorithm 'leaky'") as info:
        parse_limit("10/second", "leaky")
    assert "token_bucket" in str(info.value)


def test_decision_never_and_equality() -> None:
    never = Decision(allowed=False, limit=5, remaining=5, retry_after=math.inf, reset_after=0)
    later = Decision(allowed=False, limit=5, remaining=0, retry_after=1.5, reset_after=2)
    assert never.never is True
    assert later.never is False
    # The policy is carried along but does not take part in equality.
    assert Decision(True, 5, 4, 0, 1, policy=FixedWindow(5, 1)) == Decision(True, 5, 4, 0, 1)


def test_decisions_from_flat_converts_microseconds_exactly() -> None:
    policy = FixedWindow(3, 10)
    hits = [("k", policy, 1), ("k", SlidingWindow(3, 10), 4)]
    decisions = decisions_from_flat(hits, [1, 0, 2, 9_999_999, 0, -1, 3, 1])
    assert decisions[0] == Decision(True, 3, 2, 0, 9.999999)
    assert decisions[0].policy is policy
    assert decisions[1] == Decision(False, 3, 3, math.inf, 0.000001)
    assert decisions[1].never


@pytest.mark.parametrize("cost", [0, -1, 1.0, True, "1", None])
def test_check_hits_rejects_bad_costs(cost: object) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(repr(cost))):
        check_hits([("k", FixedWindow(1, 1), cost)])  # type: ignore[list-item]


def test_check_hits_rejects_one_state_key_twice() -> None:
    with pytest.raises(ConfigurationError, match="twice"):
        check_hits([("k", FixedWindow(1, 1), 1), ("k", FixedWindow(1, 1), 1)])
    # Unequal policies with the same state: decided on one old state, the second write would
    # undo the first and let the key over-admit.
    assert GCRA(10, 1) != GCRA(10, 1, burst=10)
    with pytest.raises(ConfigurationError, match="twice"):
        check_hits([("k", GCRA(10, 1), 1), ("k", GCRA(10, 1, burst=10), 1)])
    # The same policy for two identities is two states.
    check_hits([("a", FixedWindow(1, 1), 1), ("b", FixedWindow(1, 1), 1)])


@pytest.mark.parametrize(
    "identity",
    ["203.0.113.7", "", "{tag}", "}{", "a" * 100_000, "ünïcødé ✓ 🚦", "\ud800 lone surrogate", "0" * 24],
)
def test_keys_hash_identities_to_fixed_size(identity: str) -> None:
    hashed = digest(identity)
    assert re.fullmatch(r"[0-9a-f]{24}", hashed)
    key = state_key("rl:", hashed, FixedWindow(10, 60))
    assert key == f"rl:{{{hashed}}}:4:10:60000000"
    if identity:
        assert identity not in key


def test_digest_is_stable_and_distinguishes_identities() -> None:
    assert digest("alice") == digest("alice")
    assert len({digest(s) for s in ("alice", "Alice", "alice ", "bob", "")}) == 5


@pytest.mark.parametrize(
    "build",
    [lambda: SlidingWindow(5, 10**400), lambda: TokenBucket(5, 10**400), lambda: GCRA(5, 10**400)],
    ids=["window", "refill_rate", "period"],
)
def test_an_int_too_large_for_a_float_is_a_configuration_error(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


def test_the_exact_log_is_bounded_in_the_library_as_in_the_service() -> None:
    from asgi_ratelimit.policies import SLIDING_WINDOW_MAX_LIMIT

    assert SlidingWindow(SLIDING_WINDOW_MAX_LIMIT, 60).limit == SLIDING_WINDOW_MAX_LIMIT
    with pytest.raises(ConfigurationError, match="sliding_window_counter"):
        SlidingWindow(1_000_000_000, 60)
    with pytest.raises(ConfigurationError, match="10,000"):
        parse_limit("20000/hour", "sliding_window")
    assert parse_limit("20000/hour", "sliding_window_counter").quota == 20000


def test_a_limit_string_without_an_algorithm_is_gcra_whose_state_does_not_grow_with_the_limit() -> None:
    assert parse_limit("100/minute") == GCRA(100, 60)
    assert parse_limit("1000000/hour").quota == 1_000_000  # one timestamp per key, whatever the limit
