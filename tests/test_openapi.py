"""document_rate_limits: every limited operation lists its 429, and the document stays valid OpenAPI."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import free_port
from fastapi import APIRouter, Depends, FastAPI
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from test_fastapi import current_user_id, tier
from test_uvicorn import serve

from asgi_ratelimit import Concurrency, Header, MemoryBackend, RateLimitMiddleware, Rule, rate_limit
from asgi_ratelimit.fastapi import RateLimit, document_rate_limits


def build_app(headers: str = "ietf") -> FastAPI:
    app = FastAPI(dependencies=[Depends(RateLimit("1000/day", key=Header("x-client"), name="app-wide"))])

    @app.get("/me", dependencies=[Depends(RateLimit("2/minute;100/hour", key=current_user_id))])
    async def me() -> dict[str, str]:
        """Who you are."""
        return {"user": "me"}

    @app.get("/tiered", dependencies=[Depends(RateLimit(tier, key=current_user_id))])
    async def tiered() -> dict[str, str]:
        return {}

    @app.post("/login")
    async def login() -> dict[str, str]:
        return {}

    @app.get("/login")
    async def login_page() -> dict[str, str]:
        return {}

    @app.get("/reports/{id}")
    @rate_limit("30/hour", name="reports")
    async def report(id: int, request: Request) -> dict[str, int]:
        return {"id": id}

    router = APIRouter(prefix="/admin", dependencies=[Depends(RateLimit("5/minute"))])

    @router.delete("/cache")
    async def clear_cache() -> dict[str, str]:
        return {}

    app.include_router(router)

    @app.get("/hidden", include_in_schema=False)
    async def hidden() -> dict[str, str]:
        return {}

    app.add_middleware(
        RateLimitMiddleware,
        backend=MemoryBackend(),
        registry=CollectorRegistry(),
        headers=headers,
        rules=[
            Rule("/login", ["5/minute", Concurrency(2, timeout=30)], methods=["POST"], name="login"),
            Rule("/reports/{id}", "10/minute", name="report-pages"),
        ],
    )
    document_rate_limits(app)
    return app


def operation(schema: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = schema["paths"][path][method]
    return found


def test_the_document_is_valid_openapi_with_the_429s() -> None:
    schema = build_app().openapi()
    validate(schema)  # raises on an invalid document
    for path, method in [("/me", "get"), ("/tiered", "get"), ("/login", "post"), ("/reports/{id}", "get")]:
        response = operation(schema, path, method)["responses"]["429"]
        assert set(response["headers"]) == {"Retry-After", "RateLimit", "RateLimit-Policy"}
        assert response["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 0}
    problem = schema["components"]["schemas"]["RateLimitProblem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail", "retry_after", "violated-policies"}
    assert schema["components"]["schemas"]["RateLimitExceeded"]["required"] == ["detail"]


def test_each_operation_names_its_limits_and_the_bodies_it_may_get() -> None:
    schema = build_app().openapi()
    me = operation(schema, "/me", "get")
    assert me["description"].startswith("Who you are.\n\n**Rate limits**")
    assert "- `app-wide`: 1000 per 1 day" in me["description"]
    assert "- `/me`: 2 per 1 minute, 100 per 1 hour" in me["description"]
    # Only a dependency limits it: FastAPI's {"detail"} body, not the middleware's problem+json.
    assert set(me["responses"]["429"]["content"]) == {"application/json"}
    assert "- `/tiered`: chosen per request by `tier`" in operation(schema, "/tiered", "get")["description"]
    login = operation(schema, "/login", "post")
    assert "- `login`: 5 per 1 minute, 2 at a time" in login["description"]
    assert set(login["responses"]["429"]["content"]) == {"application/problem+json", "application/json"}
    report = operation(schema, "/reports/{id}", "get")["description"]
    assert "- `report-pages`: 10 per 1 minute" in report and "- `reports`: 30 per 1 hour" in report
    assert "- `/admin/cache`: 5 per 1 minute" in operation(schema, "/admin/cache", "delete")["description"]
    # The GET /login route is limited only by the app-wide dependency: the POST-only rule is not listed.
    assert "`login`" not in operation(schema, "/login", "get")["description"]


def test_an_unlimited_operation_gets_no_429() -> None:
    app = FastAPI()

    @app.get("/free")
    async def free() -> dict[str, str]:
        return {}

    @app.get("/limited", dependencies=[Depends(RateLimit("1/second"))])
    async def limited() -> dict[str, str]:
        return {}

    app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), registry=CollectorRegistry())
    document_rate_limits(app)
    schema = app.openapi()
    validate(schema)
    assert "429" not in operation(schema, "/free", "get")["responses"]
    assert "description" not in operation(schema, "/free", "get")
    assert "RateLimitProblem" not in schema["components"]["schemas"]
    assert app.openapi() is schema  # built once, documented once
    assert operation(schema, "/limited", "get")["description"].count("**Rate limits**") == 1


@pytest.mark.parametrize(
    ("mode", "headers"),
    [
        ("legacy", {"Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}),
        ("none", {"Retry-After"}),
    ],
)
def test_the_headers_follow_the_middlewares_header_mode(mode: str, headers: set[str]) -> None:
    schema = build_app(headers=mode).openapi()
    validate(schema)
    assert set(operation(schema, "/me", "get")["responses"]["429"]["headers"]) == headers


def test_served_over_real_http() -> None:
    with serve(build_app()) as base, httpx.Client(base_url=base) as client:
        schema = client.get("/openapi.json").json()
        docs = client.get("/docs")
    validate(schema)
    assert "429" in schema["paths"]["/me"]["get"]["responses"]
    assert docs.status_code == 200
    assert free_port()  # the server is gone: its port is free again or another one is


async def test_the_bodies_sent_match_the_schemas_documented() -> None:
    """The 429s a client gets, from the middleware and from the dependency, validate against the document."""
    app = build_app()
    components = app.openapi()["components"]["schemas"]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        logins = [await client.post("/login", headers={"x-client": "c"}) for _ in range(6)]
        mine = [await client.get("/me", headers={"authorization": "User ann"}) for _ in range(3)]
    assert logins[5].status_code == 429 and mine[2].status_code == 429
    assert logins[5].headers["content-type"] == "application/problem+json"
    OAS31Validator(components["RateLimitProblem"]).validate(logins[5].json())
    assert mine[2].headers["content-type"] == "application/json"
    OAS31Validator(components["RateLimitExceeded"]).validate(mine[2].json())
    # The check can fail: FastAPI's body is not the middleware's problem.
    assert not OAS31Validator(components["RateLimitProblem"]).is_valid(mine[2].json())
