"""headers.py and what the package sends: RateLimit, RateLimit-Policy, Retry-After, X-RateLimit-*, the 429 body.

Every value is read back with http_sfv, an independent RFC 9651 parser, and each parameter is
checked against its meaning in draft-ietf-httpapi-ratelimit-headers-11: ``q`` and ``w`` the
policy, ``r`` the quota left, ``t`` the effective window (seconds within which using ``r`` is
safe; the wait on a denial), ``qu`` the quota unit, ``pk`` an opaque partition key.  What ``r``
and ``t`` promise is also checked against the engine itself: spending ``r`` within ``t`` passes.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import http_sfv
import httpx
import pytest
from conftest import ManualClock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from asgi_ratelimit import (
    GCRA,
    Concurrency,
    ConfigurationError,
    Decision,
    FixedWindow,
    MemoryBackend,
    RateLimitMiddleware,
    Rule,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
)
from asgi_ratelimit._headers import (
    HEADER_MODES,
    NEVER_SECONDS,
    QUOTA_EXCEEDED,
    QUOTA_UNITS,
    check_mode,
    effective_window,
    item_name,
    one_limit_headers,
    policy_item,
    rate_limit_headers,
    retry_after_seconds,
    sf_string,
)
from asgi_ratelimit.policies import ALGORITHMS, Policy

API = SlidingWindow(10, 60)  # q=10, w=60: the policy of the table tests


def allowed(limit: int, remaining: int, reset_after: float, policy: Policy | None = API) -> Decision:
    return Decision(True, limit, remaining, 0.0, reset_after, policy)


def denied(
    limit: int, retry_after: float, remaining: int = 0, reset_after: float = 60.0, policy: Policy | None = API
) -> Decision:
    return Decision(False, limit, remaining, retry_after, reset_after, policy)


def as_dict(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), f"a header appears twice: {names}"
    assert all(name == name.lower() for name in names), "ASGI header names are lowercase"
    return {name.decode(): value.decode("ascii") for name, value in headers}


# -- an independent reading of the two fields ------------------------------------------------

# Each parameter the draft defines, with the type RFC 9651 must parse it as.
POLICY_PARAMS: dict[str, type] = {"q": int, "w": int, "qu": str, "pk": bytes}
STATE_PARAMS: dict[str, type] = {"r": int, "t": int, "pk": bytes}


def read_field(value: str, allowed_params: dict[str, type]) -> list[tuple[str, dict[str, Any]]]:
    """A RateLimit or RateLimit-Policy value as (name, parameters) per item, with http_sfv.

    Checks what the draft requires of every item: a String (not a Token), only parameters the draft
    defines, each of its type (Integer, String, Byte Sequence), integers non-negative.
    """
    parsed = http_sfv.List()
    parsed.parse(value.encode("ascii"))
    items = []
    for member in parsed:
        assert isinstance(member, http_sfv.Item), f"{value!r}: inner lists are not allowed"
        assert isinstance(member.value, str) and not isinstance(member.value, http_sfv.Token), value
        params = dict(member.params)
        for name, param in params.items():
            assert name in allowed_params, f"{value!r}: unexpected parameter {name}"
            assert type(param) is allowed_params[name], f"{value!r}: {name} has the wrong type: {param!r}"
            if type(param) is int:
                assert param >= 0, value
        items.append((member.value, params))
    return items


@dataclass
class Seen:
    """One response's rate-limit headers, parsed and checked for the meaning of every parameter."""

    status: int
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    retry_after: int | None = None
    legacy: dict[str, int] = field(default_factory=dict)
    problem: dict[str, Any] | None = None


