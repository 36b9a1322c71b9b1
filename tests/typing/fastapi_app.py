"""A small typed FastAPI app on the public API, for mypy --strict (nox -s typecheck runs it; pytest does not).

Each ``assert_type`` fails the check if a type is lost on the way, an ``Any`` included: the decorated endpoints
keep their parameters and return types, so IDEs and mypy see them unchanged.  The ``type: ignore`` comments mark
calls that must stay errors: mypy --strict reports an ignore that is no longer needed, so a decorator that turned
the endpoint into ``Any`` would fail here too.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse
from typing_extensions import assert_type

from asgi_ratelimit import Decision, Policy, RateLimitMiddleware, Rule, parse_limits, rate_limit
from asgi_ratelimit.fastapi import RateLimit, RateLimitExceeded, document_rate_limits


def current_user(authorization: str | None = Header(default=None)) -> str | None:
    return authorization.removeprefix("User ") if authorization else None


def user_key(user: str | None = Depends(current_user)) -> str | None:
    return None if user is None else f"user:{user}"


def plan_limits(user: str | None = Depends(current_user)) -> str:
    return "100/minute" if user else "10/minute"


per_user = RateLimit("1000/day", key=user_key)
assert_type(per_user, RateLimit)
tiered = RateLimit(plan_limits, key=user_key, name="tiered", fail_open=False)

app = FastAPI(dependencies=[Depends(RateLimit("100/second", name="app-wide"))])


@app.get("/items/{item_id}", dependencies=[Depends(per_user)])
@rate_limit("10/second;100/hour")
async def read_item(item_id: int, q: str | None = None) -> dict[str, int | str | None]:
    return {"item_id": item_id, "q": q}


@app.get("/health")
@rate_limit("1/second", name="health")
def health() -> str:
    return "ok"


@app.get("/plans", dependencies=[Depends(tiered)])
async def plans() -> list[str]:
    return ["free", "pro"]


@app.exception_handler(RateLimitExceeded)
async def slow_down(request: Request, exc: RateLimitExceeded) -> JSONResponse:
    assert_type(exc.retry_after, int)
    assert_type(exc.decisions, tuple[Decision, ...])
    return JSONResponse({"retry_after": exc.retry_after}, status_code=exc.status_code, headers=exc.headers)


app.add_middleware(RateLimitMiddleware, rules=[Rule("/{path:path}", "50/second", name="per-ip")])
document_rate_limits(app)

limits = parse_limits("10/second;1000/month")
assert_type(limits, tuple[Policy, ...])


async def call_the_endpoints() -> None:
    item = await read_item(1, q="x")
    assert_type(item, dict[str, int | str | None])
    assert_type(health(), str)
    assert_type(await plans(), list[str])
    await read_item("one")  # type: ignore[arg-type]  # the decorated endpoint still checks its arguments
    health(1)  # type: ignore[call-arg]
