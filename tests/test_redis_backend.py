"""RedisBackend: one round trip per hit, script recovery, clocks, and what lands in Redis (keys, TTLs)."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.crc import key_slot

from asgi_ratelimit import (
    GCRA,
    BackendError,
    ConfigurationError,
    FixedWindow,
    MemoryBackend,
    RedisBackend,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
)
from asgi_ratelimit._keys import digest
from asgi_ratelimit.backends import redis as redis_module
from asgi_ratelimit.policies import Policy

T0 = 1_699_999_200_000_000
US = 1_000_000

EVERY_ALGORITHM: list[Policy] = [
    FixedWindow(10, 60),
    SlidingWindow(10, 60),
    GCRA(10, 60),
    TokenBucket(10, 0.5),
    SlidingWindowCounter(10, 60),
]


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A Redis client: fakeredis, or the machine's Redis (tests keep to their own key prefix)."""
    if request.param == "fakeredis":
        instance: Any = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        instance = Redis.from_url(request.getfixturevalue("redis_url"))
    yield instance
    await instance.aclose()


async def keys_of(client: Any, prefix: str) -> list[str]:
    return sorted([key.decode() async for key in client.scan_iter(match=f"{prefix}*", count=1000)])


# -- one round trip ------------------------------------------------------------------------