def check_response(status: int, headers: httpx.Headers, body: bytes, refused: Sequence[str] = ()) -> Seen:
    """Parse every rate-limit header of a response and check the draft's meaning of each parameter.

    ``refused`` names the items whose decision was a denial, when the body does not (a dry run).
    """
    seen = Seen(status)
    if status == 429 and headers.get("content-type") == "application/problem+json":
        refused = httpx.Response(status, content=body).json()["violated-policies"]
    if "ratelimit-policy" in headers or "ratelimit" in headers:
        policies = read_field(headers["ratelimit-policy"], POLICY_PARAMS)
        state = read_field(headers["ratelimit"], STATE_PARAMS)
        # One item per policy, in the same order, with the same names: a client matches them up.
        assert [name for name, _ in state] == [name for name, _ in policies]
        assert len({name for name, _ in policies}) == len(policies), "a policy name appears twice"
        seen.policies, seen.state = dict(policies), dict(state)
        for name, policy in seen.policies.items():
            current = seen.state[name]
            assert "q" in policy and "r" in current, (name, policy, current)
            assert policy.get("pk") == current.get("pk"), "the pk of a policy and of its state agree"
            if policy.get("qu") == "concurrent-requests":
                # No time window: no w, and no t (the draft's own example of a windowless item).
                assert "w" not in policy and "t" not in current, (name, policy, current)
                assert current["r"] <= policy["q"]
                continue
            assert policy.get("qu", "requests") in QUOTA_UNITS
            assert policy["w"] >= 1 and "t" in current, (name, policy, current)
            t, r = current["t"], current["r"]
            assert t >= 1, "an effective window of 0 would ask for r within no time at all"
            if name not in refused:
                # r / t never advertises more than the policy's own rate q / w (the draft's ratio cap);
                # a refusal's t is its wait instead, which Retry-After takes precedence over.
                assert r * policy["w"] <= t * policy["q"], (name, policy, current)
    if "retry-after" in headers:
        assert status >= 400, "Retry-After is never sent on a response the app produced"
        assert headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
        seen.retry_after = int(headers["retry-after"])
    for legacy in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
        if legacy in headers:
            assert headers[legacy].isdigit(), (legacy, headers[legacy])
            seen.legacy[legacy.removeprefix("x-ratelimit-")] = int(headers[legacy])
    if status == 429 and headers.get("content-type") == "application/problem+json":
        problem = httpx.Response(status, content=body).json()
        assert problem["type"] == QUOTA_EXCEEDED
        assert problem["title"] == "Quota Exceeded"
        assert problem["status"] == 429
        assert isinstance(problem["detail"], str) and problem["detail"]
        assert problem["retry_after"] == seen.retry_after
        violated = problem["violated-policies"]
        assert violated and all(isinstance(name, str) for name in violated)
        if seen.policies:
            # Named as in RateLimit-Policy, each with its t no later than Retry-After (its r may be above 0:
            # a request can cost more than is left).
            assert set(violated) <= set(seen.policies)
            assert seen.retry_after is not None
            for name in violated:
                assert seen.state[name].get("t", 1) <= seen.retry_after
            waits = [seen.state[name]["t"] for name in violated if "t" in seen.state[name]]
            if waits and all("t" in seen.state[name] for name in violated):
                assert max(waits) == seen.retry_after, "Retry-After is the longest wait among the refusals"
        seen.problem = problem
    return seen


# -- formatting --------------------------------------------------------------------------------


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


@given(st.text(max_size=40), st.booleans())
def test_item_name_reads_back_the_string(text: str, with_pk: bool) -> None:
    item = sf_string(text) + (";pk=:AAECAw==:" if with_pk else "")
    parsed = http_sfv.Item()
    parsed.parse(item.encode("ascii"))
    assert item_name(item) == parsed.value


def test_item_name_refuses_what_is_not_an_item() -> None:
    with pytest.raises(ValueError, match="String"):
        item_name("login;q=1")


def test_policy_item() -> None:
    assert policy_item("login", 5, 60) == '"login";q=5;w=60'
    assert policy_item("login", 5, 60, "requests") == '"login";q=5;w=60'  # the default unit is not sent
    assert policy_item("up", 65535, 10, "content-bytes") == '"up";q=65535;w=10;qu="content-bytes"'
    assert read_field(policy_item('a"b', 100, 3600).encode().decode(), POLICY_PARAMS) == [
        ('a"b', {"q": 100, "w": 3600})
    ]


