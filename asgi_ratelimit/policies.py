"""Rate-limit policies (the algorithms and their parameters) and the Decision they produce.

A policy is a frozen value: it is validated when built, and it precomputes the integer
parameters that both backends use, so that the Lua scripts and the in-memory twin work on
exactly the same numbers.  All times inside the engine are integer microseconds: exact in a
Lua double (below 2**53) and in Python alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from .errors import ConfigurationError

__all__ = [
    "GCRA",
    "Concurrency",
    "Decision",
    "FixedWindow",
    "Policy",
    "SlidingWindow",
    "SlidingWindowCounter",
    "TokenBucket",
    "parse_limit",
    "parse_limits",
]

MICROS = 1_000_000
# Bounds that keep every intermediate value of the scripts an exact integer in a double.
_MAX_COUNT = 1_000_000_000
_MIN_WINDOW_US = 1_000  # 1 ms: shorter windows make no sense for HTTP traffic.
_MAX_WINDOW_US = 366 * 86_400 * MICROS

# Algorithm codes shared with backends/lua/hit.lua and backends/memory.py.
TOKEN_BUCKET = 1
SLIDING_WINDOW = 2
GCRA_CODE = 3
FIXED_WINDOW = 4
SLIDING_WINDOW_COUNTER = 5
CONCURRENCY = 6  # a concurrency slot, decided in the same script call as the rate limits


class Decision(NamedTuple):
    """The answer for one policy of one hit.

    ``retry_after`` is the number of seconds until this hit could succeed (0 when allowed;
    ``math.inf`` when it never can, because its cost exceeds the policy's capacity).
    ``reset_after`` is the number of seconds until the key is back to its full allowance.
    ``policy`` names the policy that answered; it is not part of the answer, so two decisions
    that say the same thing compare equal whichever policy said it.

    A named tuple, not a dataclass: every request builds one, and a tuple is built in a third of
    the time a frozen dataclass takes.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    policy: Policy | None = None

    @property
    def never(self) -> bool:
        """True when the hit's cost exceeds the policy's capacity: no wait can make it pass."""
        return math.isinf(self.retry_after)

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed!r}, limit={self.limit!r}, remaining={self.remaining!r}, "
            f"retry_after={self.retry_after!r}, reset_after={self.reset_after!r})"
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Decision):
            return self[:5] == other[:5]
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        if isinstance(other, Decision):
            return self[:5] != other[:5]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self[:5])


def new_decision(
    allowed: bool, limit: int, remaining: int, retry_after: float, reset_after: float, policy: Policy | None
) -> Decision:
    """Decision(...) for the hot paths: the same tuple, without the keyword handling of its __new__."""
    return _new_tuple(Decision, (allowed, limit, remaining, retry_after, reset_after, policy))


_new_tuple = tuple.__new__


#: The largest limit of an exact sliding-window log, in the library and the decision service alike.
SLIDING_WINDOW_MAX_LIMIT = 10_000


