"""The example app does what its docstring promises: in process, over real HTTP, and through its demo."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry

from asgi_ratelimit import MemoryBackend, RedisBackend
from example_app import demo
from example_app.app import JWT_SECRET, build_backend, create_app

ROOT = Path(__file__).resolve().parent.parent
NOW = [1_700_000_000_000_000]  # microseconds: time stands still unless a test moves it


def token(plan: str, secret: str = JWT_SECRET) -> str:
    return jwt.encode({"plan": plan, "sub": "someone"}, secret, algorithm="HS256")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(MemoryBackend(clock=lambda: NOW[0]), registry=CollectorRegistry())
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


async def test_the_sixth_login_in_a_minute_is_refused(client: httpx.AsyncClient) -> None:
    statuses = [(await client.post("/login")).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    refused = await client.post("/login")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert '"login";r=0' in refused.headers["ratelimit"]


async def test_logins_are_counted_per_client_ip(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        await client.post("/login")
    assert (await client.post("/login")).status_code == 429
    app = client._transport.app  # type: ignore[attr-defined]
    other = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("203.0.113.9", 1)), base_url="http://t")
    async with other:
        assert (await other.post("/login")).status_code == 200


async def test_ai_tokens_are_charged_when_the_answer_ends_and_a_debt_is_repaid(client: httpx.AsyncClient) -> None:
    key = {"x-api-key": "model-user"}
    long_prompt = " ".join(["word"] * 2500)  # 2,500 tokens of a 2,000-token budget
    answer = await client.post("/ai/complete", content=long_prompt, headers=key)
    assert answer.status_code == 200 and answer.text.count("word") == 2500
    refused = await client.post("/ai/complete", content="hi", headers=key)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "16"  # 501 tokens at 2000/60 a second: 15.03 s
    NOW[0] += 15_030_000
    assert (await client.post("/ai/complete", content="hi", headers=key)).status_code == 200
    assert (await client.post("/ai/complete", content="hi", headers={"x-api-key": "other"})).status_code == 200


async def burst(client: httpx.AsyncClient, headers: dict[str, str], count: int) -> list[int]:
    return [(await client.get("/api/items", headers=headers)).status_code for _ in range(count)]


async def test_free_tier_allows_a_burst_of_two(client: httpx.AsyncClient) -> None:
    assert await burst(client, {"X-API-Key": "free-key"}, 4) == [200, 200, 429, 429]


async def test_pro_tier_from_a_signed_jwt_allows_a_burst_of_twenty(client: httpx.AsyncClient) -> None:
    headers = {"X-API-Key": "pro-key", "Authorization": f"Bearer {token('pro')}"}
    assert await burst(client, headers, 21) == [200] * 20 + [429]
    response = await client.get("/api/items", headers=headers)
    assert '"api:60s";q=600;w=60' in response.headers["ratelimit-policy"]


async def test_a_forged_jwt_gets_the_free_tier(client: httpx.AsyncClient) -> None:
    forged = token("pro", secret="an-attacker-secret-that-is-long-enough-0123")
    headers = {"X-API-Key": "forger", "Authorization": f"Bearer {forged}"}
    assert await burst(client, headers, 3) == [200, 200, 429]
    response = await client.get("/api/items", headers=headers)
    assert '"api:60s";q=10;w=60' in response.headers["ratelimit-policy"]


async def test_an_unsigned_jwt_gets_the_free_tier(client: httpx.AsyncClient) -> None:
    unsigned = jwt.encode({"plan": "pro"}, None, algorithm="none")
    assert await burst(client, {"X-API-Key": "k", "Authorization": f"Bearer {unsigned}"}, 3) == [200, 200, 429]


async def test_api_callers_without_a_key_are_counted_per_ip(client: httpx.AsyncClient) -> None:
    assert await burst(client, {}, 3) == [200, 200, 429]


async def test_the_free_tier_refills_with_time(client: httpx.AsyncClient) -> None:
    headers = {"X-API-Key": "patient"}
    assert await burst(client, headers, 3) == [200, 200, 429]
    NOW[0] += 1_000_000
    assert await burst(client, headers, 1) == [200]


async def test_the_decision_service_answers_check(client: httpx.AsyncClient) -> None:
    body = {"key": "user-1", "algorithm": "gcra", "limit": 1, "period": 60}
    first = await client.post("/check", json=body)
    second = await client.post("/check", json=body)
    assert first.status_code == second.status_code == 200
    assert first.json()["allowed"] is True
    assert second.json()["allowed"] is False
    assert second.json()["retry_after"] == pytest.approx(60)
    bad = await client.post("/check", json={"key": "user-1", "algorithm": "leaky"})
    assert bad.status_code == 422
    assert bad.json()["field"] == "algorithm"


async def test_health_and_liveness(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["backend"] == "MemoryBackend"
    live = await client.get("/health/live")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})


async def test_metrics_count_decisions_by_rule(client: httpx.AsyncClient) -> None:
    for _ in range(6):
        await client.post("/login")
    text = (await client.get("/metrics")).text
    assert 'asgi_ratelimit_decisions_total{result="allowed",rule="login"} 5.0' in text
    assert 'asgi_ratelimit_decisions_total{result="denied",rule="login"} 1.0' in text


async def test_operations_routes_are_never_limited(client: httpx.AsyncClient) -> None:
    statuses = {(await client.get(path)).status_code for path in ["/health", "/health/live", "/metrics"] * 20}
    assert statuses == {200}


def test_backend_follows_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert isinstance(build_backend(), MemoryBackend)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert isinstance(build_backend(), RedisBackend)  # built without connecting


@pytest.mark.redis
async def test_on_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    backend = build_backend()
    app = create_app(backend, registry=CollectorRegistry())
    # A client address of this test alone, so reruns and other tests never share its login count.
    address = f"192.0.2.{os.getpid() % 250 + 1}"
    transport = httpx.ASGITransport(app=app, client=(address, 1))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            assert (await client.get("/health")).json()["backend"] == "RedisBackend"
            headers = {"X-API-Key": f"redis-test-{os.getpid()}-{id(app)}"}
            assert await burst(client, headers, 3) == [200, 200, 429]
    finally:
        await backend.aclose()


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_python_m_example_app_serves_over_http() -> None:
    port = free_port()
    with demo.example_app_process(port) as base_url:
        assert base_url == f"http://127.0.0.1:{port}"
        assert get(base_url + "/health")[0] == 200
        steps = [demo.Step("login", "POST", "/login", {}) for _ in range(6)]
        assert [demo.send(base_url, step).status for step in steps] == [200] * 5 + [429]
        status, body = get(base_url + "/metrics")
        assert status == 200
        assert b'asgi_ratelimit_decisions_total{result="denied",rule="login"} 1.0' in body


@pytest.mark.slow
def test_the_demo_shows_limiting() -> None:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "example_app.demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    logins = [line for line in lines if line.startswith("login attempt")]
    assert [line.split()[5] for line in logins] == ["200"] * 5 + ["429"] * 7
    assert "Stopped the example app." in lines
    assert not [line for line in lines if "pro JWT" in line and " 429 " in line]
    assert len([line for line in lines if "free key" in line and " 429 " in line]) == 4


def test_lowest_remaining_reads_the_tightest_item() -> None:
    header = '"api:60s";r=8;t=60, "api:1s";r=0;t=1, "global";r=999;t=1'
    assert demo.lowest_remaining(header) == '"api:1s" r=0'
    assert demo.lowest_remaining("") == "-"
