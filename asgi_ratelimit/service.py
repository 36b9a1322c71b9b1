"""The decision service: the engine over HTTP (``POST /check``), for callers in any language.

``create_app(backend)`` builds it; importing this module builds nothing.  Input is
checked field by field: a bad request gets a 400 or 422 problem+json naming the field, and
never reaches the backend, so it can never change a counter.  ``/health``, ``/health/live``
and ``/metrics`` are the operations routes of health.py; ``/openapi.json`` describes it all.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ._headers import policy_item, rate_limit_headers, sf_string
from ._keys import digest
from ._limiter import Limiter, Span
from .backends.base import Backend, Hit
from .backends.memory import MemoryBackend
from .backends.redis import RedisBackend
from .errors import BackendError, ConfigurationError
from .health import OperationsApp
from .policies import (
    _MAX_COUNT,
    _MAX_WINDOW_US,
    _MIN_WINDOW_US,
    GCRA,
    MICROS,
    Decision,
    FixedWindow,
    Policy,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
)
from .rules import IDENTITY_SEPARATOR

logger = logging.getLogger("asgi_ratelimit")

__all__ = ["create_app", "from_environment"]

MAX_BODY_BYTES: Final = 64 * 1024
#: The most checks one batch may hold.
MAX_BATCH: Final = 100
MAX_KEY_BYTES: Final = 1024
#: The largest cost a hit may take; a cost above the policy's capacity is a "never" decision.
MAX_COST: Final = _MAX_COUNT

#: The largest sliding_window limit the service takes: the exact log keeps one entry per admitted
#: unit (about 140 bytes each in Redis), so a client could otherwise make one request write 10**9 of
#: them.  Larger limits belong to sliding_window_counter or gcra, which keep O(1) state per key.
MAX_SLIDING_WINDOW_LIMIT: Final = 10_000

_INT = "integer"
_NUM = "number"
_MIN_SECONDS = _MIN_WINDOW_US / MICROS
_MAX_SECONDS = _MAX_WINDOW_US // MICROS
# The JSON Schema bounds of each kind of parameter (the policies hold the same bounds).
_Bounds = dict[str, float]
_COUNT_BOUNDS: _Bounds = {"minimum": 1, "maximum": _MAX_COUNT}
_SECONDS_BOUNDS: _Bounds = {"minimum": _MIN_SECONDS, "maximum": _MAX_SECONDS}
_RATE_BOUNDS: _Bounds = {"minimum": 0.000001, "maximum": _MAX_COUNT}


@dataclass(frozen=True)
class _Algorithm:
    """What /check accepts for one algorithm."""

    cls: type[Policy]
    fields: dict[str, str]  # parameter -> JSON type, in the policy's argument order
    bounds: dict[str, _Bounds]
    optional: tuple[str, ...]
    # Values of the parameters under which any one of them, alone within its bounds, builds a
    # valid policy: swapping the request's values in one at a time finds the field at fault.  A
    # bound that two fields break together is blamed on the later one: refill_rate when a bucket
    # would take longer than the longest window to refill, burst when GCRA's tolerance is too long.
    lenient: dict[str, float]


_WINDOW_FIELDS = {"limit": _INT, "window": _NUM}
_WINDOW_BOUNDS: dict[str, _Bounds] = {"limit": _COUNT_BOUNDS, "window": _SECONDS_BOUNDS}
_LOG_BOUNDS: dict[str, _Bounds] = {**_WINDOW_BOUNDS, "limit": {"minimum": 1, "maximum": MAX_SLIDING_WINDOW_LIMIT}}
ALGORITHMS: Final[dict[str, _Algorithm]] = {
    "token_bucket": _Algorithm(
        TokenBucket,
        {"capacity": _INT, "refill_rate": _NUM},
        {"capacity": _COUNT_BOUNDS, "refill_rate": _RATE_BOUNDS},
        (),
        {"capacity": 1, "refill_rate": _MAX_COUNT},
    ),
    "sliding_window": _Algorithm(SlidingWindow, _WINDOW_FIELDS, _LOG_BOUNDS, (), {"limit": 1, "window": 1}),
    "fixed_window": _Algorithm(FixedWindow, _WINDOW_FIELDS, _WINDOW_BOUNDS, (), {"limit": 1, "window": 1}),
    "sliding_window_counter": _Algorithm(
        SlidingWindowCounter, _WINDOW_FIELDS, _WINDOW_BOUNDS, (), {"limit": 1, "window": 1}
    ),
    "gcra": _Algorithm(
        GCRA,
        {"limit": _INT, "period": _NUM, "burst": _INT},
        {"limit": _COUNT_BOUNDS, "period": _SECONDS_BOUNDS, "burst": _COUNT_BOUNDS},
        ("burst",),
        {"limit": _MAX_COUNT, "period": _MIN_SECONDS, "burst": 1},
    ),
}
_COMMON = ("key", "algorithm", "cost")
_HINTS = {
    ("sliding_window", "limit"): " (the exact log keeps an entry per hit: use sliding_window_counter or gcra above it)"
}


class BadRequest(Exception):
    """A request the service refuses, with the status, the field at fault and, in a batch, the check's index."""

    def __init__(self, status: int, detail: str, field: str | None = None, index: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.field = field
        self.index = index


def _problem(
    status: int,
    detail: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    index: int | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    body["detail"] = detail
    if field is not None:
        body["field"] = field
    if index is not None:
        body["index"] = index
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # An int is always finite (math.isfinite would overflow on a huge one); a float must be.
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _offending_field(spec: _Algorithm, arguments: dict[str, Any]) -> str:
    """The parameter that makes ``spec.cls(**arguments)`` raise ConfigurationError."""
    trial = {name: spec.lenient[name] for name in arguments}
    for name, value in arguments.items():
        trial[name] = value
        try:
            spec.cls(**trial)
        except ConfigurationError:
            return name
    return list(arguments)[-1]  # not reached: the last trial is ``arguments`` itself


def parse_check(payload: object) -> tuple[str, Policy, int]:
    """Validate a /check body and return (key, policy, cost); raise BadRequest naming the field."""
    if not isinstance(payload, Mapping):
        raise BadRequest(422, f"The body must be a JSON object, got a JSON {_json_kind(payload)}.")
    if "algorithm" not in payload:
        raise BadRequest(422, 'The field "algorithm" is required.', "algorithm")
    algorithm = payload["algorithm"]
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise BadRequest(
            422,
            f'The field "algorithm" must be one of {", ".join(ALGORITHMS)}; got {_show(algorithm)}.',
            "algorithm",
        )
    spec = ALGORITHMS[algorithm]
    unknown = sorted(name for name in payload if name not in _COMMON and name not in spec.fields)
    if unknown:
        allowed = ", ".join(f'"{name}"' for name in (*_COMMON, *spec.fields))
        field = _echo(unknown[0])
        raise BadRequest(422, f'Unknown field "{field}" for algorithm "{algorithm}": expected {allowed}.', field)
    if "key" not in payload:
        raise BadRequest(422, 'The field "key" is required.', "key")
    key = payload["key"]
    if not isinstance(key, str) or not key:
        raise BadRequest(422, f'The field "key" must be a non-empty string; got {_show(key)}.', "key")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise BadRequest(422, f'The field "key" must be at most {MAX_KEY_BYTES} bytes in UTF-8.', "key")
    if IDENTITY_SEPARATOR in key:
        # The middleware counts a rule's key as "<rule name>\x1f<key>": without this character a caller
        # cannot name (spend or reset) the counts of a middleware sharing the service's backend.
        raise BadRequest(422, 'The field "key" must not contain the control character U+001F.', "key")
    cost = payload.get("cost", 1)
    if not _is_int(cost) or not 1 <= cost <= MAX_COST:
        raise BadRequest(
            422, f'The field "cost" must be a whole number from 1 to {MAX_COST:,}; got {_show(cost)}.', "cost"
        )
    arguments: dict[str, Any] = {}
    for name, kind in spec.fields.items():
        if name not in payload:
            if name in spec.optional:
                continue
            raise BadRequest(422, f'The field "{name}" is required for algorithm "{algorithm}".', name)
        value = payload[name]
        if not (_is_int(value) if kind == _INT else _is_number(value)):
            expected = "a whole number (10, not 10.0)" if kind == _INT else "a finite number"
            raise BadRequest(422, f'The field "{name}" must be {expected}; got {_show(value)}.', name)
        if value <= 0:
            raise BadRequest(422, f'The field "{name}" must be above zero; got {_show(value)}.', name)
        highest = spec.bounds[name]["maximum"]
        if value > highest:
            # Checked here too: the policies' float checks overflow on an integer past a double's range.
            hint = _HINTS.get((algorithm, name), "")
            raise BadRequest(422, f'The field "{name}" must be at most {highest:,}{hint}; got {_show(value)}.', name)
        arguments[name] = value
    # Callers send the same few policies over and over: building one (its checks, its key suffix) costs
    # more than deciding the hit, so the valid ones are remembered.  Types are part of the signature:
    # 60 and 60.0 build equal policies, but a cached one is never shared across types by accident.
    signature = (algorithm, *((name, value.__class__, value) for name, value in arguments.items()))
    policy = _POLICIES.get(signature)
    if policy is None:
        try:
            policy = spec.cls(**arguments)
        except ConfigurationError as exc:
            field = _offending_field(spec, arguments)
            raise BadRequest(422, f'The field "{field}" is out of range: {exc}', field) from None
        if len(_POLICIES) >= _POLICIES_KEPT:
            _POLICIES.clear()
        _POLICIES[signature] = policy
    return key, policy, cost


_POLICIES_KEPT = 4096
_POLICIES: dict[tuple[Any, ...], Policy] = {}


def parse_checks(payload: object) -> tuple[list[Hit], bool]:
    """Validate a /check body, one check or a batch ``{"checks": [...]}``: its hits, and whether it is a batch.

    A bad check in a batch raises BadRequest naming its index, in ``index`` and as the field's
    prefix (``checks[2].window``): the whole batch is refused, and nothing is counted.
    """
    if not isinstance(payload, Mapping) or "checks" not in payload:
        return [parse_check(payload)], False
    extra = sorted(name for name in payload if name != "checks")
    if extra:
        field = _echo(extra[0])
        raise BadRequest(422, f'A batch holds only the field "checks"; got "{field}" too.', field)
    checks = payload["checks"]
    if not isinstance(checks, list) or not 1 <= len(checks) <= MAX_BATCH:
        got = f"{len(checks)} checks" if isinstance(checks, list) else f"a JSON {_json_kind(checks)}"
        raise BadRequest(422, f'The field "checks" must be an array of 1 to {MAX_BATCH} checks; got {got}.', "checks")
    hits: list[Hit] = []
    first_of: dict[tuple[str, str], int] = {}
    logged = 0  # units the batch would add to sliding-window logs
    for index, check in enumerate(checks):
        where = f"checks[{index}]"
        try:
            key, policy, cost = parse_check(check)
        except BadRequest as exc:
            field = where if exc.field is None else f"{where}.{exc.field}"
            raise BadRequest(exc.status, f"{where}: {exc.detail}", field, index) from None
        # The backends decide a hit on the state before it, so one state taken from twice in one
        # batch would be decided on a count that leaves out the other take.
        earlier = first_of.setdefault((key, policy.key_suffix), index)
        if earlier != index:
            raise BadRequest(
                422,
                f"{where}: the same key and policy as checks[{earlier}]; a batch takes from each once "
                "(add the costs up in one check).",
                where,
                index,
            )
        if policy.algorithm == "sliding_window":
            logged += min(cost, policy.quota)  # a cost above the limit is never taken: it writes nothing
            if logged > MAX_SLIDING_WINDOW_LIMIT:
                raise BadRequest(
                    422,
                    f'{where}: the field "cost" takes the batch\'s sliding_window costs past '
                    f"{MAX_SLIDING_WINDOW_LIMIT:,} in all (the log keeps an entry per unit).",
                    f"{where}.cost",
                    index,
                )
        hits.append((key, policy, cost))
    return hits, True


def parse_reset(payload: object) -> tuple[str, Policy]:
    """Validate a /reset body (a check without a cost) and return (key, policy); raise BadRequest naming the field."""
    if isinstance(payload, Mapping) and "checks" in payload:
        raise BadRequest(422, 'A reset clears one key under one policy: /reset takes no "checks" batch.', "checks")
    if isinstance(payload, Mapping) and "cost" in payload:
        raise BadRequest(422, 'A reset takes no field "cost": it clears the key\'s state whatever was taken.', "cost")
    key, policy, _ = parse_check(payload)
    return key, policy


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _echo(name: str) -> str:
    """A client's field name fit to send back: valid UTF-8 (a lone surrogate escaped), at most 64 characters."""
    safe = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return safe if len(safe) <= 64 else safe[:61] + "..."


def _show(value: object) -> str:
    """A value for an error message: JSON, cut short (a 64 KiB value must not come back whole)."""
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _reject_constant(name: str) -> object:
    # Python's json reads NaN and Infinity, which are not JSON.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


async def _read_json(request: Request) -> object:
    too_large = BadRequest(400, f"The body must be at most {MAX_BODY_BYTES:,} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    # The messages read one by one (Request.stream() costs an async generator per request).
    chunks = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise BadRequest(400, "The client went away before sending the whole body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        # What json.loads(body, parse_constant=...) does, on a decoder built once rather than per request.
        return _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        raise BadRequest(400, "The body is nested too deeply.") from None
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadRequest(400, "The body must be valid JSON (UTF-8).") from None


@dataclass(frozen=True)
class _HeaderParts:
    """A policy's RateLimit header parts, formatted once (_headers.py formats the state per decision)."""

    items: list[str]  # its RateLimit-Policy item
    names: list[str]  # its name as an RFC 9651 String
    policy_header: bytes  # the RateLimit-Policy value, encoded


def _header_parts(policy: Policy) -> _HeaderParts:
    name = policy.algorithm
    item = policy_item(name, policy.quota, policy.window_seconds)
    return _HeaderParts([item], [sf_string(name)], item.encode("ascii"))


def _decision_body(decision: Decision) -> dict[str, Any]:
    return {
        "allowed": decision.allowed,
        "limit": decision.limit,
        "remaining": decision.remaining,
        # JSON has no infinity: a hit that can never pass says so with null and "never".
        "retry_after": None if decision.never else decision.retry_after,
        "reset_after": decision.reset_after,
        "never": decision.never,
    }


def _rule_name(algorithm: str) -> str:
    """The metrics' rule label for a decision: one per algorithm, never the key."""
    return f"service:{algorithm}"


#: The shortest token the service takes: a short one could be guessed by trying.
MIN_TOKEN_LENGTH: Final = 16
_REALM = 'Bearer realm="asgi-ratelimit"'


def check_token(token: str, source: str = "token") -> str:
    """Return ``token`` if the service can take it, or raise ConfigurationError (never quoting the token)."""
    if not isinstance(token, str):
        raise ConfigurationError(f"The service's {source} must be a string, got a {type(token).__name__}.")
    if len(token) < MIN_TOKEN_LENGTH or not all("!" <= char <= "~" for char in token):
        # The token itself is never repeated: it may be a real secret with one typo.
        raise ConfigurationError(
            f"The service's {source} must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without "
            f"spaces (e.g. from `openssl rand -hex 32`); got {len(token)} characters"
            + ("." if len(token) < MIN_TOKEN_LENGTH else ", some of them not printable ASCII or spaces.")
        )
    return token


class _Bearer:
    """The bearer-token check of the routes that change counts (and of /metrics when protected)."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode("ascii")

    def refusal(self, headers: Headers) -> Response | None:
        """None when the request carries the token; otherwise the 401 to answer."""
        given = headers.get("authorization")
        if given is None:
            # RFC 6750: no error code when the request had no credentials at all.
            return _problem(
                401, "This route needs the header Authorization: Bearer <token>.", headers={"WWW-Authenticate": _REALM}
            )
        scheme, _, credentials = given.strip().partition(" ")
        # compare_digest takes as long whatever the first differing byte: the token cannot be
        # guessed a character at a time from response times.  Headers arrive decoded as latin-1.
        if scheme.lower() != "bearer" or not hmac.compare_digest(credentials.strip().encode("latin-1"), self._expected):
            return _problem(
                401,
                "The bearer token is not the service's.",
                headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
            )
        return None


class _OperationsRoute:
    """One operations route of health.py, as the ASGI endpoint of a Starlette Route (behind the token or not)."""

    def __init__(self, operations: OperationsApp, path: str, bearer: _Bearer | None) -> None:
        self.operations = operations
        self.path = path
        self.bearer = bearer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.bearer is not None:
            refusal = self.bearer.refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.operations.serve(self.path, scope, send)


#: The prefix of the environment variables the service reads (ASGI_RATELIMIT_REDIS_URL, ...).
ENV_PREFIX: Final = "ASGI_RATELIMIT_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class ServiceSettings:
    """What the service is built from: the command line's options, or the environment in each worker.

    Args:
        redis_url: counts in Redis at this URL; in this process's memory when None.
        prefix: the prefix of the Redis keys.
        timeout: seconds a decision may take before the service answers 503.
        token: the bearer token /check and /reset require; None leaves them open.
        token_file: the file the token was read from, if any (workers read it again, so the
            token itself need not travel in their environment).
        protect_metrics: put /metrics behind the token too.
    """

    redis_url: str | None = None
    prefix: str = "rl:"
    timeout: float = 0.05
    token: str | None = dataclasses.field(default=None, repr=False)  # a secret: never in a repr, so never in a log line
    token_file: str | None = None
    protect_metrics: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServiceSettings:
        """Read the ASGI_RATELIMIT_* variables; ConfigurationError names the variable at fault."""

        def get(name: str) -> str | None:
            value = environ.get(ENV_PREFIX + name)
            return value if value else None

        timeout_text = get("TIMEOUT")
        timeout = 0.05
        if timeout_text is not None:
            try:
                timeout = float(timeout_text)
            except ValueError:
                raise ConfigurationError(
                    f"{ENV_PREFIX}TIMEOUT must be a number of seconds, got {timeout_text!r}."
                ) from None
        protect = environ.get(ENV_PREFIX + "PROTECT_METRICS", "").strip().lower()
        if protect not in _TRUE | _FALSE:
            raise ConfigurationError(
                f"{ENV_PREFIX}PROTECT_METRICS must be one of 1, true, yes, on, 0, false, no, off; got {protect!r}."
            )
        token, token_file = get("TOKEN"), get("TOKEN_FILE")
        if token is not None and token_file is not None:
            raise ConfigurationError(
                f"Set {ENV_PREFIX}TOKEN or {ENV_PREFIX}TOKEN_FILE (or --token-file), not both: which one is meant?"
            )
        settings = cls(
            redis_url=get("REDIS_URL"),
            prefix=environ.get(ENV_PREFIX + "PREFIX", "rl:"),
            timeout=timeout,
            token=token,
            protect_metrics=protect in _TRUE,
        )
        return settings.with_token_file(token_file) if token_file is not None else settings

    def with_token_file(self, path: str) -> ServiceSettings:
        """These settings with the token read from ``path`` (trailing whitespace, e.g. a newline, dropped)."""
        try:
            token = Path(path).read_text(encoding="utf-8").rstrip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigurationError(f"Cannot read the token file {path!r}: {exc}.") from None
        check_token(token, f"token in {path!r}")
        return ServiceSettings(
            self.redis_url, self.prefix, self.timeout, token, str(Path(path).resolve()), self.protect_metrics
        )

    def check(self) -> None:
        """Raise ConfigurationError for settings the service would refuse, without building it."""
        # The same checks create_app() and the backends make, run before any worker starts.
        if self.token is not None:
            check_token(self.token)
        if self.protect_metrics and self.token is None:
            raise ConfigurationError("--protect-metrics needs a token: without one, /metrics could not be reached.")
        if isinstance(self.timeout, bool) or not 0 < self.timeout <= 60:
            raise ConfigurationError(
                f"timeout must be a number of seconds above 0 and at most 60, got {self.timeout!r}."
            )
        if self.redis_url is not None:
            from redis.asyncio.connection import parse_url

            if "{" in self.prefix or "}" in self.prefix:
                # As RedisBackend refuses it, but before any worker starts.
                raise ConfigurationError(f"The Redis key prefix must not contain braces, got {self.prefix!r}.")

            try:
                parse_url(self.redis_url)
            except ValueError as exc:
                raise ConfigurationError(f"Invalid Redis URL: {exc}") from None

    def environment(self) -> dict[str, str | None]:
        """These settings as the ASGI_RATELIMIT_* variables from_environment() reads (None: unset it)."""
        return {
            ENV_PREFIX + "REDIS_URL": self.redis_url,
            ENV_PREFIX + "PREFIX": self.prefix,
            ENV_PREFIX + "TIMEOUT": repr(self.timeout),
            # A token from a file travels as the file's path, not as itself.
            ENV_PREFIX + "TOKEN": self.token if self.token_file is None else None,
            ENV_PREFIX + "TOKEN_FILE": self.token_file,
            ENV_PREFIX + "PROTECT_METRICS": "1" if self.protect_metrics else "0",
        }

    def build(self) -> Starlette:
        """The service these settings describe, owning its backend (closed at lifespan shutdown)."""
        self.check()
        backend: Backend = (
            MemoryBackend() if self.redis_url is None else RedisBackend.from_url(self.redis_url, prefix=self.prefix)
        )
        return create_app(
            backend, timeout=self.timeout, close_backend=True, token=self.token, protect_metrics=self.protect_metrics
        )


def from_environment() -> Starlette:
    """Build the service from the ASGI_RATELIMIT_* environment variables: the factory each worker runs.

    ``asgi-ratelimit serve`` hands it to uvicorn; any ASGI server that takes a factory can run it too
    (``uvicorn --factory asgi_ratelimit.service:from_environment``).
    """
    return ServiceSettings.from_env(os.environ).build()


def create_app(
    backend: Backend | None = None,
    *,
    timeout: float = 0.05,
    registry: CollectorRegistry | None = None,
    close_backend: bool | None = None,
    token: str | None = None,
    protect_metrics: bool = False,
) -> Starlette:
    """Build the decision service on ``backend`` (MemoryBackend when None).

    Args:
        backend: where counts live; a MemoryBackend of its own when None.
        timeout: seconds a decision may take before the service answers 503 (default 0.05).
        registry: the Prometheus registry to count on and to serve at /metrics; the global REGISTRY by default.
        close_backend: close the backend at lifespan shutdown; by default only a backend the service built.
        token: when set, /check and /reset answer 401 unless the request has ``Authorization: Bearer <token>``;
            at least 16 printable ASCII characters.  /health, /health/live and /openapi.json stay open.
        protect_metrics: put /metrics behind the token too (default False: scrapers often cannot send one).
    """
    bearer = None if token is None else _Bearer(check_token(token))
    if protect_metrics and bearer is None:
        raise ConfigurationError("protect_metrics=True needs a token: without one, /metrics could not be reached.")
    store: Backend = MemoryBackend() if backend is None else backend
    closing = backend is None if close_backend is None else close_backend
    counted_on = REGISTRY if registry is None else registry
    # No deny cache: a reset answered by one worker or instance must let the key through on every
    # other one at once, and a denial remembered elsewhere would outlive it.
    limiter = Limiter(store, timeout=timeout, registry=counted_on, deny_cache=False)
    if limiter.metrics is not None:
        for algorithm in ALGORITHMS:
            limiter.metrics.add_rule(_rule_name(algorithm))
    operations = OperationsApp(limiter, registry=counted_on)

    prepared: dict[Policy, _HeaderParts] = {}  # the header parts of the policies seen lately

    async def check(request: Request) -> Response:
        if bearer is not None:
            refusal = bearer.refusal(request.headers)
            if refusal is not None:
                return refusal
        try:
            hits, batch = parse_checks(await _read_json(request))
        except BadRequest as exc:
            return _problem(exc.status, exc.detail, exc.field, index=exc.index)
        spans: list[Span] = [(_rule_name(policy.algorithm), key, 1) for key, policy, _ in hits]
        try:
            # A batch is one call: the backend decides all its hits at once, and takes from all or none.
            decisions = await limiter.decide(hits)
        except BackendError:
            limiter.count_failure(spans, failed_open=False)
            return _problem(
                503, "The rate-limit backend did not answer; nothing was counted.", headers={"Retry-After": "1"}
            )
        limiter.count_decisions(spans, decisions, dry_run=False)
        if batch:
            # No RateLimit headers: a batch's checks may be on different keys, and one header cannot
            # describe them all.  Each result carries its own numbers.
            body = {
                "allowed": all(decision.allowed for decision in decisions),
                "results": [_decision_body(decision) for decision in decisions],
            }
            return JSONResponse(body, headers={"Cache-Control": "no-store"})
        ((_, policy, _),) = hits
        (decision,) = decisions
        parts = prepared.get(policy)
        if parts is None:
            if len(prepared) >= _POLICIES_KEPT:
                prepared.clear()
            parts = prepared[policy] = _header_parts(policy)
        # denied=False: this response is a 200 and Retry-After never goes on a 2xx; on a denial
        # the RateLimit t parameter carries the same whole seconds Retry-After would.
        headers = {"cache-control": "no-store"}
        for name, value in rate_limit_headers(
            [decision], parts.items, parts.names, "ietf", False, policy_header=parts.policy_header
        ):
            headers[name.decode("latin-1")] = value.decode("latin-1")
        return JSONResponse(_decision_body(decision), headers=headers)

    async def reset(request: Request) -> Response:
        if bearer is not None:
            refusal = bearer.refusal(request.headers)
            if refusal is not None:
                return refusal
        try:
            key, policy = parse_reset(await _read_json(request))
        except BadRequest as exc:
            return _problem(exc.status, exc.detail, exc.field)
        try:
            await limiter.reset(key, [policy])
        except BackendError:
            return _problem(
                503, "The rate-limit backend did not answer; the key may not be reset.", headers={"Retry-After": "1"}
            )
        # An audit line for support: the key hashed as in the storage, never as given.
        logger.info("asgi_ratelimit: reset key %s under %s", digest(key), policy.algorithm)
        return Response(status_code=204)

    document = openapi_document(bearer=bearer is not None, protect_metrics=protect_metrics)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Unknown paths and methods answer problem+json like everything else (405 keeps its Allow).
        assert isinstance(exc, HTTPException)
        return _problem(exc.status_code, exc.detail, headers=exc.headers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if closing:
                await store.aclose()

    routes = [
        Route("/check", check, methods=["POST"]),
        Route("/reset", reset, methods=["POST"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *(
            Route(
                path,
                _OperationsRoute(operations, path, bearer if path == "/metrics" and protect_metrics else None),
                methods=["GET", "HEAD"],
            )
            for path in ("/health", "/health/live", "/metrics")
        ),
    ]
    service = Starlette(routes=routes, exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    service.state.backend = store
    service.state.limiter = limiter
    return service


def _parameter_schema(spec: _Algorithm, name: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": spec.fields[name], **spec.bounds[name]}
    if spec.cls is TokenBucket and name == "refill_rate":
        schema["description"] = f"Tokens per second; capacity / refill_rate must be at most {_MAX_SECONDS} s."
    elif spec.cls is GCRA and name == "burst":
        schema["description"] = (
            f"Hits allowed at once (default: limit); burst * period / limit must be at most {2 * _MAX_SECONDS} s."
        )
    elif spec.fields[name] == _NUM:
        schema["description"] = "Seconds."
    return schema


def openapi_document(*, bearer: bool = False, protect_metrics: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service (with the bearer token when it has one)."""
    variants: list[dict[str, Any]] = []
    for algorithm, spec in ALGORITHMS.items():
        properties: dict[str, Any] = {
            "key": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_KEY_BYTES,
                "pattern": "^[^\\u001f]*$",
                "description": (
                    f"The identity to limit, at most {MAX_KEY_BYTES} bytes in UTF-8, without U+001F. Stored hashed."
                ),
            },
            "algorithm": {"const": algorithm},
            "cost": {"type": "integer", "minimum": 1, "maximum": MAX_COST, "default": 1},
        }
        for name in spec.fields:
            properties[name] = _parameter_schema(spec, name)
        required = ["key", "algorithm", *(name for name in spec.fields if name not in spec.optional)]
        variants.append(
            {
                "title": algorithm,
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            }
        )

    reset_variants = [
        {
            **variant,
            "properties": {name: schema for name, schema in variant["properties"].items() if name != "cost"},
        }
        for variant in variants
    ]

    def problem(description: str) -> dict[str, Any]:
        schema = {"$ref": "#/components/schemas/Problem"}
        return {"description": description, "content": {"application/problem+json": {"schema": schema}}}

    def json_body(description: str, ref: str) -> dict[str, Any]:
        schema = {"$ref": f"#/components/schemas/{ref}"}
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    rate_limit_header = {
        "RateLimit-Policy": {
            "description": 'The policy, e.g. "token_bucket";q=10;w=10 (draft-ietf-httpapi-ratelimit-headers).',
            "schema": {"type": "string"},
            "required": True,
        },
        "RateLimit": {
            "description": 'The key\'s state, e.g. "token_bucket";r=9;t=9; on a denial t is the Retry-After value.',
            "schema": {"type": "string"},
            "required": True,
        },
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "asgi_ratelimit decision service",
            "version": "1",
            "description": "Rate-limit decisions over HTTP: POST /check takes cost units from a key's allowance.",
        },
        "paths": {
            "/check": {
                "post": {
                    "summary": "Take cost units from a key's allowance, or say when it can.",
                    "description": (
                        "The body is read as JSON whatever its Content-Type. A hit whose cost is above the "
                        'policy\'s capacity can never pass: it answers allowed false, "never": true and '
                        '"retry_after": null.'
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"oneOf": [*variants, {"$ref": "#/components/schemas/Batch"}]}
                            }
                        },
                    },
                    "responses": {
                        "200": {
                            "description": (
                                "The decision, allowed or not; for a batch, its decisions in order (and no "
                                "RateLimit headers)."
                            ),
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "oneOf": [
                                            {"$ref": "#/components/schemas/Decision"},
                                            {"$ref": "#/components/schemas/BatchDecision"},
                                        ]
                                    }
                                }
                            },
                            "headers": {
                                name: {**header, "required": False} for name, header in rate_limit_header.items()
                            },
                        },
                        "400": problem(f"Not JSON, nested too deeply, or larger than {MAX_BODY_BYTES} bytes."),
                        "422": problem(
                            'A field is missing, unknown or invalid; "field" names it, "index" a batch\'s check.'
                        ),
                        "503": problem("The backend did not answer; nothing was counted."),
                    },
                }
            },
            "/reset": {
                "post": {
                    "summary": "Forget a key's state under one policy: its next check finds a full allowance.",
                    "description": (
                        "The body is a check without a cost: the key, the algorithm and its parameters, which "
                        "name the state to clear. Resetting a key that has no state is no error."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"oneOf": reset_variants}}},
                    },
                    "responses": {
                        "204": {"description": "The key's state under that policy is gone."},
                        "400": problem(f"Not JSON, nested too deeply, or larger than {MAX_BODY_BYTES} bytes."),
                        "422": problem('A field is missing, unknown or invalid (a cost too); "field" names it.'),
                        "503": problem("The backend did not answer; the key may not be reset."),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness: whether the backend answers a ping within the time budget.",
                    "responses": {
                        "200": json_body("The backend answers.", "Health"),
                        "503": json_body("The backend does not answer.", "Health"),
                    },
                }
            },
            "/health/live": {
                "get": {
                    "summary": "Liveness: the process answers; never touches the backend.",
                    "responses": {"200": json_body("Alive.", "Live")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (OpenMetrics when the Accept header asks for it).",
                    "responses": {
                        "200": {
                            "description": "The exposition.",
                            "content": {
                                "text/plain": {"schema": {"type": "string"}},
                                "application/openmetrics-text": {"schema": {"type": "string"}},
                            },
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document.",
                    "responses": {
                        "200": {
                            "description": "The OpenAPI 3.1 document.",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "Decision": {
                    "type": "object",
                    "required": ["allowed", "limit", "remaining", "retry_after", "reset_after", "never"],
                    "additionalProperties": False,
                    "properties": {
                        "allowed": {"type": "boolean"},
                        "limit": {"type": "integer", "minimum": 1, "description": "The policy's capacity."},
                        "remaining": {"type": "integer", "minimum": 0, "description": "Units left after this hit."},
                        "retry_after": {
                            "type": ["number", "null"],
                            "minimum": 0,
                            "description": "Seconds until this hit could pass: 0 when allowed, null when never.",
                        },
                        "reset_after": {
                            "type": "number",
                            "minimum": 0,
                            "description": "Seconds until the key's allowance is full again.",
                        },
                        "never": {
                            "type": "boolean",
                            "description": "The cost is above the capacity: no wait can make this hit pass.",
                        },
                    },
                },
                "Batch": {
                    "title": "batch",
                    "type": "object",
                    "description": "Checks decided together: every one is taken, or none.",
                    "properties": {
                        "checks": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH,
                            "items": {"oneOf": variants},
                            "description": (
                                "Each key and policy at most once; the sliding_window costs add up to at most "
                                f"{MAX_SLIDING_WINDOW_LIMIT}."
                            ),
                        }
                    },
                    "required": ["checks"],
                    "additionalProperties": False,
                },
                "BatchDecision": {
                    "type": "object",
                    "required": ["allowed", "results"],
                    "additionalProperties": False,
                    "properties": {
                        "allowed": {
                            "type": "boolean",
                            "description": "Whether every check was taken; when false, none was.",
                        },
                        "results": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Decision"},
                            "description": (
                                "One per check, in order: each its own verdict, and the state after the batch "
                                "when it was taken, before it when not."
                            ),
                        },
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
                        "field": {"type": "string", "description": "The request field at fault, when there is one."},
                        "index": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "In a batch, the index of the check at fault.",
                        },
                    },
                },
                "Health": {
                    "type": "object",
                    "required": ["status", "backend", "latency_ms"],
                    "properties": {
                        "status": {"enum": ["ok", "unavailable"]},
                        "backend": {"type": "string"},
                        "latency_ms": {"type": "number", "minimum": 0},
                    },
                },
                "Live": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"const": "ok"}},
                },
            }
        },
    }
    if bearer:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        protected = [document["paths"]["/check"]["post"], document["paths"]["/reset"]["post"]]
        if protect_metrics:
            protected.append(document["paths"]["/metrics"]["get"])
        for operation in protected:
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {
                **problem("No Authorization: Bearer header, or not the service's token."),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
            }
    return document
