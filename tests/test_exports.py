"""The public surface: exactly the intended names, each importable and documented."""

from __future__ import annotations

import inspect

import pytest

import asgi_ratelimit

PUBLIC = {
    # the middleware and its rules
    "RateLimitMiddleware",
    "Rule",
    "rate_limit",
    # keys
    "ClientIP",
    "Header",
    "JWTClaim",
    "FirstOf",
    # costs known from the response (Rule(charge=...))
    "ResponseHeader",
    "BodyBytes",
    "FromState",
    # limits and decisions
    "Policy",
    "Concurrency",
    "TokenBucket",
    "SlidingWindow",
    "GCRA",
    "FixedWindow",
    "SlidingWindowCounter",
    "Decision",
    "parse_limit",
    "parse_limits",
    # storage
    "Backend",
    "MemoryBackend",
    "RedisBackend",
    # errors
    "ConfigurationError",
    "BackendError",
    # operations
    "operations_app",
}


def test_all_is_exactly_the_public_names() -> None:
    assert len(asgi_ratelimit.__all__) == len(set(asgi_ratelimit.__all__)), "a name is listed twice"
    assert set(asgi_ratelimit.__all__) == PUBLIC


def test_star_import_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from asgi_ratelimit import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_name_is_importable_and_documented(name: str) -> None:
    obj = getattr(asgi_ratelimit, name)
    assert obj.__module__.startswith("asgi_ratelimit"), f"{name} comes from {obj.__module__}"
    # The object's own docstring: inspect.getdoc would borrow a base class's, and a dataclass
    # without one gets its generated signature as __doc__.
    doc = obj.__doc__
    assert isinstance(doc, str) and doc.strip(), f"{name} has no docstring"
    summary = inspect.cleandoc(doc).splitlines()[0]
    assert not summary.startswith(f"{name}("), f"{name} has only the generated dataclass docstring"
    assert summary.endswith("."), f"{name}: the summary line should be a sentence: {summary!r}"


def test_private_modules_stay_private() -> None:
    for name in asgi_ratelimit.__all__:
        assert not name.startswith("_")


def test_version() -> None:
    assert isinstance(asgi_ratelimit.__version__, str)
    assert asgi_ratelimit.__version__.count(".") == 2


def test_the_fastapi_module_lists_its_names() -> None:
    import asgi_ratelimit.fastapi as module

    assert set(module.__all__) == {"RateLimit", "RateLimitExceeded", "document_rate_limits"}
    for name in module.__all__:
        doc = getattr(module, name).__doc__
        assert isinstance(doc, str) and inspect.cleandoc(doc).splitlines()[0].endswith("."), name