class Monitor:
    """The commands a redis-server receives, from MONITOR, up to a sentinel sent afterwards."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = sync_redis.Redis.from_url(url, socket_timeout=10)
        # Connected before monitoring starts, so its handshake is not among the commands seen.
        self.other = sync_redis.Redis.from_url(url, single_connection_client=True)
        self.other.ping()
        self.monitor = self.client.monitor()
        self.monitor.__enter__()

    def collect(self) -> list[str]:
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        self.other.echo(sentinel)
        commands = []
        while True:
            info = self.monitor.next_command()
            if sentinel in info["command"]:
                return commands
            commands.append(f"{info['client_type']} {info['command']}")

    def close(self) -> None:
        self.monitor.__exit__(None, None, None)
        self.client.close()
        self.other.close()


@pytest.mark.redis
async def test_a_hit_is_one_evalsha_whatever_the_number_of_policies(redis_server: Any) -> None:
    backend = RedisBackend(Redis.from_url(redis_server.url), prefix="one:")
    await backend.hit("warm-up", [FixedWindow(1, 1)])  # loads the script (NOSCRIPT, SCRIPT LOAD)
    monitor = Monitor(redis_server.url)
    try:
        decisions = await backend.hit("client", EVERY_ALGORITHM)
        from_client = [c for c in monitor.collect() if not c.startswith("lua")]
        assert len(decisions) == 5
        assert len(from_client) == 1
        assert from_client[0].startswith("tcp EVALSHA")
        # Several identities in one hit_many: still one call.
        await backend.hit_many([("a", FixedWindow(1, 1), 1), ("b", GCRA(5, 1), 2), ("c", TokenBucket(3, 1), 1)])
        commands = monitor.collect()
        assert [c.split(" ")[1] for c in commands if not c.startswith("lua")] == ["EVALSHA"]
        # The script's own reads and writes were seen, so the monitor does watch everything.
        assert any(c.startswith("lua") for c in commands)
    finally:
        monitor.close()
        await backend.aclose()


@pytest.mark.redis
async def test_commandstats_count_one_evalsha_per_hit(redis_server: Any) -> None:
    admin = sync_redis.Redis.from_url(redis_server.url)
    backend = RedisBackend(Redis.from_url(redis_server.url), prefix="stats:")
    try:
        await backend.hit("warm-up", EVERY_ALGORITHM)
        before = admin.info("commandstats")
        for number in range(7):
            await backend.hit(f"client-{number}", EVERY_ALGORITHM)
        after = admin.info("commandstats")
        calls = {
            name: after[name]["calls"] - before.get(name, {"calls": 0})["calls"]
            for name in after
            if after[name]["calls"] != before.get(name, {"calls": 0})["calls"]
        }
        assert calls["cmdstat_evalsha"] == 7
        assert "cmdstat_script|load" not in calls
        assert "cmdstat_eval" not in calls
    finally:
        admin.close()
        await backend.aclose()


# -- NOSCRIPT recovery -----------------------------------------------------------------------


@pytest.mark.redis
async def test_noscript_after_script_flush_is_recovered(redis_server: Any) -> None:
    admin = sync_redis.Redis.from_url(redis_server.url)
    backend = RedisBackend(Redis.from_url(redis_server.url), prefix="flush:")
    policy = FixedWindow(5, 3600)
    try:
        assert (await backend.hit("k", [policy]))[0].remaining == 4
        admin.script_flush()
        assert admin.script_exists(backend._call.sha) == [False]
        # The next hit reloads the script and keeps the state (the keys were not flushed).
        assert (await backend.hit("k", [policy]))[0].remaining == 3
        assert admin.script_exists(backend._call.sha) == [True]
    finally:
        admin.close()
        await backend.aclose()


@pytest.mark.redis
async def test_hits_survive_a_redis_restart(redis_server: Any) -> None:
    backend = RedisBackend.from_url(redis_server.url, prefix="restart:")
    policy = SlidingWindow(5, 3600)
    try:
        assert (await backend.hit("k", [policy]))[0].remaining == 4
        redis_server.restart()  # same port, empty memory, no scripts, a stale pooled connection
        [decision] = await backend.hit("k", [policy])  # reconnects, NOSCRIPT, loads, runs
        assert decision.allowed
        assert decision.remaining == 4  # the state went with the restart (no persistence)
        assert (await backend.hit("k", [policy]))[0].remaining == 3
    finally:
        await backend.aclose()


@pytest.mark.redis
async def test_a_client_without_retries_loses_one_hit_to_a_restart_then_recovers(redis_server: Any) -> None:
    client = Redis.from_url(redis_server.url)  # redis-py's from_url: no retries
    backend = RedisBackend(client, prefix="restart:")
    policy = GCRA(5, 3600)
    try:
        assert (await backend.hit("k", [policy]))[0].allowed
        redis_server.restart()
        with pytest.raises(BackendError, match="ConnectionError"):
            await backend.hit("k", [policy])  # the pooled connection was closed by the old server
        assert (await backend.hit("k", [policy]))[0].remaining == 4
    finally:
        await backend.aclose()


# -- clocks ----------------------------------------------------------------------------------


def server_time_us(url: str) -> int:
    with sync_redis.Redis.from_url(url) as admin:
        seconds, micros = admin.time()
        return int(seconds) * US + int(micros)


def never_called() -> int:
    raise AssertionError("server-clock mode read the client's clock")


@pytest.mark.redis
async def test_server_clock_is_the_default_and_ignores_the_client_clock(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "system_clock_us", never_called)
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    window = 3600 * US
    try:
        before = server_time_us(redis_url)
        [decision] = await backend.hit("k", [FixedWindow(2, 3600)])
        after = server_time_us(redis_url)
        # reset_after = end of the window holding the script's `now`, which was read between
        # the two TIMEs (when they fall in one window, which a fresh window at 'after' repeats).
        reset_us = round(decision.reset_after * US)
        if before // window == after // window:
            assert (after // window + 1) * window - after <= reset_us <= (before // window + 1) * window - before
        else:
            assert reset_us <= window
    finally:
        await backend.aclose()


@pytest.mark.redis
async def test_server_clock_is_shared_by_backends_whose_clocks_disagree(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two server-mode backends agree; two client-mode ones with skewed clocks do not."""
    policy = GCRA(1, 3600)
    monkeypatch.setattr(redis_module, "system_clock_us", never_called)
    a = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix + "server:")
    b = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix + "server:")
    now = server_time_us(redis_url)
    ahead = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix + "client:", clock=Clock(now + 7200 * US))
    behind = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix + "client:", clock=Clock(now))
    try:
        assert (await a.hit("k", [policy]))[0].allowed
        assert not (await b.hit("k", [policy]))[0].allowed  # one clock, one limit
        # Skewed clients: the one two hours ahead takes the hit; the one behind then sees a
        # theoretical arrival time three hours away, beyond the tolerance, and is denied.
        assert (await ahead.hit("k", [policy]))[0].allowed
        [denied] = await behind.hit("k", [policy])
        assert not denied.allowed
        # Its tat is now + 3 h; this hit would end at now + 4 h, 3 h past the 1 h tolerance.
        assert denied.retry_after == 10800.0
    finally:
        for backend in (a, b, ahead, behind):
            await backend.aclose()


@pytest.mark.redis
async def test_client_clock_mode_uses_this_process_clock(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_module, "system_clock_us", lambda: T0 + 3_250_000)
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix, clock="client")
    try:
        [decision] = await backend.hit("k", [FixedWindow(1, 10)])
        assert decision.reset_after == 6.75  # exact: the window is [T0, T0 + 10 s)
    finally:
        await backend.aclose()


