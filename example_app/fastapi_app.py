"""The example API as a FastAPI app: middleware rules for the IP limits, a dependency for the per-user ones.

- ``POST /login``: 5 attempts a minute per client IP (a middleware Rule: it needs no user).
- Everything: 120 requests a minute per client IP (a middleware Rule).
- ``GET /api/items``: per signed-in user, at the tier of their plan (the ``sub`` and ``plan`` claims of a
  *verified* JWT in ``Authorization: Bearer ...``): a ``RateLimit`` dependency keyed on the user that the
  ``current_user`` dependency resolved, which a middleware cannot see.  Anonymous callers get a 401.
- ``/docs``: the OpenAPI document lists the 429 of every limited operation.
- ``/metrics``, ``/health`` and ``/health/live`` for operators.

Run it with ``python -m example_app --fastapi`` (in-memory counts), or with ``REDIS_URL`` set to use Redis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any

import jwt
from fastapi import Depends, FastAPI, HTTPException
from fastapi import Header as HeaderParam
from prometheus_client import CollectorRegistry

from asgi_ratelimit import ClientIP, RateLimitMiddleware, Rule
from asgi_ratelimit.fastapi import RateLimit, document_rate_limits
from example_app.app import JWT_SECRET, build_backend

# What each plan may do on /api, per user.
PLAN_LIMITS = {"free": "3/minute;20/day", "pro": "10/second;1000/hour"}


@dataclass(frozen=True)
class User:
    """The caller a verified token names."""

    id: str
    plan: str


def current_user(authorization: Annotated[str | None, HeaderParam()] = None) -> User | None:
    """The user of a valid ``Bearer`` token, None without one; a forged or expired token is a 401."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    try:
        claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"]) if scheme.lower() == "bearer" else None
    except jwt.InvalidTokenError:
        claims = None
    if not isinstance(claims, dict) or not isinstance(claims.get("sub"), str):
        raise HTTPException(401, "Invalid token.", headers={"WWW-Authenticate": "Bearer"})
    plan = claims.get("plan")
    return User(id=claims["sub"], plan=plan if plan in PLAN_LIMITS else "free")


def signed_in(user: Annotated[User | None, Depends(current_user)]) -> User:
    """The routes that need a user: 401 for an anonymous caller."""
    if user is None:
        raise HTTPException(401, "Sign in first.", headers={"WWW-Authenticate": "Bearer"})
    return user


def user_key(user: Annotated[User | None, Depends(current_user)]) -> str | None:
    """The per-user limit's key (FastAPI resolves current_user once per request for both)."""
    return None if user is None else user.id


def plan_limits(user: Annotated[User | None, Depends(current_user)]) -> str:
    """The limits of the caller's plan."""
    return PLAN_LIMITS["free" if user is None else user.plan]


per_user = RateLimit(plan_limits, key=user_key, name="per-user")


def create_app(backend: Any = None, *, registry: CollectorRegistry | None = None) -> FastAPI:
    """The FastAPI example app, with its rate limits.

    Args:
        backend: where counts live; by default Redis when ``REDIS_URL`` is set, else in memory.
        registry: the Prometheus registry for the metrics (and ``/metrics``); by default the global one.
    """
    backend = build_backend() if backend is None else backend
    app = FastAPI(title="asgi_ratelimit example (FastAPI)")

    @app.get("/")
    async def home() -> dict[str, list[str]]:
        return {"see": ["/login", "/api/items", "/docs", "/metrics", "/health"]}

    @app.post("/login")
    async def login() -> dict[str, str]:
        return {"token": "a session token would be here"}

    @app.get("/api/items", dependencies=[Depends(per_user)])
    async def items(user: Annotated[User, Depends(signed_in)]) -> dict[str, Any]:
        """The caller's items."""
        return {"user": user.id, "plan": user.plan, "items": [{"id": 1, "name": "widget"}]}

    proxies = [entry.strip() for entry in os.environ.get("TRUSTED_PROXIES", "").split(",") if entry.strip()]
    client_ip = ClientIP(trusted_proxies=proxies)
    app.add_middleware(
        RateLimitMiddleware,
        backend=backend,
        rules=[
            # Brute-force protection wants the exact count: at most 5 in any 60 s (the log holds 5 entries a client).
            Rule("/login", "5/minute", key=client_ip, methods=["POST"], name="login", algorithm="sliding_window"),
            Rule("/{path:path}", "120/minute", key=client_ip, name="per-ip"),
        ],
        metrics_path="/metrics",
        health_path="/health",
        registry=registry,
    )
    document_rate_limits(app)
    return app


app = create_app()
