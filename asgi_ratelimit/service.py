"""The decision service: the engine over HTTP (``POST /check``), for callers in any language.

``create_app(backend)`` builds it; the module-level ``app`` runs on MemoryBackend.  Input is
checked field by field: a bad request gets a 400 or 422 problem+json naming the field, and
never reaches the backend, so it can never change a counter.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .backends.base import Backend
from .backends.memory import MemoryBackend
from .errors import BackendError, ConfigurationError
from .headers import policy_item, rate_limit_headers, sf_string
from .limiter import Limiter
from .policies import GCRA, FixedWindow, Policy, SlidingWindow, SlidingWindowCounter, TokenBucket

__all__ = ["MAX_BODY_BYTES", "MAX_KEY_BYTES", "app", "create_app", "parse_check"]

MAX_BODY_BYTES = 64 * 1024
MAX_KEY_BYTES = 1024

# For each algorithm: its policy class and its parameters with their JSON types.
_INT = "integer"
_NUM = "number"
ALGORITHM_FIELDS: dict[str, tuple[type[Policy], dict[str, str], tuple[str, ...]]] = {
    # name: (class, {field: type}, optional fields)
    "token_bucket": (TokenBucket, {"capacity": _INT, "refill_rate": _NUM}, ()),
    "sliding_window": (SlidingWindow, {"limit": _INT, "window": _NUM}, ()),
    "fixed_window": (FixedWindow, {"limit": _INT, "window": _NUM}, ()),
    "sliding_window_counter": (SlidingWindowCounter, {"limit": _INT, "window": _NUM}, ()),
    "gcra": (GCRA, {"limit": _INT, "period": _NUM, "burst": _INT}, ("burst",)),
}
_COMMON = {"key", "algorithm", "cost"}


class BadRequest(Exception):
    """A request the service refuses, with the status and the field at fault."""

    def __init__(self, status: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field


def _problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type="application/problem+json")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def parse_check(payload: object) -> tuple[str, Policy, int]:
    """Validate a /check body and return (key, policy, cost); raise BadRequest naming the field."""
    if not isinstance(payload, Mapping):
        raise BadRequest(422, "The body must be a JSON object.")
    algorithm = payload.get("algorithm")
    if "algorithm" not in payload:
        raise BadRequest(422, 'The field "algorithm" is required.', "algorithm")
    if not isinstance(algorithm, str) or algorithm not in ALGORITHM_FIELDS:
        raise BadRequest(
            422,
            f'The field "algorithm" must be one of {", ".join(sorted(ALGORITHM_FIELDS))}; got {algorithm!r}.',
            "algorithm",
        )
    cls, fields, optional = ALGORITHM_FIELDS[algorithm]
    unknown = sorted(set(payload) - _COMMON - set(fields))
    if unknown:
        raise BadRequest(422, f'Unknown field "{unknown[0]}" for algorithm "{algorithm}".', unknown[0])
    key = payload.get("key")
    if "key" not in payload:
        raise BadRequest(422, 'The field "key" is required.', "key")
    if not isinstance(key, str) or not key:
        raise BadRequest(422, 'The field "key" must be a non-empty string.', "key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(422, f'The field "key" must be at most {MAX_KEY_BYTES} bytes.', "key")
    cost = payload.get("cost", 1)
    if not _is_int(cost) or cost < 1:
        raise BadRequest(422, f'The field "cost" must be a whole number of at least 1; got {cost!r}.', "cost")
    arguments: dict[str, Any] = {}
    for name, kind in fields.items():
        if name not in payload:
            if name in optional:
                continue
            raise BadRequest(422, f'The field "{name}" is required for algorithm "{algorithm}".', name)
        value = payload[name]
        valid = _is_int(value) if kind == _INT else _is_number(value)
        if not valid:
            expected = "a whole number" if kind == _INT else "a number"
            raise BadRequest(422, f'The field "{name}" must be {expected}; got {value!r}.', name)
        if value <= 0:
            raise BadRequest(422, f'The field "{name}" must be above zero; got {value!r}.', name)
        arguments[name] = value
    try:
        policy = cls(**arguments)
    except ConfigurationError as exc:
        raise BadRequest(422, str(exc), next(iter(arguments), None)) from None
    return key, policy, cost


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(400, f"The body must be at most {MAX_BODY_BYTES} bytes.")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(400, f"The body must be at most {MAX_BODY_BYTES} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(backend: Backend | None = None, *, timeout: float = 0.05) -> Starlette:
    """Build the decision service on ``backend`` (MemoryBackend when None).

    Args:
        backend: where counts live.
        timeout: seconds a decision may take before the service answers 503.
    """
    store: Backend = MemoryBackend() if backend is None else backend
    limiter = Limiter(store, timeout=timeout)

    async def check(request: Request) -> Response:
        try:
            raw = await _read_body(request)
            try:
                payload = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise BadRequest(400, "The body must be valid JSON.") from None
            key, policy, cost = parse_check(payload)
        except BadRequest as exc:
            extra = {} if exc.field is None else {"field": exc.field}
            title = "Bad Request" if exc.status == 400 else "Unprocessable Content"
            return _problem(exc.status, title, exc.detail, **extra)
        try:
            (decision,) = await limiter.decide([(key, policy, cost)])
        except BackendError:
            return _problem(503, "Service Unavailable", "The rate-limit backend did not answer.", retry_after=1)
        name = policy.algorithm
        headers = rate_limit_headers(
            [decision],
            [policy_item(name, policy.quota, policy.window_seconds)],
            [sf_string(name)],
            "ietf",
            denied=not decision.allowed,
        )
        body = {
            "allowed": decision.allowed,
            "limit": decision.limit,
            "remaining": decision.remaining,
            # JSON has no infinity: a hit that can never pass says so with null and "never".
            "retry_after": None if decision.never else decision.retry_after,
            "reset_after": decision.reset_after,
            "never": decision.never,
        }
        response = JSONResponse(body)
        for header, value in headers:
            response.headers[header.decode()] = value.decode()
        return response

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document())

    service = Starlette(
        routes=[
            Route("/check", check, methods=["POST"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ]
    )
    service.state.backend = store
    service.state.limiter = limiter
    return service


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service."""
    variants = []
    for algorithm, (_, fields, optional) in ALGORITHM_FIELDS.items():
        properties: dict[str, Any] = {
            "key": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_BYTES},
            "algorithm": {"const": algorithm},
            "cost": {"type": "integer", "minimum": 1, "default": 1},
        }
        for name, kind in fields.items():
            properties[name] = {"type": kind, "exclusiveMinimum": 0}
        required = ["key", "algorithm", *(name for name in fields if name not in optional)]
        variants.append(
            {
                "title": algorithm,
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            }
        )
    problem = {"$ref": "#/components/schemas/Problem"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "asgi_ratelimit decision service", "version": "1"},
        "paths": {
            "/check": {
                "post": {
                    "summary": "Take cost units from a key's allowance, or say when it can.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"oneOf": variants}}},
                    },
                    "responses": {
                        "200": {
                            "description": "The decision (allowed or not).",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Decision"}}},
                        },
                        "400": {
                            "description": "Not JSON, or too large.",
                            "content": {"application/problem+json": {"schema": problem}},
                        },
                        "422": {
                            "description": "A field is missing or invalid.",
                            "content": {"application/problem+json": {"schema": problem}},
                        },
                        "503": {
                            "description": "The backend did not answer.",
                            "content": {"application/problem+json": {"schema": problem}},
                        },
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Decision": {
                    "type": "object",
                    "required": ["allowed", "limit", "remaining", "retry_after", "reset_after", "never"],
                    "properties": {
                        "allowed": {"type": "boolean"},
                        "limit": {"type": "integer"},
                        "remaining": {"type": "integer", "minimum": 0},
                        "retry_after": {"type": ["number", "null"], "minimum": 0},
                        "reset_after": {"type": "number", "minimum": 0},
                        "never": {"type": "boolean"},
                    },
                },
                "Problem": {
                    "type": "object",
                    "required": ["type", "title", "status", "detail"],
                    "properties": {
                        "type": {"type": "string"},
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                        "field": {"type": "string"},
                    },
                },
            }
        },
    }


app = create_app()