async def test_an_injected_clock_drives_the_script(client: Any, key_prefix: str) -> None:
    clock = Clock(T0 + 1)
    backend = RedisBackend(client, prefix=key_prefix, clock=clock)
    [decision] = await backend.hit("k", [FixedWindow(1, 10)])
    assert decision.reset_after == 9.999999
    clock.now = T0 + 10 * US
    assert (await backend.hit("k", [FixedWindow(1, 10)]))[0].allowed


def test_bad_clock_and_prefix_are_configuration_errors() -> None:
    client = fakeredis.FakeAsyncRedis()
    with pytest.raises(ConfigurationError, match="'sundial'"):
        RedisBackend(client, clock="sundial")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=re.escape("'rl:{x}:'")):
        RedisBackend(client, prefix="rl:{x}:")
    with pytest.raises(ConfigurationError, match="None"):
        RedisBackend(client, prefix=None)  # type: ignore[arg-type]


# -- keys and TTLs ---------------------------------------------------------------------------


def ttl_bound_ms(reset_after: float) -> int:
    """The TTL the script sets for a reset_after: whole milliseconds, rounded up, at least 1."""
    return max(1, math.ceil(round(reset_after * US) / 1000))


@pytest.mark.parametrize("policy", EVERY_ALGORITHM, ids=lambda p: p.algorithm)
async def test_every_key_gets_a_ttl_no_longer_than_its_state_matters(
    client: Any, key_prefix: str, policy: Policy
) -> None:
    clock = Clock(T0 + 1_234_567)
    backend = RedisBackend(client, prefix=key_prefix, clock=clock)
    for cost in (1, 3, 6):
        [decision] = await backend.hit("k", [policy], cost)
        assert decision.allowed
        [key] = await keys_of(client, key_prefix)
        pttl = await client.pttl(key)
        # The state matters until the key is back to its full allowance, reset_after from now.
        assert 0 < pttl <= ttl_bound_ms(decision.reset_after)
        clock.now += 100_000
    # A denied hit writes nothing, so it cannot extend the TTL either.
    [denied] = await backend.hit("k", [policy], 5)
    assert not denied.allowed
    assert 0 < await client.pttl(key) <= pttl


async def test_ttls_are_whole_milliseconds_rounded_up(client: Any, key_prefix: str) -> None:
    backend = RedisBackend(client, prefix=key_prefix, clock=Clock(T0 + 1_500))
    [decision] = await backend.hit("k", [FixedWindow(1, 3600)])
    [key] = await keys_of(client, key_prefix)
    # 3,599,998,500 us to the window's end: 3,599,998.5 ms, so a TTL of 3,599,999 ms.
    assert decision.reset_after == 3599.9985
    assert 3_599_000 < await client.pttl(key) <= 3_599_999


@pytest.mark.parametrize(
    "identity",
    ["203.0.113.9", "{tag}", "user}{:x{", "k" * 50_000, "ünïcødé ✓ 🚦", "", "rl:{abc}:4:10:60000000"],
)
async def test_identities_are_hashed_into_fixed_size_keys_with_one_hash_tag(
    client: Any, key_prefix: str, identity: str
) -> None:
    backend = RedisBackend(client, prefix=key_prefix, clock=Clock())
    await backend.hit(identity, EVERY_ALGORITHM)
    keys = await keys_of(client, key_prefix)
    assert len(keys) == len(EVERY_ALGORITHM)
    hashed = digest(identity)
    tags = set()
    for key in keys:
        if identity:
            assert identity not in key
        match = re.fullmatch(re.escape(key_prefix) + r"\{([0-9a-f]{24})\}:\d:[0-9.e+-]+:\d+", key)
        assert match is not None, key
        tags.add(match[1])
        assert len(key) < len(key_prefix) + 60
    assert tags == {hashed}
    assert len({key_slot(key.encode()) for key in keys}) == 1


async def test_the_prefix_is_configurable(client: Any, key_prefix: str) -> None:
    custom = key_prefix + "my-app:"
    backend = RedisBackend(client, prefix=custom, clock=Clock())
    await backend.hit("k", [FixedWindow(1, 60)])
    keys = await keys_of(client, key_prefix)
    assert len(keys) == 1
    assert keys[0].startswith(custom + "{")
    # Another prefix is another, independent limiter on the same Redis.
    other = RedisBackend(client, prefix=key_prefix + "other:", clock=Clock())
    assert (await other.hit("k", [FixedWindow(1, 60)]))[0].allowed


