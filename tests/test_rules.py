"""rules.py: path and method matching, limits, cost, names, and the @rate_limit marker."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import HTTPConnection
from starlette.routing import compile_path

from asgi_ratelimit import GCRA, ConfigurationError, FixedWindow, TokenBucket, rate_limit
from asgi_ratelimit.rules import _IDENTITIES_KEPT, ENDPOINT_RULES, IDENTITY_SEPARATOR, Rule


def key(request: HTTPConnection) -> str | None:
    return "k"


def connection(headers: dict[str, str] | None = None, method: str = "GET") -> HTTPConnection:
    return HTTPConnection(
        {
            "type": "http",
            "method": method,
            "path": "/",
            "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
        }
    )


@pytest.mark.parametrize(
    ("path", "url", "expected"),
    [
        ("/users/{id}", "/users/1", True),
        ("/users/{id}", "/users/abc", True),
        ("/users/{id}", "/users/1/posts", False),
        ("/users/{id}", "/users/", False),
        ("/users/{id}", "/users", False),
        ("/users/{id:int}", "/users/12", True),
        ("/users/{id:int}", "/users/me", False),
        ("/files/{rest:path}", "/files/a/b/c.txt", True),
        ("/files/{rest:path}", "/files/", True),
        ("/files/{rest:path}", "/filesystem", False),
        ("/login", "/login", True),
        ("/login", "/login/", False),
        ("/login", "/login2", False),
        ("/{p:path}", "/anything/at/all", True),
        (re.compile(r"/users/[0-9]+$"), "/users/42", True),
        (re.compile(r"/users/[0-9]+$"), "/users/42/x", False),
        # A regex is matched at the start of the path only; anchor its end with $ when you mean it.
        (re.compile(r"/users/[0-9]+"), "/users/42/x", True),
        (re.compile(r"/users/[0-9]+"), "/api/users/42", False),
    ],
)
def test_path_matching(path: str | re.Pattern[str], url: str, expected: bool) -> None:
    assert Rule(path, "1/minute", key=key).matches("GET", url) is expected


@pytest.mark.parametrize(
    ("methods", "method", "expected"),
    [
        (None, "GET", True),
        (None, "DELETE", True),
        (["POST"], "POST", True),
        (["POST"], "GET", False),
        (["post"], "POST", True),
        (["GET"], "HEAD", True),  # a GET route answers HEAD: limit both alike
        (["POST", "PUT"], "PUT", True),
        (["POST", "PUT"], "HEAD", False),
    ],
)
def test_method_matching(methods: list[str] | None, method: str, expected: bool) -> None:
    assert Rule("/x", "1/minute", key=key, methods=methods).matches(method, "/x") is expected


def test_names() -> None:
    assert Rule("/users/{id}", "1/minute", key=key).name == "/users/{id}"
    assert Rule(re.compile(r"^/a/\d+$"), "1/minute", key=key).name == r"^/a/\d+$"
    assert Rule("/users/{id}", "1/minute", key=key, name="users").name == "users"


def test_limit_strings_use_the_rule_algorithm() -> None:
    assert Rule("/x", "10/minute", key=key).static.policies == (GCRA(10, 60),)  # type: ignore[union-attr]
    assert Rule("/x", "10/minute", key=key, algorithm="fixed_window").static.policies == (  # type: ignore[union-attr]
        FixedWindow(10, 60),
    )
    token = Rule("/x", "10/minute", key=key, algorithm="token_bucket").static.policies[0]  # type: ignore[union-attr]
    assert isinstance(token, TokenBucket) and token.capacity == 10


def test_policies_and_lists() -> None:
    rule = Rule("/x", [GCRA(10, 60), "100/hour"], key=key, name="x")
    compiled = rule.limits_for(connection())
    assert compiled.policies == (GCRA(10, 60), GCRA(100, 3600))
    assert compiled.policy_items == ('"x:60s";q=10;w=60', '"x:3600s";q=100;w=3600')
    assert compiled.item_names == ('"x:60s"', '"x:3600s"')


def test_two_limits_with_one_window_get_distinct_names() -> None:
    compiled = Rule("/x", ["10/minute", GCRA(5, 60)], key=key, name="x").limits_for(connection())
    assert len(set(compiled.item_names)) == 2


def test_tiers_callable() -> None:
    def tiers(request: HTTPConnection) -> Any:
        return ["100/minute", "1000/hour"] if request.headers.get("x-plan") == "pro" else "10/minute"

    rule = Rule("/x", tiers, key=key, name="api")
    free = rule.limits_for(connection())
    pro = rule.limits_for(connection({"x-plan": "pro"}))
    assert free.policies == (GCRA(10, 60),)
    assert pro.policies == (GCRA(100, 60), GCRA(1000, 3600))
    # Compiled once per tier.
    assert rule.limits_for(connection({"x-plan": "pro"})) is pro


def test_a_tier_callable_returning_a_bad_limit_names_the_rule() -> None:
    rule = Rule("/x", lambda request: "10/fortnight", key=key, name="api")
    with pytest.raises(ConfigurationError, match=r"'api'.*'10/fortnight'"):
        rule.limits_for(connection())


def test_cost() -> None:
    assert Rule("/x", "10/minute", key=key).cost_for(connection()) == 1
    assert Rule("/x", "10/minute", key=key, cost=3).cost_for(connection()) == 3
    by_method = Rule("/x", "10/minute", key=key, cost=lambda r: 5 if r.scope["method"] == "POST" else 1)
    assert by_method.cost_for(connection(method="POST")) == 5
    assert by_method.cost_for(connection()) == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_a_cost_callable_returning_a_bad_value_names_the_rule(value: Any) -> None:
    rule = Rule("/x", "10/minute", key=key, cost=lambda r: value, name="api")
    with pytest.raises(ConfigurationError, match="'api'"):
        rule.cost_for(connection())


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        (
            {"limits": "100/fortnight"},
            ["'/x'", "'100/fortnight'", "second, minute, hour, day, week, month = 30 days or year = 365 days"],
        ),
        ({"limits": "0/minute"}, ["'/x'", "'0/minute'"]),
        ({"limits": ["1/minute", "1/minute"]}, ["'/x'", "twice"]),
        ({"limits": 5}, ["'/x'", "5"]),
        ({"limits": [5]}, ["'/x'", "5"]),
        ({"limits": "1/minute", "algorithm": "leaky_bucket"}, ["'/x'", "'leaky_bucket'", "sliding_window"]),
        ({"limits": "1/minute", "cost": 0}, ["'/x'", "0"]),
        ({"limits": "1/minute", "cost": True}, ["'/x'", "True"]),
        ({"limits": "1/minute", "cost": 2.5}, ["'/x'", "2.5"]),
        ({"limits": "1/minute", "methods": ["GETT"]}, ["'/x'", "'GETT'"]),
        ({"limits": "1/minute", "name": ""}, ["'/x'", "''"]),
        ({"limits": "1/minute", "fail_open": "no"}, ["'/x'", "'no'"]),
        ({"limits": "1/minute", "key": 42}, ["'/x'", "42"]),
    ],
)
def test_configuration_errors_name_the_rule_and_quote_the_value(kwargs: dict[str, Any], fragments: list[str]) -> None:
    kwargs.setdefault("key", key)
    limits = kwargs.pop("limits")
    with pytest.raises(ConfigurationError) as info:
        Rule("/x", limits, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("path", ["users", "", 42, "/users/{id:nope}", "/users/{id}/{id}"])
def test_bad_paths(path: Any) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(repr(path))):
        Rule(path, "1/minute", key=key)


class TestRateLimitMarker:
    def test_wraps_the_endpoint_keeping_its_signature_and_kind(self) -> None:
        async def endpoint(request: Any, item_id: int = 3) -> None: ...

        marked = rate_limit("5/minute", key=key, cost=2, name="login")(endpoint)
        assert marked is not endpoint and marked.__wrapped__ is endpoint  # type: ignore[attr-defined]
        # The same parameters, their annotations evaluated in the endpoint's module (for frameworks that read them).
        wrapped = inspect.signature(marked).parameters
        assert list(wrapped.values()) == list(inspect.signature(endpoint, eval_str=True).parameters.values())
        assert inspect.iscoroutinefunction(marked)
        (rule,) = getattr(marked, ENDPOINT_RULES)
        assert rule.name == "login" and rule.cost == 2 and rule.static.policies[0].quota == 5

    def test_stacked_marks_make_one_wrapper_decided_together(self) -> None:
        @rate_limit("5/minute", key=key)
        @rate_limit("100/day", key=key)
        async def endpoint(request: Any) -> None: ...

        rules = getattr(endpoint, ENDPOINT_RULES)
        assert [rule.static.policies[0].quota for rule in rules] == [100, 5]
        base = f"{__name__}.{endpoint.__qualname__}"
        assert [rule.name for rule in rules] == [f"{base}#1", f"{base}#2"]
        assert not hasattr(endpoint.__wrapped__, ENDPOINT_RULES)  # type: ignore[attr-defined]

    def test_the_default_name_is_the_endpoints_module_and_name(self) -> None:
        def report(request: Any) -> None: ...

        (rule,) = getattr(rate_limit("5/minute")(report), ENDPOINT_RULES)
        assert rule.name == f"{__name__}.{report.__qualname__}"

    def test_two_limits_of_one_endpoint_cannot_share_a_name(self) -> None:
        async def endpoint(request: Any) -> None: ...

        with pytest.raises(ConfigurationError, match="'same'"):
            rate_limit("5/minute", name="same")(rate_limit("9/hour", name="same")(endpoint))

    def test_a_class_is_refused(self) -> None:
        class Endpoint:
            pass

        with pytest.raises(ConfigurationError, match="methods"):
            rate_limit("5/minute")(Endpoint)

    @pytest.mark.parametrize(
        ("args", "kwargs", "fragment"),
        [
            (("5/fortnight",), {}, "'5/fortnight'"),
            (("5/minute",), {"algorithm": "leaky"}, "'leaky'"),
            (("5/minute",), {"cost": 0}, "0"),
        ],
    )
    def test_validates_when_applied(self, args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str) -> None:
        with pytest.raises(ConfigurationError) as info:
            rate_limit(*args, key=key, **kwargs)
        assert fragment in str(info.value)


_PATH_CHARS = st.sampled_from(["/", "a", "b", ".", "\n", "%", "-", "é"])


@given(
    template=st.lists(_PATH_CHARS, max_size=6).map(lambda chars: "/" + "".join(chars)),
    path=st.lists(_PATH_CHARS, max_size=8).map("".join),
)
def test_a_template_without_parameters_matches_exactly_what_starlettes_regex_matches(template: str, path: str) -> None:
    """Such a rule compares strings instead of running the regex: it must match the same paths, or a
    request Starlette routes to the endpoint (e.g. "/login" followed by a newline, %0A) escapes the rule."""
    rule = Rule(template, "1/second", name="template")
    assert rule.exact_path == template
    assert rule.matches("GET", path) == (compile_path(template)[0].match(path) is not None)
    assert rule.matches("GET", template + "\n")


def test_an_identity_joins_the_rules_name_and_the_key_and_is_remembered() -> None:
    rule = Rule("/", "5/minute", name="login")
    first = rule.identity("203.0.113.7")
    assert first == "login" + IDENTITY_SEPARATOR + "203.0.113.7"
    # Two rules with one key never share counts.
    assert Rule("/", "5/minute", name="api").identity("203.0.113.7") != first
    assert rule.identity("203.0.113.7") is first  # the same string again, not a new one


def test_a_rule_remembers_a_bounded_number_of_identities() -> None:
    rule = Rule("/", "5/minute", name="r")
    for number in range(3 * _IDENTITIES_KEPT):
        assert rule.identity(f"k{number}") == f"r{IDENTITY_SEPARATOR}k{number}"
    remembered = rule.identity.cache_info()  # type: ignore[attr-defined]
    assert remembered.currsize == _IDENTITIES_KEPT == remembered.maxsize


@pytest.mark.parametrize("name", ["café", "ログイン", "tab\there", "nul\x00"])
def test_a_name_outside_printable_ascii_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match="printable ASCII"):
        Rule("/login", "5/minute", name=name)


def test_a_path_outside_ascii_needs_an_ascii_name() -> None:
    with pytest.raises(ConfigurationError, match="name="):
        Rule("/café", "5/minute")
    assert Rule("/café", "5/minute", name="cafe").name == "cafe"
