"""asgi_ratelimit: rate limiting for ASGI apps, on atomic Redis scripts or in memory."""

from .backends import Backend, MemoryBackend, RedisBackend
from .errors import BackendError, ConfigurationError
from .policies import (
    GCRA,
    Decision,
    FixedWindow,
    Policy,
    SlidingWindow,
    SlidingWindowCounter,
    TokenBucket,
    parse_limit,
)

__version__ = "0.1.0"

__all__ = [
    "GCRA",
    "Backend",
    "BackendError",
    "ConfigurationError",
    "Decision",
    "FixedWindow",
    "MemoryBackend",
    "Policy",
    "RedisBackend",
    "SlidingWindow",
    "SlidingWindowCounter",
    "TokenBucket",
    "parse_limit",
]
