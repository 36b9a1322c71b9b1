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


def _modules() -> list[str]:
    import pkgutil

    return [module.name for module in pkgutil.walk_packages(asgi_ratelimit.__path__, "asgi_ratelimit.")]


@pytest.mark.parametrize("module_name", [name for name in _modules() if "._" not in name])
def test_a_public_module_lists_only_public_or_documented_names(module_name: str) -> None:
    """Internals live in _-prefixed modules; a module without the prefix lists in __all__ only names that are
    the package's own public names or that the docs describe (a backend's protocol types, the FastAPI and
    service faces)."""
    import importlib
    from pathlib import Path

    docs = "\n".join(page.read_text() for page in Path(__file__).parent.parent.joinpath("docs").glob("*.md"))
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
        assert name in PUBLIC or name in docs, f"{module_name}.{name} is listed as public but documented nowhere"


def test_internal_modules_are_marked() -> None:
    internal = {"asgi_ratelimit._limiter", "asgi_ratelimit._headers", "asgi_ratelimit._metrics"}
    assert internal <= set(_modules())
    assert not {"asgi_ratelimit.limiter", "asgi_ratelimit.headers", "asgi_ratelimit.metrics"} & set(_modules())
