"""Coalesced round trips: concurrent hits share pipelines, with the same decisions and NOSCRIPT recovered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis as sync_redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from asgi_ratelimit import GCRA, BackendError, RedisBackend, SlidingWindow, TokenBucket
from asgi_ratelimit.backends._coalesce import ScriptCaller
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


async def test_noscript_inside_a_pipeline_is_recovered(
    redis_server_factory: Callable[..., Any], key_prefix: str
) -> None:
    server = redis_server_factory()
    admin = sync_redis.Redis.from_url(server.url)
    client = Redis.from_url(server.url)
    caller = ScriptCaller(client, HIT_SCRIPT)
    policy = GCRA(1000, 1)
    try:
        await caller(1, f"{key_prefix}warm", "", policy.code, 1, *policy.params)  # loads the script
        # Hold the caller busy with a slow first call so the next ones queue, then flush the
        # scripts before the queue leaves: the pipeline meets NOSCRIPT on every entry.
        first = asyncio.ensure_future(caller(1, f"{key_prefix}first", "", policy.code, 1, *policy.params))
        await asyncio.sleep(0)
        queued = [
            asyncio.ensure_future(caller(1, f"{key_prefix}q{i}", "", policy.code, 1, *policy.params)) for i in range(10)
        ]
        await first
        admin.script_flush()
        results = await asyncio.gather(*queued)
        assert [r[0] for r in results] == [1] * 10
        assert admin.script_exists(caller.sha) == [True]
        # warm-up, the first call, then one pipeline met NOSCRIPT and one more carried the retry.
        assert caller.round_trips == 4
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
