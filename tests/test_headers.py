"""headers.py: the exact wire format of RateLimit, RateLimit-Policy, Retry-After and X-RateLimit-*.

Every formatted value is read back with http_sfv, an independent RFC 9651 parser.
"""

from __future__ import annotations

import math

import http_sfv
import pytest
from conftest import parse_sf_list
from hypothesis import given
from hypothesis import strategies as st

from asgi_ratelimit import ConfigurationError, Decision
from asgi_ratelimit.headers import (
    HEADER_MODES,
    NEVER_SECONDS,
    check_mode,
    one_limit_headers,
    policy_item,
    rate_limit_headers,
    retry_after_seconds,
    sf_string,
)


def allowed(limit: int, remaining: int, reset_after: float) -> Decision:
    return Decision(allowed=True, limit=limit, remaining=remaining, retry_after=0.0, reset_after=reset_after)


def denied(limit: int, retry_after: float, remaining: int = 0, reset_after: float = 60.0) -> Decision:
    return Decision(allowed=False, limit=limit, remaining=remaining, retry_after=retry_after, reset_after=reset_after)


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"a header appears twice: {names}"
    assert all(name == name.lower() for name in names), "ASGI header names are lowercase"
    return {name.decode(): value.decode("ascii") for name, value in headers}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login", '"login"'),
        ("/users/{id}", '"/users/{id}"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("café", '"caf?"'),
        ("tab\there", '"tab?here"'),
        ("", '""'),
    ],
)
def test_sf_string(text: str, expected: str) -> None:
    assert sf_string(text) == expected
    item = http_sfv.Item()
    item.parse(expected.encode())
    assert item.value == text.encode("ascii", "replace").decode().replace("\t", "?")


@given(st.text(max_size=40))
def test_any_name_becomes_a_valid_string(text: str) -> None:
    item = http_sfv.Item()
    item.parse(sf_string(text).encode("ascii"))
    assert isinstance(item.value, str) and not isinstance(item.value, http_sfv.Token)
    assert len(item.value) == len(text)


def test_policy_item() -> None:
    assert policy_item("login", 5, 60) == '"login";q=5;w=60'
    assert parse_sf_list(policy_item('a"b', 100, 3600).encode()) == [('a"b', {"q": 100, "w": 3600})]


@pytest.mark.parametrize(
    ("wait", "seconds"),
    [(0.0, 1), (0.000001, 1), (0.5, 1), (0.999999, 1), (1.0, 1), (1.000001, 2), (59.5, 60), (60.0, 60), (3599.1, 3600)],
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait: float, seconds: int) -> None:
    assert retry_after_seconds(denied(5, wait)) == seconds


def test_retry_after_for_a_cost_that_can_never_pass() -> None:
    assert retry_after_seconds(denied(5, math.inf)) == NEVER_SECONDS
    assert NEVER_SECONDS == 365 * 86_400


