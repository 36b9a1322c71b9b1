"""The example API.

- ``POST /login``: 5 attempts a minute per client IP (brute-force protection).
- ``GET /api/...``: limited per API key (the ``X-API-Key`` header; per client IP without one), with the
  tier taken from the ``plan`` claim of a *verified* JWT in ``Authorization: Bearer ...`` (free when
  absent or forged).
- ``POST /ai/complete``: a streamed answer charged by the tokens it used, known only at its end:
  2,000 tokens a minute per API key (per client IP without one); a key that overspends owes the
  difference and is refused until the refill has paid it back.
- Everything: a global ceiling of 1,000 requests a second, shared by all clients.
- ``POST /check``: the decision service, for callers in other languages.
- ``/metrics``, ``/health`` and ``/health/live`` for operators.

Run it with ``python -m example_app`` (in-memory counts), or with ``REDIS_URL`` set to use Redis.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route

from asgi_ratelimit import (
    GCRA,
    ClientIP,
    FirstOf,
    FromState,
    Header,
    JWTClaim,
    MemoryBackend,
    RateLimitMiddleware,
    RedisBackend,
    Rule,
    TokenBucket,
)
from asgi_ratelimit.service import create_app as create_decision_service

# A demo secret: a real deployment reads it from its secret store.
JWT_SECRET = os.environ.get("EXAMPLE_JWT_SECRET", "example-secret-change-me-0123456789abcdef")

# What each plan may do on /api: a sustained rate plus a burst allowance.
TIERS: dict[str, list[Any]] = {
    "free": ["10/minute", GCRA(limit=2, period=1)],
    "pro": ["600/minute", GCRA(limit=20, period=1)],
}

plan_claim = JWTClaim("plan", key=JWT_SECRET, algorithms=["HS256"])


def api_limits(request: Request) -> list[Any]:
    """The limits of the caller's plan; a missing or forged token gets the free tier."""
    plan = plan_claim(request)
    return TIERS.get(plan if isinstance(plan, str) else "free", TIERS["free"])


async def login(request: Request) -> JSONResponse:
    return JSONResponse({"token": "a session token would be here"})


async def items(request: Request) -> JSONResponse:
    return JSONResponse({"items": [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}]})


async def complete(request: Request) -> StreamingResponse:
    """A stand-in for a language model: one token per word of the prompt, echoed back as it streams."""
    prompt = (await request.body()).decode(errors="replace").split()

    async def stream() -> AsyncIterator[bytes]:
        used = 0
        for word in prompt:
            await asyncio.sleep(0)
            used += 1
            yield word.encode() + b" "
        request.state.tokens_used = used  # the real cost, known once the answer is done

    return StreamingResponse(stream(), media_type="text/plain")


async def home(request: Request) -> JSONResponse:
    return JSONResponse({"see": ["/login", "/api/items", "/ai/complete", "/check", "/metrics", "/health"]})


def build_backend() -> Any:
    """Redis when REDIS_URL is set, else in-process counts."""
    url = os.environ.get("REDIS_URL")
    return RedisBackend.from_url(url, prefix="example:") if url else MemoryBackend()


def create_app(backend: Any = None, *, registry: CollectorRegistry | None = None) -> Starlette:
    """The example app, with its rate limits.

    Args:
        backend: where counts live; by default Redis when ``REDIS_URL`` is set, else in memory.
        registry: the Prometheus registry for the metrics (and ``/metrics``); by default the global one.
    """
    backend = build_backend() if backend is None else backend
    # Behind a load balancer, list its addresses (comma-separated) in TRUSTED_PROXIES so that
    # X-Forwarded-For is believed from it only.
    proxies = [entry.strip() for entry in os.environ.get("TRUSTED_PROXIES", "").split(",") if entry.strip()]
    client_ip = ClientIP(trusted_proxies=proxies)
    # A caller without an API key is counted per address, at the free tier, instead of escaping the rule.
    # (API keys here are whatever the client sends: a real service rejects unknown ones before this point.)
    api_key = FirstOf(Header("X-API-Key"), client_ip)
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/login", login, methods=["POST"]),
            Route("/api/items", items),
            Route("/ai/complete", complete, methods=["POST"]),
            Mount("/", app=create_decision_service(backend)),
        ]
    )
    app.add_middleware(
        RateLimitMiddleware,
        backend=backend,
        rules=[
            # Brute-force protection wants the exact count: at most 5 in any 60 s (the log holds 5 entries a client).
            Rule("/login", "5/minute", key=client_ip, methods=["POST"], name="login", algorithm="sliding_window"),
            Rule("/api/{path:path}", api_limits, key=api_key, name="api"),
            Rule(
                "/ai/complete",
                TokenBucket(capacity=2000, refill_rate=2000 / 60),
                key=api_key,
                charge=FromState("tokens_used"),
                name="ai-tokens",
            ),
            Rule(
                "/{path:path}", TokenBucket(capacity=1000, refill_rate=1000), key=lambda request: "all", name="global"
            ),
        ],
        metrics_path="/metrics",
        health_path="/health",
        registry=registry,
    )
    return app


app = create_app()
