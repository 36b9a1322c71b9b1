"""The floor of bench_service.py: a bare Starlette POST /check that parses the body and answers JSON, deciding nothing.

It does what any Python service on uvicorn must do for a check (read the body, parse the JSON, build and
send a JSON answer of the same shape), so the service's figures can be set beside it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ANSWER = {"allowed": True, "limit": 1, "remaining": 0, "retry_after": 0.0, "reset_after": 0.0, "never": False}


async def check(request: Request) -> JSONResponse:
    body: Any = json.loads(await request.body())
    if isinstance(body, dict) and "checks" in body:
        return JSONResponse({"allowed": True, "results": [ANSWER for _ in body["checks"]]})
    return JSONResponse(ANSWER)


async def live(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    """The floor app (uvicorn --factory service_floor:create_app)."""
    return Starlette(routes=[Route("/check", check, methods=["POST"]), Route("/health/live", live)])
