"""``python -m asgi_ratelimit serve`` as a real process: it starts, decides, reports health, and stops.

Each test starts the command on a free port, waits (bounded) until it answers, and stops it by
its PID in ``finally``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
from conftest import delete_prefixed, free_port

from asgi_ratelimit.__main__ import build_parser, main
from asgi_ratelimit.service import ServiceSettings

START_TIMEOUT = 15
STOP_TIMEOUT = 10


@dataclass
class Served:
    """A running ``serve`` command: its base URL, and its output so far (read as it is printed)."""

    base: str
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_workers(self, count: int) -> None:
        """Wait (bounded) until ``count`` worker processes have started: the first one answers long before
        the last has imported the app on a loaded machine."""
        deadline = time.monotonic() + START_TIMEOUT
        while self.output.count("Started server process") < count and time.monotonic() < deadline:
            time.sleep(0.05)


@contextmanager
def serve(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> Iterator[Served]:
    """Run ``python -m asgi_ratelimit serve --port <free> *args``; yield it; stop it by PID.

    ``env`` adds environment variables; with ``port`` given, no ``--port`` is passed (it comes from them).
    """
    if port is None:
        port = free_port()
        args = ("--port", str(port), *args)
    if "--log-level" not in args and "ASGI_RATELIMIT_LOG_LEVEL" not in (env or {}):
        args = (*args, "--log-level", "warning")
    command = [sys.executable, "-m", "asgi_ratelimit", "serve", *args]
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_RATELIMIT_")}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**environment, **(env or {})}
    )
    served = Served(f"http://127.0.0.1:{port}")
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: served.lines.extend(line.decode() for line in process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                reader.join(STOP_TIMEOUT)
                raise AssertionError(f"the command exited with {process.returncode}: {served.output}")
            try:
                if httpx.get(f"{served.base}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the command did not answer on port {port} within {START_TIMEOUT} s")
            time.sleep(0.05)
        yield served
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        reader.join(STOP_TIMEOUT)
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
    with serve() as served:
        base = served.base
        exercise(base)
        assert httpx.get(f"{base}/health").json()["backend"] == "MemoryBackend"


@pytest.mark.slow
@pytest.mark.redis
def test_serve_on_redis(redis_url: str, key_prefix: str) -> None:
    client = sync_redis.Redis.from_url(redis_url)
    try:
        with serve("--redis-url", redis_url, "--prefix", key_prefix) as served:
            base = served.base
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
    with serve("--redis-url", f"redis://127.0.0.1:{free_port()}/0") as served:
        base = served.base
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


def test_defaults_come_from_the_environment() -> None:
    environ = {
        "ASGI_RATELIMIT_REDIS_URL": "redis://redis:6379/0",
        "ASGI_RATELIMIT_HOST": "0.0.0.0",
        "ASGI_RATELIMIT_PORT": "9000",
        "ASGI_RATELIMIT_WORKERS": "4",
        "ASGI_RATELIMIT_PREFIX": "svc:",
        "ASGI_RATELIMIT_TIMEOUT": "0.2",
        "ASGI_RATELIMIT_TOKEN_FILE": "/run/secrets/token",
        "ASGI_RATELIMIT_PROTECT_METRICS": "true",
        "ASGI_RATELIMIT_LOG_LEVEL": "WARNING",
    }
    args = build_parser(environ).parse_args(["serve"])
    assert (args.redis_url, args.host, args.port, args.workers, args.prefix) == (
        "redis://redis:6379/0",
        "0.0.0.0",
        9000,
        4,
        "svc:",
    )
    assert (args.timeout, args.token_file, args.protect_metrics, args.log_level) == (
        0.2,
        "/run/secrets/token",
        True,
        "warning",
    )
    # An option on the command line wins over its variable.
    assert build_parser(environ).parse_args(["serve", "--port", "9001"]).port == 9001


# -- workers, batches, tokens, resets and the environment, through the real command -----------------

TOKEN = "cli-token-0123456789abcdef"
SPENT = {"key": "cli:spent", "algorithm": "fixed_window", "limit": 1, "window": 60}
OTHER = {"key": "cli:other", "algorithm": "token_bucket", "capacity": 5, "refill_rate": 1}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_RATELIMIT_")}
    return subprocess.run(
        [sys.executable, "-m", "asgi_ratelimit", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**environment, **(env or {})},
    )


@pytest.fixture
def redis_cleanup(redis_url: str, key_prefix: str) -> Iterator[None]:
    yield
    delete_prefixed(redis_url, key_prefix)


async def concurrent_checks(base: str, body: dict[str, object], count: int) -> list[bool]:
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=base, timeout=10, limits=limits) as client:
        responses = await asyncio.gather(*(client.post("/check", json=body) for _ in range(count)))
    assert {response.status_code for response in responses} == {200}
    return [response.json()["allowed"] for response in responses]


@pytest.mark.slow
@pytest.mark.redis
async def test_two_workers_on_redis_admit_exactly_the_limit(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    body = {"key": "cli:shared", "algorithm": "sliding_window", "limit": 50, "window": 60}
    # A budget of 1 s: a burst of 300 on this shared machine can take a Redis answer past the default 50 ms,
    # and a 503's call may still run in Redis: admissions would be "at most", not exactly, the limit.
    redis = ("--redis-url", redis_url, "--prefix", key_prefix, "--timeout", "1")
    with serve("--workers", "2", *redis, "--log-level", "info") as served:
        allowed = await concurrent_checks(served.base, body, 300)
        served.wait_for_workers(2)
    assert sum(allowed) == 50
    # Two worker processes served (uvicorn logs each one's start).
    assert served.output.count("Started server process") == 2, served.output


def test_two_workers_without_redis_are_refused_in_one_line() -> None:
    result = run("serve", "--workers", "2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asgi-ratelimit: error: --workers 2 needs --redis-url (or ASGI_RATELIMIT_REDIS_URL): "
        "in memory, each worker would keep counts of its own."
    ]
    assert run("serve", env={"ASGI_RATELIMIT_WORKERS": "3"}).returncode == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ASGI_RATELIMIT_PORT": "http"}, "ASGI_RATELIMIT_PORT must be a whole number, got 'http'"),
        ({"ASGI_RATELIMIT_WORKERS": "many"}, "ASGI_RATELIMIT_WORKERS must be a whole number"),
        ({"ASGI_RATELIMIT_PROTECT_METRICS": "maybe"}, "ASGI_RATELIMIT_PROTECT_METRICS must be one of"),
        ({"ASGI_RATELIMIT_TOKEN": "short"}, "at least 16"),
        ({"ASGI_RATELIMIT_TOKEN": TOKEN, "ASGI_RATELIMIT_TOKEN_FILE": "/etc/hostname"}, "not both"),
        ({"ASGI_RATELIMIT_TOKEN_FILE": "/nonexistent/token"}, "Cannot read the token file"),
        ({"ASGI_RATELIMIT_PROTECT_METRICS": "1"}, "needs a token"),
        ({"ASGI_RATELIMIT_REDIS_URL": "foo://nowhere"}, "scheme"),
        ({"ASGI_RATELIMIT_REDIS_URL": "redis://127.0.0.1:1/0", "ASGI_RATELIMIT_PREFIX": "{x}"}, "braces"),
    ],
)
def test_bad_environment_is_refused_naming_it(env: dict[str, str], message: str) -> None:
    result = run("serve", env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_batch_through_the_command_is_all_or_nothing(
    backend: str, request: pytest.FixtureRequest, key_prefix: str
) -> None:
    args: tuple[str, ...] = ()
    if backend == "redis":
        request.getfixturevalue("redis_cleanup")
        args = ("--redis-url", request.getfixturevalue("redis_url"), "--prefix", key_prefix)
    with serve(*args) as served, httpx.Client(base_url=served.base, timeout=5) as client:
        assert client.post("/check", json=SPENT).json()["allowed"] is True
        denied = client.post("/check", json={"checks": [OTHER, SPENT]})
        assert denied.status_code == 200
        assert denied.json()["allowed"] is False
        assert [result["allowed"] for result in denied.json()["results"]] == [True, False]
        # The other check took nothing.
        assert client.post("/check", json=OTHER).json()["remaining"] == 4
        bad = client.post("/check", json={"checks": [OTHER, {**SPENT, "window": "60"}]})
        assert bad.status_code == 422
        assert (bad.json()["index"], bad.json()["field"]) == (1, "checks[1].window")


@pytest.mark.slow
def test_the_token_from_a_file_guards_check_and_reset(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # as `echo` or a Secret volume writes it
    good = {"authorization": f"Bearer {TOKEN}"}
    with serve("--token-file", str(token_file)) as served, httpx.Client(base_url=served.base, timeout=5) as client:
        missing = client.post("/check", json=SPENT)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.headers["content-type"] == "application/problem+json"
        wrong = client.post("/check", json=SPENT, headers={"authorization": f"Bearer {TOKEN[:-1]}x"})
        assert wrong.status_code == 401
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        assert client.post("/reset", json=SPENT).status_code == 401
        assert client.post("/check", json=SPENT, headers=good).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/metrics").status_code == 200
    assert TOKEN not in served.output


@pytest.mark.slow
@pytest.mark.redis
def test_reset_makes_a_denied_key_allowed_again_on_two_workers(
    redis_url: str, key_prefix: str, redis_cleanup: None
) -> None:
    # Many requests over several connections reach both workers: whichever denied it must allow it now.
    with (
        serve("--workers", "2", "--redis-url", redis_url, "--prefix", key_prefix, "--timeout", "1") as served,
        httpx.Client(base_url=served.base, timeout=5) as client,
    ):
        assert client.post("/check", json=SPENT).json()["allowed"] is True
        assert not any(asyncio.run(concurrent_checks(served.base, SPENT, 40)))
        assert client.post("/reset", json=SPENT).status_code == 204
        allowed = asyncio.run(concurrent_checks(served.base, SPENT, 40))
        assert sum(allowed) == 1


@pytest.mark.slow
@pytest.mark.redis
def test_the_environment_alone_configures_the_command(redis_url: str, key_prefix: str, redis_cleanup: None) -> None:
    port = free_port()
    env = {
        "ASGI_RATELIMIT_PORT": str(port),
        "ASGI_RATELIMIT_HOST": "127.0.0.1",
        "ASGI_RATELIMIT_REDIS_URL": redis_url,
        "ASGI_RATELIMIT_PREFIX": key_prefix,
        "ASGI_RATELIMIT_WORKERS": "2",
        "ASGI_RATELIMIT_TOKEN": TOKEN,
        "ASGI_RATELIMIT_PROTECT_METRICS": "yes",
        "ASGI_RATELIMIT_LOG_LEVEL": "info",
    }
    with serve(env=env, port=port) as served, httpx.Client(base_url=served.base, timeout=5) as client:
        assert client.get("/health").json()["backend"] == "RedisBackend"
        assert client.post("/check", json=SPENT).status_code == 401
        assert client.get("/metrics").status_code == 401
        good = {"authorization": f"Bearer {TOKEN}"}
        assert client.post("/check", json=SPENT, headers=good).status_code == 200
        assert client.get("/metrics", headers=good).status_code == 200
        served.wait_for_workers(2)
    assert served.output.count("Started server process") == 2
    client_redis = sync_redis.Redis.from_url(redis_url)
    try:
        assert len(list(client_redis.scan_iter(match=f"{key_prefix}*"))) == 1
    finally:
        client_redis.close()


def fake_run(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[object, ...], dict[str, object]]]:
    """Stand uvicorn.run in; its calls.  The environment main() writes is this test's own."""
    import uvicorn

    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append((args, kwargs)))
    environ = {name: value for name, value in os.environ.items() if not name.startswith("ASGI_RATELIMIT_")}
    monkeypatch.setattr(os, "environ", environ)
    return calls