async def test_memory_and_redis_build_the_same_keys(client: Any, key_prefix: str) -> None:
    clock = Clock()
    redis_backend = RedisBackend(client, prefix=key_prefix, clock=clock)
    memory = MemoryBackend(prefix=key_prefix, clock=clock)
    await redis_backend.hit("someone", EVERY_ALGORITHM)
    await memory.hit("someone", EVERY_ALGORITHM)
    assert await keys_of(client, key_prefix) == sorted(memory._store)


# -- the sliding-window log in Redis ------------------------------------------------------


async def test_sliding_log_counts_hits_in_the_same_microsecond(client: Any, key_prefix: str) -> None:
    backend = RedisBackend(client, prefix=key_prefix, clock=Clock())
    policy = SlidingWindow(6, 10)
    assert [d.remaining for d in await backend.hit("k", [policy])] == [5]
    assert [d.remaining for d in await backend.hit("k", [policy])] == [4]
    [key] = await keys_of(client, key_prefix)
    assert await client.zcard(key) == 2
    await backend.hit("k", [policy], 3)
    assert await client.zcard(key) == 5
    # Denied hits are not recorded (a retrying client must not lock itself out).
    for _ in range(3):
        assert not (await backend.hit("k", [policy], 2))[0].allowed
    assert await client.zcard(key) == 5
    assert (await backend.hit("k", [policy], 1))[0].remaining == 0
    assert await client.zcard(key) == 6


async def test_sliding_log_members_stay_unique_when_client_clocks_disagree(client: Any, key_prefix: str) -> None:
    """Two app servers with skewed clocks hit one key; no admitted unit may overwrite another."""
    policy = SlidingWindow(10, 1)
    clock = Clock()
    backend = RedisBackend(client, prefix=key_prefix, clock=clock)
    memory_clock = Clock()
    memory = MemoryBackend(prefix=key_prefix, clock=memory_clock)
    # 0.1 s, 0.2 s, then 1.0 s (two live before it), then 1.3 s drops the first two, then a
    # server whose clock lags hits at 1.0 s again, with two live entries as before.
    for at in (100_000, 200_000, 1_000_000, 1_300_000, 1_000_000, 1_000_000):
        clock.now = memory_clock.now = T0 + at
        assert await backend.hit("k", [policy]) == await memory.hit("k", [policy])
    [key] = await keys_of(client, key_prefix)
    assert await client.zcard(key) == 6 - 2  # every admitted hit is there, but the two expired ones
    assert await client.zcount(key, T0 + 1_000_000, T0 + 1_000_000) == 3


# -- failures --------------------------------------------------------------------------------


def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_unreachable_redis_raises_backend_error() -> None:
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{unused_port()}/0")
    try:
        with pytest.raises(BackendError, match="ConnectionError") as info:
            await backend.hit("k", [FixedWindow(1, 1)])
        assert info.value.__cause__ is not None
        with pytest.raises(BackendError, match="PING"):
            await backend.ping()
    finally:
        await backend.aclose()


async def test_a_script_error_raises_backend_error(client: Any, key_prefix: str) -> None:
    backend = RedisBackend(client, prefix=key_prefix, clock=Clock())
    policy = FixedWindow(1, 60)
    await backend.hit("k", [policy])
    [key] = await keys_of(client, key_prefix)
    await client.delete(key)
    await client.set(key, "not a hash", px=60_000)  # WRONGTYPE inside the script; expires like the limiter's keys
    try:
        with pytest.raises(BackendError, match="decide"):
            await backend.hit("k", [policy])
    finally:
        await client.delete(key)


def test_from_url_sets_short_socket_timeouts() -> None:
    backend = RedisBackend.from_url("redis://127.0.0.1:1/0", prefix="p:")
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == redis_module.DEFAULT_SOCKET_TIMEOUT
    assert kwargs["socket_connect_timeout"] == redis_module.DEFAULT_SOCKET_TIMEOUT
    assert backend.prefix == "p:"
    retry = kwargs["retry"]
    assert retry.get_retries() == 1
    explicit = RedisBackend.from_url("redis://127.0.0.1:1/0", socket_timeout=2.0)
    assert explicit.client.connection_pool.connection_kwargs["socket_timeout"] == 2.0


@pytest.mark.redis
async def test_ping_answers_on_a_live_server(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url)
    try:
        await backend.ping()
    finally:
        await backend.aclose()