def _check_count(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{owner}: {name} must be a whole number, got {value!r}.")
    if not 1 <= value <= _MAX_COUNT:
        raise ConfigurationError(f"{owner}: {name} must be between 1 and {_MAX_COUNT:,}, got {value!r}.")
    return value


def _finite(value: float) -> bool:
    # math.isfinite raises OverflowError on an int too large for a float; such an int is out of range anyway.
    return isinstance(value, int) or math.isfinite(value)


def _check_seconds(owner: str, name: str, value: object) -> int:
    """Validate a duration in seconds and return it in whole microseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ConfigurationError(f"{owner}: {name} must be a number of seconds, got {value!r}.")
    micros = round(value * MICROS)
    if not _MIN_WINDOW_US <= micros <= _MAX_WINDOW_US:
        raise ConfigurationError(
            f"{owner}: {name} must be between 0.001 and {_MAX_WINDOW_US // MICROS} seconds, got {value!r}."
        )
    return micros


class Policy:
    """Base class of the rate-limit policies; see the concrete classes."""

    algorithm: ClassVar[str]
    code: ClassVar[int]
    # Filled in by each subclass's __post_init__.
    quota: int  # what RateLimit-Policy advertises as q
    window_seconds: int  # what RateLimit-Policy advertises as w (whole seconds, > 0)
    capacity: int  # the largest cost that can ever be allowed
    # The algorithm's two parameters, p1 and p2, each kept in the one form its reader needs:
    numbers: tuple[Any, int]  # as numbers, for MemoryBackend (p1 is a float rate for TokenBucket)
    script_args: tuple[bytes, bytes, bytes]  # code, p1, p2 as the script receives them, encoded once
    key_suffix: str  # "code:p1:p2": distinguishes two policies stored under one identity

    def _finish(self, quota: int, window_us: int, capacity: int, p1: int | float, p2: int) -> None:
        # Frozen dataclasses forbid attribute assignment; these are derived once, here.
        object.__setattr__(self, "quota", quota)
        object.__setattr__(self, "window_seconds", max(1, math.ceil(window_us / MICROS)))
        object.__setattr__(self, "capacity", capacity)
        # repr() of a float round-trips exactly, and Lua's tonumber reads back the same double.
        object.__setattr__(self, "numbers", (p1, p2))
        object.__setattr__(self, "key_suffix", f"{self.code}:{p1!r}:{p2}")
        object.__setattr__(self, "script_args", (str(self.code).encode(), repr(p1).encode(), str(p2).encode()))


@dataclass(frozen=True)
class TokenBucket(Policy):
    """A bucket of ``capacity`` tokens refilled at ``refill_rate`` tokens per second; a hit takes ``cost`` tokens."""

    capacity: int
    refill_rate: float
    algorithm: ClassVar[str] = "token_bucket"
    code: ClassVar[int] = TOKEN_BUCKET

    def __post_init__(self) -> None:
        owner = f"TokenBucket(capacity={self.capacity!r}, refill_rate={self.refill_rate!r})"
        _check_count(owner, "capacity", self.capacity)
        rate = self.refill_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not _finite(rate):
            raise ConfigurationError(f"{owner}: refill_rate must be a number of tokens per second, got {rate!r}.")
        if not 1e-6 <= rate <= _MAX_COUNT:
            raise ConfigurationError(f"{owner}: refill_rate must be between 0.000001 and {_MAX_COUNT:,}, got {rate!r}.")
        # Tokens are stored in micro-tokens; refill_rate tokens/s is refill_rate micro-tokens/us.
        full_us = math.ceil(self.capacity * MICROS / rate)
        if full_us > _MAX_WINDOW_US:
            raise ConfigurationError(
                f"{owner}: an empty bucket must refill within {_MAX_WINDOW_US // MICROS} seconds, "
                f"but capacity / refill_rate is {self.capacity / rate!r} seconds."
            )
        self._finish(self.capacity, full_us, self.capacity, float(rate), self.capacity)


@dataclass(frozen=True)
class SlidingWindow(Policy):
    """An exact sliding-window log: at most ``limit`` hits in any ``window`` seconds (a sorted set in Redis)."""

    limit: int
    window: float
    algorithm: ClassVar[str] = "sliding_window"
    code: ClassVar[int] = SLIDING_WINDOW

    def __post_init__(self) -> None:
        owner = f"SlidingWindow(limit={self.limit!r}, window={self.window!r})"
        _check_count(owner, "limit", self.limit)
        if self.limit > SLIDING_WINDOW_MAX_LIMIT:
            # The log holds one entry per unit (about 140 bytes in Redis), and one hit writes as many entries
            # as it costs: a limit of 10**9 let one request block Redis for seconds and take 126 MB.
            raise ConfigurationError(
                f"{owner}: the exact log keeps one entry per unit, so its limit is at most "
                f"{SLIDING_WINDOW_MAX_LIMIT:,}; use sliding_window_counter or gcra for larger limits."
            )
        window_us = _check_seconds(owner, "window", self.window)
        self._finish(self.limit, window_us, self.limit, self.limit, window_us)


@dataclass(frozen=True)
class GCRA(Policy):
    """Generic cell rate algorithm: ``limit`` hits per ``period`` seconds, at most ``burst`` at once.

    ``burst`` defaults to ``limit``.  State is one timestamp per key.
    """

    limit: int
    period: float
    burst: int | None = None
    algorithm: ClassVar[str] = "gcra"
    code: ClassVar[int] = GCRA_CODE

    def __post_init__(self) -> None:
        owner = f"GCRA(limit={self.limit!r}, period={self.period!r}, burst={self.burst!r})"
        _check_count(owner, "limit", self.limit)
        period_us = _check_seconds(owner, "period", self.period)
        burst = self.limit if self.burst is None else _check_count(owner, "burst", self.burst)
        # The emission interval is rounded up, so the rate never exceeds limit/period.
        interval_us = -(-period_us // self.limit)
        # The tolerance (burst intervals) bounds every time the script computes; twice the
        # longest window leaves room for the interval's rounding up at the longest period.
        if burst * interval_us > 2 * _MAX_WINDOW_US:
            raise ConfigurationError(
                f"{owner}: burst * period / limit must be at most {2 * _MAX_WINDOW_US // MICROS} seconds, "
                f"got burst={burst!r}."
            )
        self._finish(burst, burst * interval_us, burst, interval_us, burst)


@dataclass(frozen=True)
class FixedWindow(Policy):
    """At most ``limit`` hits per window of ``window`` seconds, windows aligned to the Unix epoch."""

    limit: int
    window: float
    algorithm: ClassVar[str] = "fixed_window"
    code: ClassVar[int] = FIXED_WINDOW

    def __post_init__(self) -> None:
        owner = f"FixedWindow(limit={self.limit!r}, window={self.window!r})"
        _check_count(owner, "limit", self.limit)
        window_us = _check_seconds(owner, "window", self.window)
        self._finish(self.limit, window_us, self.limit, self.limit, window_us)


@dataclass(frozen=True)
class SlidingWindowCounter(Policy):
    """Approximate sliding window: the previous window's count, weighted by its overlap, plus the current one."""

    limit: int
    window: float
    algorithm: ClassVar[str] = "sliding_window_counter"
    code: ClassVar[int] = SLIDING_WINDOW_COUNTER

    def __post_init__(self) -> None:
        owner = f"SlidingWindowCounter(limit={self.limit!r}, window={self.window!r})"
        _check_count(owner, "limit", self.limit)
        window_us = _check_seconds(owner, "window", self.window)
        self._finish(self.limit, window_us, self.limit, self.limit, window_us)


@dataclass(frozen=True)
class Concurrency:
    """At most ``limit`` requests in flight per key; a crashed process's slots expire after ``timeout`` seconds.

    Not a rate policy: the middleware takes a slot together with the rule's rate limits, in one
    atomic step, before the app runs, and gives it back as the response ends.  ``timeout`` is the
    lease: a slot nobody gives back (a crashed process, a backend that could not be reached) is
    free again that many seconds after it was taken.
    """

    limit: int
    timeout: float
    algorithm: ClassVar[str] = "concurrency"
    code: ClassVar[int] = CONCURRENCY

    def __post_init__(self) -> None:
        owner = f"Concurrency(limit={self.limit!r}, timeout={self.timeout!r})"
        _check_count(owner, "limit", self.limit)
        object.__setattr__(self, "timeout_us", _check_seconds(owner, "timeout", self.timeout))

    timeout_us: ClassVar[int]  # set per instance in __post_init__: the slot lifetime in microseconds


ALGORITHMS: dict[str, type[Policy]] = {
    cls.algorithm: cls for cls in (TokenBucket, SlidingWindow, GCRA, FixedWindow, SlidingWindowCounter)
}

#: The algorithm of a limit string that names none.  GCRA keeps one timestamp per key whatever the limit,
#: admits at most the limit in any window (a burst of up to the limit, then one every window/limit), and
#: runs the fewest Redis commands; the exact log (sliding_window) holds an entry per admitted unit.
DEFAULT_ALGORITHM = "gcra"

# A month is 30 days and a year 365, as limit strings elsewhere count them: fixed lengths, never calendar ones.
_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
_LIMIT_RE = re.compile(
    r"^\s*(?P<count>\d+)\s*(?:/|per)\s*(?P<mult>\d+(?:\.\d+)?\s*)?"
    r"(?P<unit>second|minute|hour|day|week|month|year)s?\s*$",
    # ASCII: \d would otherwise accept the digits of every script (Arabic-Indic, Devanagari...).
    re.IGNORECASE | re.ASCII,
)
# Several limits in one string: "10/second;1000/hour" or "10/second, 1000/hour".
_SEPARATORS = re.compile(r"[;,]")
_GRAMMAR = (
    'a count, "/" or "per", an optional number, and a unit (second, minute, hour, day, week, month = 30 days '
    'or year = 365 days, plural allowed): "10/second", "100/minute", "5 per 10 seconds"'
)


def parse_limit(text: str, algorithm: str = DEFAULT_ALGORITHM) -> Policy:
    """Turn ``"100/minute"`` or ``"5 per 10 seconds"`` into a policy of the given algorithm.

    For ``token_bucket`` the count is the capacity and it refills at count/window tokens per second;
    for ``gcra`` the burst equals the count.  One limit: ``parse_limits`` reads ``"10/second;1000/hour"``.
    """
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm {algorithm!r}: choose one of {', '.join(sorted(ALGORITHMS))}.")
    if isinstance(text, str) and _SEPARATORS.search(text) and all(map(_LIMIT_RE.match, _SEPARATORS.split(text))):
        raise ConfigurationError(
            f"Invalid limit {text!r}: it holds several limits; parse_limits() returns one policy for each."
        )
    return _parse_one(text, text, algorithm)


def parse_limits(text: str, algorithm: str = DEFAULT_ALGORITHM) -> tuple[Policy, ...]:
    """Turn ``"10/second;1000/hour"`` (limits separated by ``;`` or ``,``) into one policy per limit, in order."""
    if algorithm not in ALGORITHMS:
        raise ConfigurationError(f"Unknown algorithm {algorithm!r}: choose one of {', '.join(sorted(ALGORITHMS))}.")
    if not isinstance(text, str):
        raise ConfigurationError(f"Invalid limit {text!r}: expected {_GRAMMAR}.")
    parts = _SEPARATORS.split(text)
    if len(parts) > 1 and any(not part.strip() for part in parts):
        raise ConfigurationError(
            f'Invalid limits {text!r}: an empty limit between separators; write them as "10/second;1000/hour".'
        )
    return tuple(_parse_one(part, text, algorithm) for part in parts)


def _parse_one(part: str, text: str, algorithm: str) -> Policy:
    """One limit ``part`` of the string ``text`` (the whole string, for the error message)."""
    where = repr(part) if part is text else f"{part.strip()!r} in {text!r}"
    match = _LIMIT_RE.match(part) if isinstance(part, str) else None
    if match is None:
        raise ConfigurationError(f"Invalid limit {where}: expected {_GRAMMAR}.")
    count = int(match["count"])
    mult_text = (match["mult"] or "1").strip()
    seconds = float(mult_text) * _UNITS[match["unit"].lower()]
    if seconds.is_integer():
        seconds = int(seconds)
    if count == 0 or seconds == 0:
        raise ConfigurationError(f"Invalid limit {where}: the count and the window must be above zero.")
    if algorithm == "token_bucket":
        return TokenBucket(capacity=count, refill_rate=count / seconds)
    if algorithm == "gcra":
        return GCRA(limit=count, period=seconds)
    cls = ALGORITHMS[algorithm]
    return cls(count, seconds)  # type: ignore[call-arg]
