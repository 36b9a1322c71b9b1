"""Shared fixtures: a real Redis (the machine's, or one started for a test), fakeredis, and backends.

Tests marked ``redis`` need a real server.  Without one they skip with the reason, unless
REQUIRE_REDIS=1 is set (CI sets it), in which case they fail: a missing Redis must never make
CI green by skipping.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis

from asgi_ratelimit import Backend, MemoryBackend, RedisBackend

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("REQUIRE_REDIS") == "1"


def _missing(reason: str) -> None:
    if REQUIRE_REDIS:
        pytest.fail(f"REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)


def _redis_answers(url: str) -> bool:
    try:
        client = sync_redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except sync_redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a running Redis server (the machine's), or a skip/fail with the reason."""
    if not _redis_answers(REDIS_URL):
        _missing(f"no Redis server answers at {REDIS_URL} (set REDIS_URL, or start redis-server)")
    return REDIS_URL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RedisProcess:
    """A redis-server started by a test, on a free loopback port, stopped by the fixture."""

    port: int
    directory: str
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisProcess]]:
    """Start redis-server processes of a test's own; every one is stopped afterwards."""
    if shutil.which("redis-server") is None:
        _missing("the redis-server binary is not installed (apt-get install redis-server)")
    started: list[RedisProcess] = []
    with tempfile.TemporaryDirectory(prefix="asgi-ratelimit-redis-") as directory:

        def start(*extra_args: str) -> RedisProcess:
            server = RedisProcess(port=free_port(), directory=directory, extra_args=list(extra_args))
            server.start()
            started.append(server)
            return server

        yield start
        for server in started:
            server.stop()


@pytest.fixture
def redis_server(redis_server_factory: Callable[..., RedisProcess]) -> RedisProcess:
    """A redis-server of this test's own."""
    return redis_server_factory()


@pytest.fixture
def key_prefix() -> str:
    """A prefix unique to this test, so tests share the machine's Redis without touching each other."""
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


class ManualClock:
    """A clock the test moves by hand, in integer microseconds."""

    def __init__(self, start_us: int = 1_700_000_000_000_000) -> None:
        self.now = start_us

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1_000_000)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


BACKEND_KINDS = ["memory", "fakeredis", "redis"]


@pytest.fixture(params=BACKEND_KINDS)
async def backend(request: pytest.FixtureRequest, clock: ManualClock, key_prefix: str) -> AsyncIterator[Any]:
    """The same engine on every backend, all on the injected clock."""
    kind = request.param
    if kind == "memory":
        yield MemoryBackend(clock=clock, prefix=key_prefix)
        return
    if kind == "fakeredis":
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_url"))
    instance = RedisBackend(client, prefix=key_prefix, clock=clock)
    yield instance
    await instance.aclose()


MIDDLEWARE_BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=MIDDLEWARE_BACKENDS)
async def mw_backend(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[Any]:
    """A backend as an application runs it: MemoryBackend, or RedisBackend on the machine's Redis (server clock)."""
    if request.param == "memory":
        yield MemoryBackend(prefix=key_prefix)
        return
    instance = RedisBackend(Redis.from_url(request.getfixturevalue("redis_url")), prefix=key_prefix)
    yield instance
    await instance.aclose()


@pytest.fixture(params=MIDDLEWARE_BACKENDS)
async def mw_clocked_backend(request: pytest.FixtureRequest, key_prefix: str, clock: ManualClock) -> AsyncIterator[Any]:
    """Like ``mw_backend``, on the test's ManualClock (Redis in client-clock mode), for tests that move time."""
    if request.param == "memory":
        yield MemoryBackend(prefix=key_prefix, clock=clock)
        return
    instance = RedisBackend(Redis.from_url(request.getfixturevalue("redis_url")), prefix=key_prefix, clock=clock)
    yield instance
    await instance.aclose()


def parse_sf_list(value: str | bytes) -> list[tuple[str, dict[str, int]]]:
    """Parse a RateLimit / RateLimit-Policy field with http_sfv, an independent RFC 9651 parser.

    Checks what the draft requires of every member: an Item whose value is a String (not a Token) and whose
    parameters are integers.  Returns (name, parameters) per member.
    """
    import http_sfv

    parsed = http_sfv.List()
    parsed.parse(value.encode("ascii") if isinstance(value, str) else value)
    items = []
    for member in parsed:
        assert isinstance(member, http_sfv.Item)
        assert isinstance(member.value, str) and not isinstance(member.value, http_sfv.Token)
        params = dict(member.params)
        assert all(type(v) is int for v in params.values()), params
        items.append((member.value, params))
    return items


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_backend(request: pytest.FixtureRequest, key_prefix: str) -> Callable[[], Backend]:
    """Builds the backend for one server (called in the test, used on the server's loop)."""
    if request.param == "memory":
        return lambda: MemoryBackend(prefix=key_prefix)
    url = request.getfixturevalue("redis_url")
    return lambda: RedisBackend(Redis.from_url(url), prefix=key_prefix)


@pytest.fixture
def forget_prefixed_keys(request: pytest.FixtureRequest, key_prefix: str) -> Iterator[None]:
    """After a test marked ``redis``, delete every key under its prefix from the machine's Redis."""
    url = request.getfixturevalue("redis_url") if request.node.get_closest_marker("redis") else None
    yield
    if url is not None:
        delete_prefixed(url, key_prefix)


def delete_prefixed(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` from the Redis at ``url``."""
    client = sync_redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
