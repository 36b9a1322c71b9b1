"""The configs compared by bench_http.py: one row per app, built the same way in process and under uvicorn.

Every app serves one trivial endpoint, ``GET /`` returning a small JSON body. Every limiter is keyed by the
client IP and, unless the row expects 429s, has a limit so high that nothing is rejected. Every Redis-backed
limiter stores its keys under ``BuildContext.prefix`` on the database of ``BuildContext.redis_url``, so the
harness can delete exactly its own keys afterwards.

To add a config, write a builder ``(ctx) -> Built`` and add a ``Config`` row to ``CONFIGS``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import time_ns
from typing import Any, Literal

Framework = Literal["starlette", "fastapi"]
Kind = Literal["bare", "ours", "peer"]
ASGIApp = Callable[..., Awaitable[None]]

# High enough that a benchmark never reaches it; the flood rows use FLOOD instead.
OPEN_PER_MINUTE = 10**9
FLOOD_PER_MINUTE = 1
BODY = {"hello": "world"}
# Seconds ours may wait for its backend (the middleware's default is 0.05): see _ours.
OURS_TIMEOUT = 1.0


@dataclass(frozen=True)
class BuildContext:
    """What a builder needs: where Redis is and the key prefix it must keep all its keys under."""

    redis_url: str
    prefix: str


async def _nothing() -> None:
    return None


@dataclass
class Built:
    """An ASGI app and the coroutine function that releases its connections (used in process)."""

    app: Any
    aclose: Callable[[], Awaitable[None]] = _nothing


@dataclass(frozen=True)
class Config:
    """One row of the comparison."""

    name: str
    label: str
    framework: Framework
    kind: Kind
    build: Callable[[BuildContext], Built]
    redis: bool = False
    expect: int = 200
    # "module:attribute" names that must import for the row to run; otherwise it is skipped with a note.
    requires: tuple[str, ...] = ()

    @property
    def bare(self) -> str:
        """The config this one is compared with: the bare app of the same framework."""
        return f"bare-{self.framework}"


def missing_requirement(config: Config) -> str | None:
    """Why ``config`` cannot run here (a requirement that does not import), or None."""
    for requirement in config.requires:
        module_name, _, attribute = requirement.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # not only ImportError: a package mid-edit can raise anything on import
            return f"cannot import {module_name} ({type(exc).__name__}: {exc})"
        if attribute and not hasattr(module, attribute):
            return f"{module_name}.{attribute} does not exist yet"
    return None


# -- bare apps -------------------------------------------------------------------------------------------------


def starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def homepage(request: Any) -> JSONResponse:
        return JSONResponse(BODY)

    return Starlette(routes=[Route("/", homepage)])


def fastapi_app(dependencies: list[Any] | None = None) -> Any:
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/", dependencies=dependencies)
    async def homepage() -> dict[str, str]:
        return BODY

    return app


def _bare(framework: Framework) -> Callable[[BuildContext], Built]:
    def build(ctx: BuildContext) -> Built:
        return Built(starlette_app() if framework == "starlette" else fastapi_app())

    return build


# -- ours: asgi_ratelimit ------------------------------------------------------------------------------------


def _ours(
    backend: Literal["memory", "redis"], per_minute: int, framework: Framework, algorithm: str | None = None
) -> Callable[[BuildContext], Built]:
    """Ours as documented, with the default algorithm (GCRA) named, so that a run against an older version,
    whose default was the exact log, measures the same algorithm."""

    def build(ctx: BuildContext) -> Built:
        from asgi_ratelimit import MemoryBackend, RateLimitMiddleware, RedisBackend, Rule

        try:
            from asgi_ratelimit import ClientIP
        except ImportError:  # before ClientIP is exported at the top level
            from asgi_ratelimit.extractors import ClientIP

        store: Any = (
            MemoryBackend(prefix=ctx.prefix)
            if backend == "memory"
            else RedisBackend.from_url(ctx.redis_url, prefix=ctx.prefix)
        )
        app = starlette_app() if framework == "starlette" else fastapi_app()
        options = {"algorithm": algorithm or "gcra"}
        rules = [Rule("/", f"{per_minute}/minute", key=ClientIP(), **options)]
        # The peers wait for Redis however long it takes. With the default 50 ms budget a loaded machine
        # (this one is shared) would time some calls out and measure the fail-open path instead of limiting.
        app.add_middleware(RateLimitMiddleware, backend=store, rules=rules, timeout=OURS_TIMEOUT)
        return Built(app, store.aclose)

    return build


OURS_REQUIRES = ("asgi_ratelimit:RateLimitMiddleware", "asgi_ratelimit:Rule", "asgi_ratelimit.extractors:ClientIP")


# -- slowapi: limits on a synchronous redis-py client --------------------------------------------------------


def _slowapi(
    middleware: Literal["SlowAPIMiddleware", "SlowAPIASGIMiddleware"], per_minute: int
) -> Callable[[BuildContext], Built]:
    def build(ctx: BuildContext) -> Built:
        from slowapi import Limiter, _rate_limit_exceeded_handler
        from slowapi import middleware as slowapi_middleware
        from slowapi.errors import RateLimitExceeded
        from slowapi.util import get_remote_address

        limiter = Limiter(
            key_func=get_remote_address,
            default_limits=[f"{per_minute}/minute"],
            storage_uri=ctx.redis_url,
            key_prefix=ctx.prefix,
        )
        app = starlette_app()
        app.state.limiter = limiter
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
        app.add_middleware(getattr(slowapi_middleware, middleware))

        async def aclose() -> None:
            client = getattr(getattr(limiter, "_storage", None), "storage", None)
            if client is not None:
                client.connection_pool.disconnect()

        return Built(app, aclose)

    return build


# -- fastapi-limiter: a pyrate-limiter Limiter per route dependency ------------------------------------------


def _fastapi_limiter(store: Literal["log", "gcra"]) -> Callable[[BuildContext], Built]:
    """fastapi-limiter with Redis storage and one bucket per identifier (client IP + path).

    Its README passes ``Limiter(Rate(...))``, which is one in-memory bucket for every client; for Redis the
    pyrate-limiter docs route items to buckets with a BucketFactory, which is what a deployment keyed by
    client needs. ``store="log"`` is pyrate-limiter's RedisBucket (a sorted-set sliding log),
    ``store="gcra"`` its StateBucket with RedisStateStore (one small hash per key).
    """

    def build(ctx: BuildContext) -> Built:
        from fastapi import Depends
        from fastapi_limiter.depends import RateLimiter
        from pyrate_limiter import (
            GCRA,
            BucketFactory,
            Duration,
            Limiter,
            Rate,
            RateItem,
            RedisBucket,
            RedisStateStore,
            StateBucket,
        )
        from pyrate_limiter.buckets.redis_bucket import LuaScript
        from redis.asyncio import Redis

        redis = Redis.from_url(ctx.redis_url)
        rates = [Rate(OPEN_PER_MINUTE, Duration.MINUTE)]

        class PerIdentifierBuckets(BucketFactory):  # type: ignore[misc]
            def __init__(self) -> None:
                self.buckets: dict[str, Any] = {}
                self.script_hash: str | None = None

            def wrap_item(self, name: str, weight: int = 1) -> Any:
                # Wall-clock milliseconds: the clock of both RedisBucket and RedisStateStore.
                return RateItem(name, time_ns() // 1_000_000, weight=weight)

            def get(self, item: Any) -> Any:
                bucket = self.buckets.get(item.name)
                return bucket if bucket is not None else self._new_bucket(item.name)

            async def _new_bucket(self, name: str) -> Any:
                key = f"{ctx.prefix}{name}"
                if store == "gcra":
                    bucket = self.create(StateBucket, rates, algorithm=GCRA(), store=RedisStateStore(redis, key))
                else:
                    if self.script_hash is None:
                        self.script_hash = await redis.script_load(LuaScript.PUT_ITEM)
                    bucket = self.create(RedisBucket, rates, redis, key, self.script_hash)
                return self.buckets.setdefault(name, bucket)

        factory = PerIdentifierBuckets()
        app = fastapi_app(dependencies=[Depends(RateLimiter(limiter=Limiter(factory)))])

        async def aclose() -> None:
            leaker = factory._leaker
            if leaker is not None and leaker.aio_leak_task is not None:
                leaker.aio_leak_task.cancel()
            factory.close()
            await redis.aclose()

        return Built(app, aclose)

    return build


# -- asgi-ratelimit (PyPI "asgi-ratelimit", import name "ratelimit") -----------------------------------------


async def _peer_client_ip(scope: Any) -> tuple[str, str]:
    # ratelimit.auths.ip.client_ip refuses non-global addresses (127.0.0.1 included), so on loopback a user
    # keys by the socket peer like this; it is also cheaper than the stock function, which favours the peer.
    return scope["client"][0], "default"


def _asgi_ratelimit(per_minute: int) -> Callable[[BuildContext], Built]:
    def build(ctx: BuildContext) -> Built:
        from ratelimit import RateLimitMiddleware, Rule
        from ratelimit.backends.redis import RedisBackend
        from redis.asyncio import Redis

        redis = Redis.from_url(ctx.redis_url)
        app = starlette_app()
        # zone= names the key instead of the path, so every key this config writes starts with the prefix.
        rules = [Rule(minute=per_minute, zone=ctx.prefix.rstrip(":"))]
        app.add_middleware(
            RateLimitMiddleware, authenticate=_peer_client_ip, backend=RedisBackend(redis), config={r"^/$": rules}
        )
        return Built(app, redis.aclose)

    return build


# -- the table ---------------------------------------------------------------------------------------------

CONFIGS: tuple[Config, ...] = (
    Config("bare-starlette", "bare Starlette", "starlette", "bare", _bare("starlette")),
    Config("bare-fastapi", "bare FastAPI", "fastapi", "bare", _bare("fastapi")),
    Config(
        "ours-memory",
        "asgi_ratelimit, MemoryBackend",
        "starlette",
        "ours",
        _ours("memory", OPEN_PER_MINUTE, "starlette"),
        requires=OURS_REQUIRES,
    ),
    Config(
        "ours-redis",
        "asgi_ratelimit, RedisBackend",
        "starlette",
        "ours",
        _ours("redis", OPEN_PER_MINUTE, "starlette"),
        redis=True,
        requires=OURS_REQUIRES,
    ),
    Config(
        "ours-redis-fastapi",
        "asgi_ratelimit, RedisBackend, on FastAPI",
        "fastapi",
        "ours",
        _ours("redis", OPEN_PER_MINUTE, "fastapi"),
        redis=True,
        requires=OURS_REQUIRES,
    ),
    # Like for like: slowapi and asgi-ratelimit count in fixed windows, ours defaults to GCRA.
    Config(
        "ours-redis-fixed",
        "asgi_ratelimit, RedisBackend, fixed window",
        "starlette",
        "ours",
        _ours("redis", OPEN_PER_MINUTE, "starlette", algorithm="fixed_window"),
        redis=True,
        requires=OURS_REQUIRES,
    ),
    Config(
        "slowapi",
        "slowapi (SlowAPIMiddleware)",
        "starlette",
        "peer",
        _slowapi("SlowAPIMiddleware", OPEN_PER_MINUTE),
        redis=True,
        requires=("slowapi.middleware:SlowAPIMiddleware",),
    ),
    Config(
        "slowapi-asgi",
        "slowapi (SlowAPIASGIMiddleware)",
        "starlette",
        "peer",
        _slowapi("SlowAPIASGIMiddleware", OPEN_PER_MINUTE),
        redis=True,
        requires=("slowapi.middleware:SlowAPIASGIMiddleware",),
    ),
    Config(
        "fastapi-limiter",
        "fastapi-limiter (Redis sliding log)",
        "fastapi",
        "peer",
        _fastapi_limiter("log"),
        redis=True,
        requires=("fastapi_limiter.depends:RateLimiter", "pyrate_limiter:RedisBucket"),
    ),
    Config(
        "fastapi-limiter-gcra",
        "fastapi-limiter (Redis GCRA store)",
        "fastapi",
        "peer",
        _fastapi_limiter("gcra"),
        redis=True,
        requires=("fastapi_limiter.depends:RateLimiter", "pyrate_limiter:RedisStateStore"),
    ),
    Config(
        "asgi-ratelimit",
        "asgi-ratelimit (PyPI, Redis)",
        "starlette",
        "peer",
        _asgi_ratelimit(OPEN_PER_MINUTE),
        redis=True,
        requires=("ratelimit:RateLimitMiddleware", "ratelimit.backends.redis:RedisBackend"),
    ),
    # Floods: one key (one client IP) over a limit of 1/minute, so all but the first request are 429.
    Config(
        "ours-flood",
        "asgi_ratelimit, RedisBackend, all 429",
        "starlette",
        "ours",
        _ours("redis", FLOOD_PER_MINUTE, "starlette"),
        redis=True,
        expect=429,
        requires=OURS_REQUIRES,
    ),
    Config(
        "slowapi-asgi-flood",
        "slowapi (SlowAPIASGIMiddleware), all 429",
        "starlette",
        "peer",
        _slowapi("SlowAPIASGIMiddleware", FLOOD_PER_MINUTE),
        redis=True,
        expect=429,
        requires=("slowapi.middleware:SlowAPIASGIMiddleware",),
    ),
    Config(
        "asgi-ratelimit-flood",
        "asgi-ratelimit (PyPI, Redis), all 429",
        "starlette",
        "peer",
        _asgi_ratelimit(FLOOD_PER_MINUTE),
        redis=True,
        expect=429,
        requires=("ratelimit:RateLimitMiddleware", "ratelimit.backends.redis:RedisBackend"),
    ),
)

BY_NAME = {config.name: config for config in CONFIGS}

# Environment variables through which bench_http.py tells the uvicorn subprocess what to build.
ENV_CONFIG = "BENCH_HTTP_CONFIG"
ENV_REDIS_URL = "BENCH_HTTP_REDIS_URL"
ENV_PREFIX = "BENCH_HTTP_PREFIX"


def server_app() -> Any:
    """uvicorn ``--factory`` entry point: build the config named in the environment."""
    config = BY_NAME[os.environ[ENV_CONFIG]]
    return config.build(BuildContext(os.environ[ENV_REDIS_URL], os.environ[ENV_PREFIX])).app
