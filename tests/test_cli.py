"""``python -m asgi_ratelimit serve`` as a real process: it starts, decides, reports health, and stops.

Each test starts the command on a free port, waits (bounded) until it answers, and stops it by
its PID in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis as sync_redis
from conftest import free_port

from asgi_ratelimit.__main__ import build_parser

START_TIMEOUT = 15
STOP_TIMEOUT = 10


@contextmanager
def serve(*args: str) -> Iterator[str]:
    """Run ``python -m asgi_ratelimit serve --port <free> *args``; yield its base URL; stop it by PID."""
    port = free_port()
    command = [sys.executable, "-m", "asgi_ratelimit", "serve", "--port", str(port), "--log-level", "warning", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"the command exited with {process.returncode}: {output}")
            try:
                if httpx.get(f"{base}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the command did not answer on port {port} within {START_TIMEOUT} s")
            time.sleep(0.05)
        yield base
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()


BODY = {"key": "user:123", "algorithm": "fixed_window", "limit": 2, "window": 60}


def exercise(base: str) -> None:
    with httpx.Client(base_url=base, timeout=5) as client:
        first = client.post("/check", json=BODY)
        assert first.status_code == 200, first.text
        assert first.json()["allowed"] is True
        assert first.json()["remaining"] == 1
        assert first.headers["ratelimit"].startswith('"fixed_window";r=1;t=')
        client.post("/check", json=BODY)
        third = client.post("/check", json=BODY)
        assert third.json()["allowed"] is False
        assert third.json()["retry_after"] > 0
        bad = client.post("/check", json={**BODY, "window": 10**9})
        assert bad.status_code == 422
        assert bad.json()["field"] == "window"
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        assert client.get("/openapi.json").json()["openapi"] == "3.1.0"
        assert 'rule="service:fixed_window"' in client.get("/metrics").text


@pytest.mark.slow
def test_serve_on_memory() -> None:
    with serve() as base:
        exercise(base)
        assert httpx.get(f"{base}/health").json()["backend"] == "MemoryBackend"


@pytest.mark.slow
@pytest.mark.redis
def test_serve_on_redis(redis_url: str, key_prefix: str) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        with serve("--redis-url", redis_url, "--prefix", key_prefix) as base:
            exercise(base)
            assert httpx.get(f"{base}/health").json()["backend"] == "RedisBackend"
            assert len(list(client.scan_iter(match=f"{key_prefix}*"))) == 1
    finally:
        keys = list(client.scan_iter(match=f"{key_prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.slow
def test_serve_with_redis_down_answers_503_and_unhealthy() -> None:
    # Nothing listens on this port: decisions fail closed, health says so, the process stays up.
    with serve("--redis-url", f"redis://127.0.0.1:{free_port()}/0") as base:
        check = httpx.post(f"{base}/check", json=BODY, timeout=5)
        assert check.status_code == 503
        assert check.headers["content-type"] == "application/problem+json"
        assert httpx.get(f"{base}/health", timeout=5).status_code == 503


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--redis-url", "foo://nowhere"], "scheme"),
        (["serve", "--timeout", "0"], "timeout"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--port", "http"], "invalid int"),
        ([], "command"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asgi_ratelimit", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.redis_url, args.host, args.port, args.prefix) == (None, "127.0.0.1", 8080, "rl:")