@pytest.mark.parametrize(
    ("wait", "seconds"),
    [(0.0, 1), (0.000001, 1), (0.5, 1), (0.999999, 1), (1.0, 1), (1.000001, 2), (59.5, 60), (60.0, 60), (3599.1, 3600)],
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(wait: float, seconds: int) -> None:
    assert retry_after_seconds(denied(5, wait)) == seconds


def test_retry_after_for_a_cost_that_can_never_pass() -> None:
    assert retry_after_seconds(denied(5, math.inf)) == NEVER_SECONDS
    assert NEVER_SECONDS == 365 * 86_400


# -- t, the effective window -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "t"),
    [
        # A full allowance: the policy's window (never 0).
        (allowed(10, 10, 0.0), 60),
        # The policy's rate bounds r / t: 9 units at 10 per 60 s take 54 s.
        (allowed(10, 9, 6.0), 54),
        # Until the allowance is full, when that is longer: 1 unit left, all back in 59.2 s.
        (allowed(10, 1, 59.2), 60),
        (allowed(10, 0, 12.5), 13),
        # Never 0, even for an allowance a rounding left at "full in no time".
        (allowed(10, 0, 0.0), 1),
        # A denial: the wait before this request could pass.
        (denied(10, 41.2), 42),
        (denied(10, 0.2), 1),
        (denied(10, math.inf), NEVER_SECONDS),
        # No policy, no window (a concurrency limit): no t at all.
        (allowed(5, 4, 0.0, policy=None), None),
        (denied(5, 1.0, policy=None), None),
    ],
)
def test_effective_window(decision: Decision, t: int | None) -> None:
    assert effective_window(decision) == t


@pytest.mark.parametrize(
    "policy",
    [TokenBucket(20, 2.0), SlidingWindow(7, 30), GCRA(12, 60), GCRA(10, 1, burst=3), FixedWindow(5, 10)],
    ids=repr,
)
def test_a_full_allowance_advertises_the_policy_window(policy: Policy) -> None:
    full = Decision(True, policy.quota, policy.quota, 0.0, 0.0, policy)
    assert effective_window(full) == policy.window_seconds


