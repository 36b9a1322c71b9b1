"""The example app's FastAPI variant: IP limits as middleware rules, per-user limits as a RateLimit dependency."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry

from asgi_ratelimit import MemoryBackend
from example_app.app import JWT_SECRET
from example_app.fastapi_app import create_app

ROOT = Path(__file__).resolve().parent.parent


def bearer(user: str, plan: str = "free", secret: str = JWT_SECRET) -> dict[str, str]:
    return {"authorization": "Bearer " + jwt.encode({"sub": user, "plan": plan}, secret, algorithm="HS256")}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MemoryBackend(), registry=CollectorRegistry())
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def statuses(client: httpx.AsyncClient, headers: dict[str, str], count: int) -> list[int]:
    return [(await client.get("/api/items", headers=headers)).status_code for _ in range(count)]


async def test_users_are_counted_apart_at_their_plans_limits(client: httpx.AsyncClient) -> None:
    assert await statuses(client, bearer("ann"), 4) == [200, 200, 200, 429]
    assert await statuses(client, bearer("bob"), 3) == [200, 200, 200]  # same IP, another user
    assert await statuses(client, bearer("cat", "pro"), 10) == [200] * 10
    refused = await client.get("/api/items", headers=bearer("ann"))
    assert refused.json() == {"detail": f"Rate limit exceeded; retry in {refused.headers['retry-after']} seconds."}
    # The per-IP rule's items and the per-user ones, in one set of headers.
    assert '"per-ip"' in refused.headers["ratelimit"] and '"per-user:60s"' in refused.headers["ratelimit"]


async def test_anonymous_and_forged_callers_get_a_401_not_a_limit(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/items")).status_code == 401
    assert (await client.get("/api/items", headers=bearer("ann", secret="x" * 40))).status_code == 401


async def test_logins_are_limited_per_ip_by_the_middleware(client: httpx.AsyncClient) -> None:
    answers = [await client.post("/login") for _ in range(6)]
    assert [answer.status_code for answer in answers] == [200] * 5 + [429]
    assert answers[5].headers["content-type"] == "application/problem+json"


async def test_the_openapi_document_lists_the_429s(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    validate(schema)
    items = schema["paths"]["/api/items"]["get"]
    assert "`per-user`: chosen per request by `plan_limits`" in items["description"]
    assert "`per-ip`: 120 per 1 minute" in items["description"]
    assert set(items["responses"]["429"]["content"]) == {"application/problem+json", "application/json"}


@pytest.mark.slow
def test_the_demo_shows_the_fastapi_variant() -> None:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "example_app.demo", "--fastapi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    ann = [line.split()[5] for line in lines if ", ann (free)" in line]
    assert ann == ["200", "200", "200", "429", "429"]
    assert not [line for line in lines if "bob (pro)" in line and " 429 " in line]
    assert any("anonymous" in line and " 401 " in line for line in lines)
    assert "lists a 429 on: GET /, POST /login, GET /api/items." in result.stdout