@pytest.mark.parametrize(
    ("host", "warned"),
    [("0.0.0.0", True), ("10.1.2.3", True), ("127.0.0.1", False), ("::1", False), ("localhost", False)],
)
def test_no_token_on_a_reachable_host_logs_a_warning(
    host: str, warned: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = fake_run(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
        main(["serve", "--host", host])
    assert ("without a token" in caplog.text) is warned
    ((target,), settings) = calls[0]
    assert target == "asgi_ratelimit.service:from_environment"
    assert settings["factory"] is True
    assert settings["host"] == host


def test_with_a_token_there_is_no_warning(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    fake_run(monkeypatch)
    os.environ["ASGI_RATELIMIT_TOKEN"] = TOKEN
    with caplog.at_level(logging.WARNING, logger="asgi_ratelimit"):
        main(["serve", "--host", "0.0.0.0"])
    assert "without a token" not in caplog.text


def test_the_workers_build_what_the_command_was_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # main() hands its settings to the workers through the environment; from_environment() reads them back.
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    calls = fake_run(monkeypatch)
    main(
        [
            "serve",
            "--workers",
            "3",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--prefix",
            "p:",
            "--timeout",
            "0.2",
            "--token-file",
            str(token_file),
            "--protect-metrics",
        ]
    )
    assert calls[0][1]["workers"] == 3
    assert os.environ["ASGI_RATELIMIT_TOKEN_FILE"] == str(token_file.resolve())
    assert "ASGI_RATELIMIT_TOKEN" not in os.environ  # the file's path travels, not the token
    settings = ServiceSettings.from_env(os.environ)
    assert settings == ServiceSettings("redis://127.0.0.1:1/0", "p:", 0.2, TOKEN, str(token_file.resolve()), True)


def test_serve_without_uvicorn_names_the_extra_in_one_line() -> None:
    """A plain `pip install` has no uvicorn: the command says which extra brings it, with no traceback."""
    import subprocess
    import sys

    code = "import sys; sys.modules['uvicorn'] = None; from asgi_ratelimit.__main__ import main; main(['serve'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'asgi-ratelimit: error: serve needs uvicorn: pip install "asgi-ratelimit-middleware[server]"'
    ]