class TestRateLimitHeaders:
    def test_allowed_ietf(self) -> None:
        headers = as_dict(rate_limit_headers([allowed(10, 7, 12.2)], ['"api";q=10;w=60'], ['"api"'], "ietf", False))
        assert headers == {"ratelimit-policy": '"api";q=10;w=60', "ratelimit": '"api";r=7;t=42'}

    def test_a_full_allowance_has_the_window_not_zero(self) -> None:
        headers = as_dict(rate_limit_headers([allowed(10, 10, 0.0)], ['"api";q=10;w=60'], ['"api"'], "ietf", False))
        assert headers["ratelimit"] == '"api";r=10;t=60'

    def test_denied_ietf_with_retry_after(self) -> None:
        headers = as_dict(
            rate_limit_headers([denied(10, 41.2, reset_after=59.0)], ['"api";q=10;w=60'], ['"api"'], "ietf", True)
        )
        # On a denial t is the wait before this request could pass, not the time until full.
        assert headers == {"ratelimit-policy": '"api";q=10;w=60', "ratelimit": '"api";r=0;t=42', "retry-after": "42"}

    def test_a_concurrency_item_has_no_t(self) -> None:
        decisions = [allowed(10, 7, 12.2), allowed(3, 2, 0.0, policy=None)]
        items = ['"w";q=10;w=60', '"w:concurrency";q=3;qu="concurrent-requests"']
        headers = as_dict(rate_limit_headers(decisions, items, ['"w"', '"w:concurrency"'], "ietf", False))
        assert headers["ratelimit"] == '"w";r=7;t=42, "w:concurrency";r=2'

    def test_several_policies_one_list(self) -> None:
        a10, a3600, b = SlidingWindow(2, 10), SlidingWindow(100, 3600), SlidingWindow(10, 60)
        decisions = [
            denied(2, 4.5, reset_after=9.0, policy=a10),
            allowed(100, 98, 3599.0, policy=a3600),
            denied(10, 30.0, remaining=3, policy=b),
        ]
        items = ['"a:10s";q=2;w=10', '"a:3600s";q=100;w=3600', '"b";q=10;w=60']
        names = ['"a:10s"', '"a:3600s"', '"b"']
        headers = as_dict(rate_limit_headers(decisions, items, names, "ietf", True))
        assert read_field(headers["ratelimit-policy"], POLICY_PARAMS) == [
            ("a:10s", {"q": 2, "w": 10}),
            ("a:3600s", {"q": 100, "w": 3600}),
            ("b", {"q": 10, "w": 60}),
        ]
        assert read_field(headers["ratelimit"], STATE_PARAMS) == [
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
        # X-RateLimit-Reset keeps its own meaning: seconds until the allowance is full again.
        assert headers == {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "7", "x-ratelimit-reset": "13"}
        full = as_dict(rate_limit_headers([allowed(10, 10, 0.0)], ['"api";q=10;w=60'], ['"api"'], "legacy", False))
        assert full["x-ratelimit-reset"] == "0"

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


policy_strategy = st.one_of(
    st.builds(TokenBucket, st.integers(1, 1000), st.sampled_from([0.5, 1.0, 7.0, 100.0])),
    st.builds(SlidingWindow, st.integers(1, 1000), st.sampled_from([1, 10, 60, 3600])),
    st.builds(GCRA, st.integers(1, 1000), st.sampled_from([1, 60, 3600])),
    st.builds(FixedWindow, st.integers(1, 1000), st.sampled_from([1, 60, 86400])),
    st.builds(SlidingWindowCounter, st.integers(1, 1000), st.sampled_from([1, 60])),
)


@st.composite
def decisions_of(draw: st.DrawFn, concurrency: bool = True) -> Decision:
    if concurrency and draw(st.integers(0, 5)) == 0:
        limit = draw(st.integers(1, 100))
        taken = draw(st.booleans())
        return Decision(taken, limit, draw(st.integers(0, limit)), 0.0 if taken else 1.0, 0.0, None)
    policy = draw(policy_strategy)
    remaining = draw(st.integers(0, policy.quota))
    reset_after = draw(st.floats(0, policy.window_seconds))
    if draw(st.booleans()):
        return Decision(True, policy.quota, remaining, 0.0, reset_after, policy)
    wait = draw(st.one_of(st.floats(0, 10**6), st.just(math.inf)))
    return Decision(False, policy.quota, remaining, wait, reset_after, policy)


@given(st.lists(decisions_of(), min_size=1, max_size=5))
def test_headers_always_parse_and_keep_their_meaning(decisions: list[Decision]) -> None:
    names = [f"p{i}" for i in range(len(decisions))]
    items = [
        policy_item(n, d.policy.quota, d.policy.window_seconds)
        if d.policy is not None
        else f'{sf_string(n)};q={d.limit};qu="concurrent-requests"'
        for n, d in zip(names, decisions, strict=True)
    ]
    is_denied = not all(d.allowed for d in decisions)
    raw = rate_limit_headers(decisions, items, [sf_string(n) for n in names], "both", is_denied)
    headers = httpx.Headers([(k.decode(), v.decode()) for k, v in raw])
    refused = [n for n, d in zip(names, decisions, strict=True) if not d.allowed]
    seen = check_response(429 if is_denied else 200, headers, b"", refused)
    assert list(seen.state) == names
    for name, decision in zip(names, decisions, strict=True):
        assert seen.state[name]["r"] == decision.remaining
        if decision.policy is None:
            continue
        t = seen.state[name]["t"]
        if decision.allowed:
            assert t >= math.ceil(decision.reset_after)
            if decision.remaining == decision.policy.quota:
                assert t == decision.policy.window_seconds
        else:
            assert t == retry_after_seconds(decision)
            assert seen.retry_after is not None and t <= seen.retry_after
    if is_denied:
        assert seen.retry_after == max(retry_after_seconds(d) for d in decisions if not d.allowed)
        assert seen.legacy["reset"] == seen.retry_after
    else:
        assert seen.retry_after is None


@pytest.mark.parametrize("mode", HEADER_MODES)
def test_check_mode_accepts_the_modes(mode: str) -> None:
    assert check_mode(mode) == mode


@pytest.mark.parametrize("mode", ["IETF", "draft", "", "x-ratelimit"])
def test_check_mode_rejects_anything_else(mode: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(mode)):
        check_mode(mode)


@given(
    name=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=30),
    algorithm=st.sampled_from(sorted(ALGORITHMS)),
    limit=st.sampled_from(["5/minute", "1/second", "7 per 3 hours", "1000/day"]),
    keyed=st.booleans(),
    data=st.data(),
)
def test_a_rules_preformatted_headers_equal_the_general_ones(
    name: str, algorithm: str, limit: str, keyed: bool, data: st.DataObject
) -> None:
    # A rule with one limit formats its headers ahead of time (names with % and quotes, and a pk,
    # included); what it sends must be exactly what the general path builds.
    rule = Rule("/", limit, name=name, algorithm=algorithm, partition_key=keyed)
    assert rule.static is not None
    limits = rule.partitioned(rule.static, rule.identity("someone"))
    (policy,) = limits.policies
    remaining = data.draw(st.integers(0, policy.quota))
    reset_after = data.draw(st.floats(0, policy.window_seconds))
    decision = Decision(True, policy.quota, remaining, 0.0, reset_after, policy)
    general = rate_limit_headers([decision], limits.policy_items, limits.item_names, "ietf", denied=False)
    assert limits.state_format is not None
    fast = one_limit_headers(limits.policy_header, limits.state_format, decision)
    assert fast == general
    # A decision that names no policy (a backend of one's own) gets the same value without t on both paths.
    bare = decision._replace(policy=None)
    assert one_limit_headers(limits.policy_header, limits.state_format, bare) == rate_limit_headers(
        [bare], limits.policy_items, limits.item_names, "ietf", denied=False
    )
    state = read_field(as_dict(fast)["ratelimit"], STATE_PARAMS)
    assert [n for n, _ in state] == [n for n, _ in read_field(as_dict(fast)["ratelimit-policy"], POLICY_PARAMS)]
    assert ("pk" in state[0][1]) is keyed