class TestRateLimitHeaders:
    def test_allowed_ietf(self) -> None:
        headers = as_dict(rate_limit_headers([allowed(10, 7, 12.2)], ['"api";q=10;w=60'], ['"api"'], "ietf", False))
        assert headers == {"ratelimit-policy": '"api";q=10;w=60', "ratelimit": '"api";r=7;t=13'}

    def test_t_is_zero_when_the_allowance_is_full(self) -> None:
        headers = as_dict(rate_limit_headers([allowed(10, 10, 0.0)], ['"api";q=10;w=60'], ['"api"'], "ietf", False))
        assert headers["ratelimit"] == '"api";r=10;t=0'

    def test_denied_ietf_with_retry_after(self) -> None:
        headers = as_dict(
            rate_limit_headers([denied(10, 41.2, reset_after=59.0)], ['"api";q=10;w=60'], ['"api"'], "ietf", True)
        )
        # On a denial t is the wait before this request could pass, not the time until full.
        assert headers == {"ratelimit-policy": '"api";q=10;w=60', "ratelimit": '"api";r=0;t=42', "retry-after": "42"}

    def test_several_policies_one_list(self) -> None:
        decisions = [denied(2, 4.5, reset_after=9.0), allowed(100, 98, 3599.0), denied(10, 30.0, remaining=3)]
        items = ['"a:10s";q=2;w=10', '"a:3600s";q=100;w=3600', '"b";q=10;w=60']
        names = ['"a:10s"', '"a:3600s"', '"b"']
        headers = as_dict(rate_limit_headers(decisions, items, names, "ietf", True))
        assert parse_sf_list(headers["ratelimit-policy"].encode()) == [
            ("a:10s", {"q": 2, "w": 10}),
            ("a:3600s", {"q": 100, "w": 3600}),
            ("b", {"q": 10, "w": 60}),
        ]
        assert parse_sf_list(headers["ratelimit"].encode()) == [
            ("a:10s", {"r": 0, "t": 5}),
            ("a:3600s", {"r": 98, "t": 3599}),
            ("b", {"r": 3, "t": 30}),
        ]
        # The longest wait among the limits that denied; an allowing limit's t does not count.
        assert headers["retry-after"] == "30"

    def test_never_a_retry_after_when_not_denying(self) -> None:
        # A dry run: the decision denied, the response does not.
        headers = as_dict(rate_limit_headers([denied(10, 5.0)], ['"api";q=10;w=60'], ['"api"'], "both", False))
        assert "retry-after" not in headers
        assert headers["ratelimit"] == '"api";r=0;t=5'

    def test_legacy(self) -> None:
        headers = as_dict(rate_limit_headers([allowed(10, 7, 12.2)], ['"api";q=10;w=60'], ['"api"'], "legacy", False))
        assert headers == {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "7", "x-ratelimit-reset": "13"}

    def test_legacy_follows_the_tightest_limit(self) -> None:
        decisions = [allowed(100, 50, 100.0), allowed(10, 2, 30.0)]
        headers = as_dict(rate_limit_headers(decisions, ['"a"', '"b"'], ['"a"', '"b"'], "legacy", False))
        assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("10", "2")
        assert headers["x-ratelimit-reset"] == "30"

    def test_legacy_on_a_denial_follows_the_longest_wait(self) -> None:
        decisions = [denied(5, 3.0), denied(100, 80.0), allowed(1000, 900, 10.0)]
        headers = as_dict(rate_limit_headers(decisions, ['"a"', '"b"', '"c"'], ['"a"', '"b"', '"c"'], "legacy", True))
        assert headers == {
            "x-ratelimit-limit": "100",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": "80",  # seconds from now, never an epoch timestamp
            "retry-after": "80",
        }

    def test_both_and_none(self) -> None:
        both = as_dict(rate_limit_headers([denied(1, 2.0)], ['"x";q=1;w=60'], ['"x"'], "both", True))
        assert set(both) == {
            "ratelimit-policy",
            "ratelimit",
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
            "retry-after",
        }
        none = as_dict(rate_limit_headers([denied(1, 2.0)], ['"x";q=1;w=60'], ['"x"'], "none", True))
        assert none == {"retry-after": "2"}  # a 429 always says when to come back
        assert rate_limit_headers([allowed(1, 1, 0.0)], ['"x";q=1;w=60'], ['"x"'], "none", False) == []

    def test_no_decisions_no_headers(self) -> None:
        assert rate_limit_headers([], [], [], "both", False) == []


allowed_strategy = st.builds(allowed, st.integers(1, 10**6), st.integers(0, 10**6), st.floats(0, 10**6))
decision_strategy = st.one_of(
    allowed_strategy,
    st.builds(
        denied,
        st.integers(1, 10**6),
        st.one_of(st.floats(0, 10**6), st.just(math.inf)),
        st.integers(0, 10**6),
        st.floats(0, 10**6),
    ),
)


@given(st.lists(decision_strategy, min_size=1, max_size=5))
def test_headers_always_parse_and_retry_after_covers_every_denial(decisions: list[Decision]) -> None:
    names = [f"p{i}" for i in range(len(decisions))]
    items = [policy_item(n, d.limit, 60) for n, d in zip(names, decisions, strict=True)]
    is_denied = not all(d.allowed for d in decisions)
    headers = as_dict(rate_limit_headers(decisions, items, [sf_string(n) for n in names], "both", is_denied))
    state = parse_sf_list(headers["ratelimit"].encode())
    assert [name for name, _ in state] == names
    assert [name for name, _ in parse_sf_list(headers["ratelimit-policy"].encode())] == names
    for (_, params), decision in zip(state, decisions, strict=True):
        assert params["r"] == decision.remaining
        if not decision.allowed:
            assert params["t"] >= 1
    if is_denied:
        retry = int(headers["retry-after"])
        assert retry >= 1
        assert all(retry >= params["t"] for (_, params), d in zip(state, decisions, strict=True) if not d.allowed)
        assert int(headers["x-ratelimit-reset"]) == retry
    else:
        assert "retry-after" not in headers


@pytest.mark.parametrize("mode", HEADER_MODES)
def test_check_mode_accepts_the_modes(mode: str) -> None:
    assert check_mode(mode) == mode


@pytest.mark.parametrize("mode", ["IETF", "draft", "", "x-ratelimit"])
def test_check_mode_rejects_anything_else(mode: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(mode)):
        check_mode(mode)


@given(name=st.text(min_size=1, max_size=30), decision=allowed_strategy)
def test_a_rules_preformatted_headers_equal_the_general_ones(name: str, decision: Decision) -> None:
    # A rule with one limit formats its headers ahead of time (names with % and quotes included);
    # what it sends must be exactly what the general path builds.
    from asgi_ratelimit import Rule

    limits = Rule("/", "5/minute", name=name).static
    assert limits is not None
    general = rate_limit_headers([decision], limits.policy_items, limits.item_names, "ietf", denied=False)
    assert limits.state_format is not None
    fast = one_limit_headers(limits.policy_header, limits.state_format, decision)
    assert fast == general
    assert [n for n, _ in parse_sf_list(as_dict(fast)["ratelimit"].encode())] == [
        n for n, _ in parse_sf_list(as_dict(fast)["ratelimit-policy"].encode())
    ]
