"""Coalesced round trips: concurrent hits share pipelines, with the same decisions and NOSCRIPT recovered."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis as sync_redis
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from asgi_ratelimit import GCRA, BackendError, RedisBackend, SlidingWindow, TokenBucket
from asgi_ratelimit._keys import digest, state_key
from asgi_ratelimit._limiter import Limiter, error_kind
from asgi_ratelimit.backends._coalesce import ScriptCaller
from asgi_ratelimit.backends._wire import WireCalls
from asgi_ratelimit.backends.redis import HIT_SCRIPT

pytestmark = pytest.mark.redis


async def test_concurrent_hits_share_round_trips_and_admit_exactly_the_limit(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    try:
        policies = [SlidingWindow(25, 60), TokenBucket(30, 0.1)]
        decisions = await asyncio.gather(*(backend.hit("one-key", policies) for _ in range(200)))
        admitted = [all(d.allowed for d in pair) for pair in decisions]
        assert sum(admitted) == 25
        # The first call goes alone; the rest queue behind it and leave in a few pipelines.
        assert backend.round_trips < 200 / 4
    finally:
        await backend.aclose()


async def test_a_lone_hit_goes_straight_out(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    try:
        for expected in range(1, 4):
            await backend.hit("k", [GCRA(10, 1)])
            assert backend.round_trips == expected
    finally:
        await backend.aclose()


async def test_coalescing_can_be_switched_off(redis_url: str, key_prefix: str) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix, coalesce=False)
    try:
        await asyncio.gather(*(backend.hit(f"k{i}", [GCRA(10, 1)]) for i in range(20)))
        assert backend.round_trips == 20
    finally:
        await backend.aclose()


@pytest.mark.parametrize("wire", [False, True], ids=["redis-py", "wire"])
async def test_noscript_inside_a_pipeline_is_recovered(
    redis_server_factory: Callable[..., Any], key_prefix: str, wire: bool
) -> None:
    server = redis_server_factory()
    admin = sync_redis.Redis.from_url(server.url)
    client = Redis.from_url(server.url)
    caller = ScriptCaller(client, HIT_SCRIPT, wire=wire)
    policy = GCRA(1000, 1)
    try:
        await caller(1, f"{key_prefix}warm", "", policy.code, 1, *policy.script_args[1:])  # loads the script
        # Hold the caller's one round trip as if a call were in flight, so the next calls queue; flush
        # the scripts; then let the queue leave: the pipeline meets NOSCRIPT on every entry.
        caller._in_flight += 1
        queued = [
            asyncio.ensure_future(caller(1, f"{key_prefix}q{i}", "", policy.code, 1, *policy.script_args[1:]))
            for i in range(10)
        ]
        await asyncio.sleep(0)
        assert len(caller._queue) == 10
        admin.script_flush()
        caller._in_flight -= 1
        caller._send_queued()
        results = await asyncio.gather(*queued)
        assert [r[0] for r in results] == [1] * 10
        assert admin.script_exists(caller.sha) == [True]
        # warm-up, then one pipeline met NOSCRIPT and one more carried the retry.
        assert caller.round_trips == 3
    finally:
        admin.close()
        await client.aclose()


async def test_a_failed_pipeline_fails_every_queued_call(redis_server_factory: Callable[..., Any]) -> None:
    server = redis_server_factory()
    backend = RedisBackend(Redis.from_url(server.url, socket_timeout=1), prefix="x:")
    try:
        await backend.hit("warm", [GCRA(10, 1)])
        server.stop()
        outcomes = await asyncio.gather(
            *(backend.hit(f"k{i}", [GCRA(10, 1)]) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(outcome, BackendError) for outcome in outcomes)
    finally:
        await backend.aclose()


# -- calls written on the wire (one Redis, not a cluster) ----------------------------------------

_ARGUMENTS = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(calls=st.lists(st.lists(_ARGUMENTS, max_size=6).map(lambda args: [len(args), *args]), min_size=1, max_size=4))
def test_the_wire_bytes_are_the_ones_redis_py_would_send(calls: list[list[Any]]) -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    connection = Redis().connection_pool.make_connection()
    expected = b"".join(connection.pack_commands([("EVALSHA", sha, *call) for call in calls]))
    assert WireCalls(None, sha, hold_connection=False).pack(calls) == expected


async def test_on_the_wire_one_calls_error_leaves_the_others_standing(redis_url: str, key_prefix: str) -> None:
    client = Redis.from_url(redis_url)
    # A script of this test's own (the prefix is unique), so that the shared Redis cannot know it yet.
    source = f"-- {key_prefix}\nif ARGV[1] == 'fail' then return redis.error_reply('no') end return ARGV[1]"
    caller = ScriptCaller(client, source, wire=True)
    wire = caller._wire
    assert wire is not None
    try:
        replies = await wire.exchange([(0, b"a"), (0, b"c")])
        assert all(isinstance(reply, redis_errors.NoScriptError) for reply in replies)  # not loaded yet
        await caller._load()
        replies = await wire.exchange([(0, b"a"), (0, b"fail"), (0, b"c")])
        assert replies[0] == b"a" and replies[2] == b"c"
        assert isinstance(replies[1], redis_errors.ResponseError) and "no" in str(replies[1])
        # The connection stayed in step with the server: the next call reads its own reply.
        assert await caller(0, b"again") == b"again"
        with pytest.raises(redis_errors.ResponseError):
            await caller(0, b"fail")
    finally:
        await client.aclose()


async def test_on_the_wire_a_stale_connection_after_a_restart_is_retried(
    redis_server_factory: Callable[..., Any], key_prefix: str
) -> None:
    server = redis_server_factory()
    backend = RedisBackend.from_url(server.url, prefix=key_prefix)
    try:
        assert (await backend.hit("k", [GCRA(10, 1)]))[0].allowed
        server.restart()  # the pooled connection is dead, and the script gone
        assert (await backend.hit("k", [GCRA(10, 1)]))[0].allowed
    finally:
        await backend.aclose()


class _FlakyPipelineClient:
    """A stand-in client whose pipelines answer NOSCRIPT once, to pin the retry logic."""

    def __init__(self) -> None:
        self.loaded = False
        self.pipelines = 0

    async def execute_command(self, *args: Any) -> Any:
        await asyncio.sleep(0.01)
        return [1]

    async def script_load(self, source: str) -> str:
        self.loaded = True
        return ScriptCaller(None, source).sha

    def pipeline(self, transaction: bool) -> Any:
        client = self

        class Pipe:
            def __init__(self) -> None:
                self.calls: list[tuple[Any, ...]] = []

            def execute_command(self, *args: Any) -> None:
                self.calls.append(args)

            async def execute(self, raise_on_error: bool) -> list[Any]:
                client.pipelines += 1
                if not client.loaded:
                    return [redis_errors.NoScriptError("NOSCRIPT") for _ in self.calls]
                return [[i] for i, _ in enumerate(self.calls)]

        return Pipe()


async def test_pipeline_entries_that_met_noscript_are_sent_again_in_order() -> None:
    client = _FlakyPipelineClient()
    caller = ScriptCaller(client, "return 1")
    results = await asyncio.gather(*(caller(0, i) for i in range(5)))
    assert results[0] == [1]  # the direct call
    assert results[1:] == [[0], [1], [2], [3]]  # the queued four, retried after SCRIPT LOAD, in order
    assert client.pipelines == 2


# -- calls with a time budget: submit() ----------------------------------------------------------


@pytest.mark.parametrize("wire", [False, True], ids=["redis-py", "wire"])
async def test_a_submitted_call_given_up_before_its_turn_is_never_sent(
    redis_url: str, key_prefix: str, wire: bool
) -> None:
    client = Redis.from_url(redis_url)
    caller = ScriptCaller(client, HIT_SCRIPT, wire=wire)
    policy = GCRA(10, 60)  # keys that live for seconds, so the test can look for them

    def args(name: str) -> list[Any]:
        return [f"{key_prefix}{name}", "", policy.code, 1, *policy.script_args[1:]]

    try:
        await caller(1, *args("warm"))  # loads the script
        first = caller.submit(1, *args("first"))  # goes out at once
        queued = {name: caller.submit(1, *args(name)) for name in ("a", "b", "c", "d")}
        queued["b"].cancel()  # its request went away
        queued["c"].set_exception(BackendError("budget spent"))  # the limiter's timer
        queued["c"].exception()
        await first
        assert (await queued["a"])[0] == 1 and (await queued["d"])[0] == 1
        written = {key.decode().removeprefix(key_prefix) for key in await client.keys(f"{key_prefix}*")}
        assert written == {"warm", "first", "a", "d"}
        assert caller.round_trips == 3  # warm-up, first, then one pipeline of the two still wanted
    finally:
        await client.aclose()


async def test_submit_hands_back_decisions_and_the_limiter_waits_on_them_without_a_task_each(
    redis_url: str, key_prefix: str
) -> None:
    backend = RedisBackend(Redis.from_url(redis_url), prefix=key_prefix)
    limiter = Limiter(backend, timeout=2.0, registry=CollectorRegistry(), deny_cache=False)
    policy = SlidingWindow(30, 60)
    loop = asyncio.get_running_loop()
    created: list[str] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Future[Any]:
        created.append(coro.__qualname__)
        if default_factory is not None:
            return default_factory(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    try:
        await limiter.decide([("warm", policy, 1)])  # initialises the client and loads the script
        trips_before = backend.round_trips
        requests = [asyncio.ensure_future(limiter.decide([("one-key", policy, 1)])) for _ in range(50)]
        loop.set_task_factory(counting_factory)
        decisions = await asyncio.gather(*requests)
    finally:
        loop.set_task_factory(default_factory)
        await backend.aclose()
    assert sum(d[0].allowed for d in decisions) == 30
    assert all(d[0].limit == 30 for d in decisions)
    # No task per decision: ours are the backend's round trips (redis-py adds a few of its own for its I/O).
    ours = [name for name in created if not name.startswith(("AbstractConnection.", "ConnectionPool."))]
    assert ours == ["ScriptCaller._flush"] * (backend.round_trips - trips_before), created
    assert len(created) < 50 / 4, created


async def test_a_submitted_call_past_its_budget_fails_the_request_not_the_round_trip(
    redis_server_factory: Callable[..., Any], key_prefix: str
) -> None:
    server = redis_server_factory()
    backend = RedisBackend.from_url(server.url, prefix=key_prefix)
    limiter = Limiter(backend, timeout=0.05, deny_cache=False)
    policy = GCRA(10, 1)
    admin = sync_redis.Redis.from_url(server.url)
    try:
        await limiter.decide([("warm", policy, 1)])
        os.kill(server.process.pid, signal.SIGSTOP)  # Redis cannot answer: the budget runs out
        try:
            with pytest.raises(BackendError) as caught:
                await limiter.decide([("late", policy, 1)])
            assert error_kind(caught.value) == "timeout"
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # Abandoned, not cancelled: the round trip still reaches Redis, which decides it once thawed.
        key = state_key(key_prefix, digest("late"), policy)
        deadline = time.monotonic() + 5
        while not admin.exists(key) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert admin.exists(key)
        assert (await limiter.decide([("again", policy, 1)]))[0].allowed
    finally:
        admin.close()
        await backend.aclose()


async def test_coalesced_calls_on_one_redis_hold_one_connection_instead_of_taking_one_each(
    redis_url: str, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = RedisBackend.from_url(redis_url, prefix=key_prefix)
    pool = backend.client.connection_pool
    taken: list[object] = []
    original = pool.get_connection

    async def counting_get_connection(*args: Any, **kwargs: Any) -> Any:
        connection = await original(*args, **kwargs)
        taken.append(connection)
        return connection

    monkeypatch.setattr(pool, "get_connection", counting_get_connection)
    try:
        await backend.hit("warm", [GCRA(10, 60)])  # loads the script, takes the connection
        taken.clear()
        for _ in range(3):
            await asyncio.gather(*(backend.hit(f"k{i}", [GCRA(10, 60)]) for i in range(50)))
        for i in range(20):
            await backend.hit(f"k{i}", [GCRA(10, 60)])
        assert taken == []
    finally:
        await backend.aclose()


async def test_on_the_wire_a_write_the_socket_cannot_take_times_out_and_drops_the_connection(
    redis_server_factory: Callable[..., Any],
) -> None:
    server = redis_server_factory()
    client = Redis.from_url(server.url, socket_timeout=0.5)
    caller = ScriptCaller(client, "return #ARGV[1]", wire=True)
    try:
        assert await caller(0, b"x") == 1  # loads the script, connects
        os.kill(server.process.pid, signal.SIGSTOP)  # Redis reads nothing: the socket's buffers fill up
        try:
            started = time.monotonic()
            with pytest.raises(redis_errors.TimeoutError):
                await caller(0, b"x" * (64 << 20))
            assert time.monotonic() - started < 5
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # The half-written command went with its connection: the next call starts clean.
        assert await caller(0, b"abc") == 3
        # redis-py closes the timed-out connection gracefully (its public API has no abort): the socket
        # hands Redis what it holds, which Redis drops as an incomplete command, and then it closes.
        # Left open: the connection the caller holds, and the one INFO takes from the pool.
        for _ in range(100):
            if (await client.info("clients"))["connected_clients"] == 2:
                break
            await asyncio.sleep(0.05)
        assert (await client.info("clients"))["connected_clients"] == 2
    finally:
        await client.aclose()