# -- what r and t promise, checked on the engine -----------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policy_strategy,
    history=st.lists(st.tuples(st.floats(0, 30), st.integers(1, 3)), max_size=25),
    spread=st.lists(st.floats(0, 1), max_size=40),
)
def test_using_r_within_t_is_never_refused(
    policy: Policy, history: list[tuple[float, int]], spread: list[float]
) -> None:
    """After any history, the r units a response advertises can be spent anywhere within its t."""

    async def run() -> None:
        clock = ManualClock()
        backend = MemoryBackend(clock=clock)
        decision = None
        for pause, cost in history:
            clock.advance(pause)
            (decision,) = await backend.hit("k", [policy], min(cost, policy.capacity))
        clock.advance(0.001)
        (decision,) = await backend.hit("k", [policy], 1)
        t = effective_window(decision)
        assert t is not None and t >= 1
        if not decision.allowed:
            # A denial: after t seconds the same request passes.
            clock.advance(t)
            (retry,) = await backend.hit("k", [policy], 1)
            assert retry.allowed, (decision, retry)
            return
        # Spend r units at instants spread over [0, t), in order.
        instants = sorted(fraction * t for fraction in spread[: decision.remaining])
        instants += [0.0] * (decision.remaining - len(instants))
        elapsed = 0.0
        for at in sorted(instants):
            clock.advance(at - elapsed)
            elapsed = at
            (spent,) = await backend.hit("k", [policy], 1)
            assert spent.allowed, (decision, at, spent)

    asyncio.run(run())


