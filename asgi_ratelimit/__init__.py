"""asgi_ratelimit: rate limiting for ASGI apps, on atomic Redis scripts or in memory."""

from .backends import Backend, MemoryBackend, RedisBackend
from .charging import BodyBytes, FromState, ResponseHeader
from .errors import BackendError, ConfigurationError
from .extractors import ClientIP, FirstOf, Header, JWTClaim
from .health import operations_app
from .middleware import RateLimitMiddleware
from .policies import (
    GCRA,
    Concurrency,
    Decision,
    FixedWindow,
    Policy,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
    parse_limit,
    parse_limits,
)
from .rules import Rule, rate_limit

__version__ = "0.1.0"

__all__ = [
    "GCRA",
    "Backend",
    "BackendError",
    "BodyBytes",
    "ClientIP",
    "Concurrency",
    "ConfigurationError",
    "Decision",
    "FirstOf",
    "FixedWindow",
    "FromState",
    "Header",
    "JWTClaim",
    "MemoryBackend",
    "Policy",
    "RateLimitMiddleware",
    "RedisBackend",
    "ResponseHeader",
    "Rule",
    "SlidingWindow",
    "SlidingWindowCounter",
    "TokenBucket",
    "operations_app",
    "parse_limit",
    "parse_limits",
    "rate_limit",
]
