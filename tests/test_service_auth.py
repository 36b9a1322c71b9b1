"""The service's bearer token: /check needs it when one is set; the operations routes stay open unless asked.

Every refusal is a 401 problem+json with ``WWW-Authenticate: Bearer``, comes before the body is read
(so it counts nothing), and never repeats the token.
"""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_service import PROBLEM, SW, counted, get, post

from asgi_ratelimit import ConfigurationError, MemoryBackend
from asgi_ratelimit.service import MIN_TOKEN_LENGTH, create_app, openapi_document

TOKEN = "s3cret-token-0123456789abcdef"
GOOD = {"authorization": f"Bearer {TOKEN}"}


def service(**kwargs: Any) -> tuple[Any, MemoryBackend, CollectorRegistry]:
    backend = MemoryBackend()
    registry = CollectorRegistry()
    return create_app(backend, registry=registry, token=TOKEN, **kwargs), backend, registry


def assert_refused(response: httpx.Response, error: bool) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == PROBLEM
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    # RFC 6750: an error code only when credentials were sent and are wrong.
    assert ('error="invalid_token"' in challenge) is error
    assert response.json()["status"] == 401
    assert TOKEN not in response.text


async def test_check_without_a_token_is_401_and_counts_nothing() -> None:
    app, backend, registry = service()
    assert_refused(await post(app, SW), error=False)
    # The body is not even read: a bad one is refused the same way.
    assert_refused(await post(app, raw=b"{"), error=False)
    assert len(backend) == 0
    assert counted(registry, "service:sliding_window", "allowed") == 0


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer ",
        "Bearer",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN.upper()}",
        f"Bearer  {TOKEN} extra",
        "Bearer é" + TOKEN,
    ],
)
async def test_a_wrong_token_is_401_invalid_token(authorization: str) -> None:
    app, backend, _ = service()
    response = await post(app, SW, headers={"authorization": authorization.encode("latin-1")})
    assert_refused(response, error=True)
    assert len(backend) == 0


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER   {TOKEN}  "])
async def test_the_token_lets_the_check_through(authorization: str) -> None:
    app, _, registry = service()
    response = await post(app, SW, headers={"authorization": authorization})
    assert response.status_code == 200, response.text
    assert response.json()["remaining"] == 99
    assert counted(registry, "service:sliding_window", "allowed") == 1


async def test_a_batch_needs_the_token_too() -> None:
    app, _, _ = service()
    assert_refused(await post(app, {"checks": [SW]}), error=False)
    assert (await post(app, {"checks": [SW]}, headers=GOOD)).json()["allowed"] is True


@pytest.mark.parametrize("path", ["/health", "/health/live", "/metrics", "/openapi.json"])
async def test_operations_routes_stay_open(path: str) -> None:
    app, _, _ = service()
    assert (await get(app, path)).status_code == 200


async def test_protect_metrics_puts_metrics_behind_the_token() -> None:
    app, _, _ = service(protect_metrics=True)
    assert_refused(await get(app, "/metrics"), error=False)
    assert_refused(await get(app, "/metrics", headers={"authorization": "Bearer nope-nope-nope-nope"}), error=True)
    allowed = await get(app, "/metrics", headers=GOOD)
    assert allowed.status_code == 200
    assert "asgi_ratelimit_decisions_total" in allowed.text
    assert (await get(app, "/health")).status_code == 200  # health stays open for the probes


def test_protect_metrics_without_a_token_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="needs a token"):
        create_app(MemoryBackend(), registry=CollectorRegistry(), protect_metrics=True)


@pytest.mark.parametrize(
    "token", ["", "short", "x" * (MIN_TOKEN_LENGTH - 1), "with a space 0123456789", "tab\t0123456789abcdef", "é" * 20]
)
def test_a_weak_or_unsendable_token_is_refused_without_repeating_it(token: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        create_app(MemoryBackend(), registry=CollectorRegistry(), token=token)
    message = str(raised.value)
    assert f"{len(token)} characters" in message
    if token:
        assert token not in message


def test_the_document_describes_the_token_only_when_there_is_one() -> None:
    open_document = openapi_document()
    assert "securitySchemes" not in open_document["components"]
    assert "401" not in open_document["paths"]["/check"]["post"]["responses"]
    document = openapi_document(bearer=True)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert document["paths"]["/check"]["post"]["security"] == [{"bearer": []}]
    assert "401" in document["paths"]["/check"]["post"]["responses"]
    assert "security" not in document["paths"]["/metrics"]["get"]
    assert "security" in openapi_document(bearer=True, protect_metrics=True)["paths"]["/metrics"]["get"]


@given(authorization=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60))
@settings(max_examples=200, deadline=None)
async def test_any_authorization_header_is_401_or_the_token(authorization: str) -> None:
    app, _, _ = service()
    response = await post(app, SW, headers={"authorization": authorization.encode("latin-1")})
    passes = authorization.strip()[:7].lower() == "bearer " and authorization.strip()[7:].strip() == TOKEN
    assert response.status_code == (200 if passes else 401), response.text


def test_the_settings_never_show_the_token() -> None:
    from asgi_ratelimit.service import ServiceSettings

    settings = ServiceSettings(redis_url="redis://127.0.0.1:6379/0", token=TOKEN)
    assert TOKEN not in repr(settings)
    assert TOKEN not in str(settings)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ASGI_RATELIMIT_TIMEOUT": "soon"}, "ASGI_RATELIMIT_TIMEOUT must be a number of seconds, got 'soon'"),
        ({"ASGI_RATELIMIT_PROTECT_METRICS": "maybe"}, "ASGI_RATELIMIT_PROTECT_METRICS must be one of"),
        ({"ASGI_RATELIMIT_TOKEN": TOKEN, "ASGI_RATELIMIT_TOKEN_FILE": "/etc/hostname"}, "not both"),
        ({"ASGI_RATELIMIT_TOKEN_FILE": "/nonexistent/token"}, "Cannot read the token file '/nonexistent/token'"),
    ],
)
def test_settings_from_a_bad_environment_name_the_variable(environ: dict[str, str], message: str) -> None:
    from asgi_ratelimit.service import ServiceSettings

    with pytest.raises(ConfigurationError) as raised:
        ServiceSettings.from_env(environ)
    assert message in str(raised.value)
    assert TOKEN not in str(raised.value)


async def test_from_environment_builds_the_service_the_variables_describe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from asgi_ratelimit.service import from_environment

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    for name in [name for name in os.environ if name.startswith("ASGI_RATELIMIT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ASGI_RATELIMIT_TOKEN_FILE", str(token_file))
    monkeypatch.setenv("ASGI_RATELIMIT_PROTECT_METRICS", "on")
    app = from_environment()
    assert isinstance(app.state.backend, MemoryBackend)
    assert (await get(app, "/metrics")).status_code == 401
    assert (await post(app, SW, headers=GOOD)).status_code == 200
    await app.state.backend.aclose()