# -- everything the middleware sends, parsed -----------------------------------------------------


def fixed_key(request: HTTPConnection) -> str:
    return request.headers.get("x-user", "ann")


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def app_with(*rules: Rule, **options: Any) -> RateLimitMiddleware:
    options.setdefault("registry", None)
    options.setdefault("metrics", False)
    return RateLimitMiddleware(
        Starlette(routes=[Route("/{path:path}", ok, methods=["GET", "POST"])]),
        rules=list(rules),
        backend=options.pop("backend", None) or MemoryBackend(),
        **options,
    )


async def fetch(app: Any, count: int, path: str = "/a", **kwargs: Any) -> list[Seen]:
    seen = []
    method = kwargs.pop("method", "GET")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for _ in range(count):
            response = await client.request(method, path, **kwargs)
            seen.append(check_response(response.status_code, response.headers, response.content))
    return seen


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("limits", [["3 per 10 seconds"], ["3 per 10 seconds", "5/minute"]], ids=["one", "two"])
async def test_every_algorithm_until_refused(algorithm: str, limits: list[str]) -> None:
    rule = Rule("/a", limits, algorithm=algorithm, key=fixed_key, name="a")
    assert rule.static is not None
    first_name, first = item_name(rule.static.item_names[0]), rule.static.policies[0]
    responses = await fetch(app_with(rule, headers="both"), 5)
    assert [s.status for s in responses] == [200, 200, 200, 429, 429]
    for seen in responses:
        assert seen.policies[first_name] == {"q": 3, "w": first.window_seconds}  # 10, or 11 for GCRA's rounding
    assert [s.state[first_name]["r"] for s in responses] == [2, 1, 0, 0, 0]
    # After each allowed hit, the r left may be spent within t: never faster than 3 per 10 s.
    assert all(s.state[first_name]["t"] >= 10 * s.state[first_name]["r"] / 3 for s in responses[:3])
    for refusal in responses[3:]:
        assert refusal.problem is not None and refusal.problem["violated-policies"] == [first_name]
        # The wait: within the window, or (the sliding window counter's estimate) within two.
        assert 1 <= refusal.state[first_name]["t"] <= 2 * first.window_seconds
        assert refusal.legacy == {"limit": 3, "remaining": 0, "reset": refusal.retry_after}


async def test_a_full_allowance_in_a_refusal_has_the_policy_window() -> None:
    # A cost that one policy can never take is refused there, and nothing is taken from the other:
    # that one's allowance is full, and its t is its window.
    def cost(request: HTTPConnection) -> int:
        return int(request.headers.get("x-cost", "1"))

    app = app_with(Rule("/a", ["2/minute", "100/hour"], key=fixed_key, cost=cost, name="a"))
    (refused,) = await fetch(app, 1, headers={"x-cost": "5"})
    assert refused.status == 429
    assert refused.state["a:3600s"] == {"r": 100, "t": 3600}
    assert refused.state["a:60s"]["r"] == 2 and refused.retry_after == NEVER_SECONDS
    assert refused.problem is not None and refused.problem["violated-policies"] == ["a:60s"]
    assert "never" in refused.problem["detail"]


async def test_several_rules_name_their_own_items() -> None:
    app = app_with(
        Rule("/a", "2/minute", key=fixed_key, name="per-user"),
        Rule("/{path:path}", ["1 per 10 seconds", "10/minute"], key=lambda r: "everyone", name="global"),
    )
    responses = await fetch(app, 2)
    assert list(responses[0].policies) == ["per-user", "global:10s", "global:60s"]
    assert [s.status for s in responses] == [200, 429]
    assert responses[1].problem is not None and responses[1].problem["violated-policies"] == ["global:10s"]


async def test_a_dry_run_shows_the_wait_without_refusing() -> None:
    app = app_with(Rule("/a", "1/minute", key=fixed_key, name="a"), dry_run=True)
    first, second = await fetch(app, 2)
    assert (first.status, second.status) == (200, 200)
    assert second.retry_after is None and second.problem is None
    # Over the limit: nothing left, and t the wait it would have had (<= the window).
    assert second.state["a"]["r"] == 0 and 1 <= second.state["a"]["t"] <= 60


async def test_legacy_mode_sends_only_the_three_fields() -> None:
    app = app_with(Rule("/a", "2/minute", key=fixed_key, name="a"), headers="legacy")
    responses = await fetch(app, 3)
    assert [s.policies for s in responses] == [{}, {}, {}]
    assert [s.legacy["remaining"] for s in responses] == [1, 0, 0]
    assert responses[2].legacy["reset"] == responses[2].retry_after
    assert responses[2].problem is not None and responses[2].problem["violated-policies"] == ["a"]


class Gate:
    """Holds requests in the app until opened: concurrency slots stay taken meanwhile."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.inside = 0

    async def endpoint(self, request: Request) -> PlainTextResponse:
        self.inside += 1
        await self.open.wait()
        return PlainTextResponse("ok")


@pytest.mark.parametrize("with_rate", [False, True])
async def test_concurrency_items_have_no_window(with_rate: bool) -> None:
    gate = Gate()
    limits: list[Any] = ["5/minute", Concurrency(1, timeout=30)] if with_rate else [Concurrency(1, timeout=30)]
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/c", gate.endpoint)]),
        rules=[Rule("/c", limits, key=fixed_key, name="c")],
        metrics=False,
    )
    name = "c:concurrency" if with_rate else "c"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        held = asyncio.create_task(client.get("/c"))
        while gate.inside == 0:
            await asyncio.sleep(0.001)
        refused = await client.get("/c")
        gate.open.set()
        taken = await held
    first = check_response(taken.status_code, taken.headers, taken.content)
    second = check_response(refused.status_code, refused.headers, refused.content)
    assert first.status == 200 and first.policies[name] == {"q": 1, "qu": "concurrent-requests"}
    assert first.state[name] == {"r": 0}
    assert second.status == 429 and second.state[name] == {"r": 0} and second.retry_after == 1
    assert second.problem is not None and second.problem["violated-policies"] == [name]


async def test_partition_keys_are_opaque_and_stable() -> None:
    secret = b"a secret shared by every worker"
    rule = Rule("/a", ["5/minute", "50/hour", Concurrency(3, 30)], key=fixed_key, name="a", partition_key=secret)
    ann, ann_again, bob = [
        (await fetch(app_with(rule), 1, headers={"x-user": user}))[0] for user in ("ann", "ann", "bob")
    ]
    pks = {item.get("pk") for item in ann.policies.values()} | {item.get("pk") for item in ann.state.values()}
    assert len(pks) == 1  # one partition: the rule's items for one key
    (pk,) = pks
    assert isinstance(pk, bytes) and len(pk) == 16
    assert b"ann" not in pk and "ann" not in base64.b64encode(pk).decode()
    # The same key under the same secret (another process) gets the same pk; another key another one.
    assert ann_again.state["a:60s"]["pk"] == pk
    assert bob.state["a:60s"]["pk"] != pk
    # Another secret, other values: nothing outside the servers can compute a pk.
    other = Rule("/a", "5/minute", key=fixed_key, name="a", partition_key=b"another secret, 16 bytes or more")
    assert (await fetch(app_with(other), 1))[0].state["a"]["pk"] != pk


async def test_partition_keys_in_a_refusal_and_with_the_process_secret() -> None:
    app = app_with(Rule("/a", "1/minute", key=fixed_key, name="a", partition_key=True))
    first, refused = await fetch(app, 2)
    assert first.state["a"]["pk"] == refused.state["a"]["pk"] == refused.policies["a"]["pk"]
    # The body names the policy as RateLimit-Policy does, without the pk.
    assert refused.problem is not None and refused.problem["violated-policies"] == ["a"]


async def test_content_bytes_quota_unit() -> None:
    def size(request: HTTPConnection) -> int:
        return max(1, int(request.headers.get("content-length", "0")))

    rule = Rule("/up", "1000/minute", key=fixed_key, cost=size, quota_unit="content-bytes", name="up")
    responses = await fetch(app_with(rule), 3, path="/up", method="POST", content=b"x" * 400)
    assert [s.status for s in responses] == [200, 200, 429]
    assert responses[0].policies["up"] == {"q": 1000, "w": 60, "qu": "content-bytes"}
    assert [s.state["up"]["r"] for s in responses] == [600, 200, 200]


@pytest.mark.parametrize(
    ("options", "quoted"),
    [
        ({"quota_unit": "bytes"}, "'bytes'"),
        ({"quota_unit": "concurrent-requests"}, "Concurrency"),
        ({"partition_key": "short"}, "got 5"),
        ({"partition_key": 1}, "int"),
    ],
)
def test_bad_header_options_are_refused(options: dict[str, Any], quoted: str) -> None:
    with pytest.raises(ConfigurationError, match="'a'") as info:
        Rule("/a", "1/minute", name="a", **options)
    assert quoted in str(info.value)
    assert "short" not in str(info.value), "a secret is never quoted"


# -- websocket handshakes ------------------------------------------------------------------------


async def handshake(app: Any, extensions: dict[str, Any]) -> list[Message]:
    scope = {
        "type": "websocket",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [(b"host", b"t")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
        "extensions": extensions,
    }
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def ws_app(rule: Rule) -> RateLimitMiddleware:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    return RateLimitMiddleware(Starlette(routes=[WebSocketRoute("/ws", echo)]), rules=[rule], metrics=False)


def as_headers(raw: Sequence[tuple[bytes, bytes]]) -> httpx.Headers:
    return httpx.Headers([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw])


async def test_websocket_accept_and_denial_headers() -> None:
    app = ws_app(Rule("/ws", "1/minute", key=lambda c: "ann", name="ws", partition_key=True))
    extension: dict[str, Any] = {"websocket.http.response": {}}
    accepted = await handshake(app, extension)
    denial = await handshake(app, extension)
    accept = next(m for m in accepted if m["type"] == "websocket.accept")
    first = check_response(101, as_headers(accept.get("headers", [])), b"")
    assert first.state["ws"]["r"] == 0 and first.state["ws"]["t"] >= 1 and "pk" in first.state["ws"]
    start, body = denial[0], denial[1]
    assert start["type"] == "websocket.http.response.start" and body["type"] == "websocket.http.response.body"
    refused = check_response(start["status"], as_headers(start["headers"]), body["body"])
    assert refused.status == 429 and refused.problem is not None
    assert refused.problem["violated-policies"] == ["ws"]
    assert refused.state["ws"]["pk"] == first.state["ws"]["pk"]


async def test_websocket_denial_without_the_extension_closes() -> None:
    app = ws_app(Rule("/ws", "1/minute", key=lambda c: "ann", name="ws"))
    await handshake(app, {})
    denial = await handshake(app, {})
    assert denial == [{"type": "websocket.close", "code": 1008, "reason": "Too Many Requests"}]


def test_check_response_can_fail() -> None:
    # The reader is strict: a t of 0, a Token name, or an r / t above q / w is caught.
    for state in ['"a";r=5;t=0', "a;r=5;t=60", '"a";r=10;t=1']:
        headers = httpx.Headers({"ratelimit-policy": '"a";q=10;w=60', "ratelimit": state})
        with pytest.raises(AssertionError):
            check_response(200, headers, b"")
