"""The response headers API clients read: RateLimit, RateLimit-Policy, Retry-After, X-RateLimit-*.

RateLimit-Policy and RateLimit follow draft-ietf-httpapi-ratelimit-headers-11: Structured Field
Lists (RFC 9651) with one item per applied limit, the item a String naming the policy:

    RateLimit-Policy: "login";q=5;w=60
    RateLimit: "login";r=0;t=42

``r`` is the quota left.  ``t`` is the *effective window*, whole seconds within which the client
may use ``r`` without being refused: on a denial the wait before this request could pass (at
least 1, never more than Retry-After); otherwise never 0, never shorter than the time until the
allowance is full again, nor than the time the policy's own rate (``q`` per ``w``) takes to supply
``r`` units, so ``r / t`` never advertises more than ``q / w`` (a full allowance has ``t = w``).
An item without a time window (a concurrency limit, whose decision names no policy) has no ``t``.
Retry-After is sent on denials only, and equals the largest ``t`` among the policies that denied.
The legacy X-RateLimit-Reset keeps its older meaning, seconds until the allowance is full again
(0 when it is; not an epoch timestamp), and on a denial the wait.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Literal

from .errors import ConfigurationError
from .policies import Decision

__all__ = [
    "HEADER_MODES",
    "HEADER_NAMES",
    "QUOTA_EXCEEDED",
    "QUOTA_UNITS",
    "HeaderMode",
    "concurrency_item",
    "effective_window",
    "item_name",
    "one_limit_headers",
    "policy_item",
    "rate_limit_headers",
    "retry_after_seconds",
    "sf_string",
    "state_format_of",
]

HeaderMode = Literal["ietf", "legacy", "both", "none"]
HEADER_MODES: tuple[str, ...] = ("ietf", "legacy", "both", "none")

#: The draft's problem type for a request refused because it exceeds one or more quota policies.
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"

#: The draft's quota units: what ``q`` and ``r`` count.  "requests" is the default and is never sent.
QUOTA_UNITS: tuple[str, ...] = ("requests", "content-bytes", "concurrent-requests")

# A "never" wait (cost above capacity) still needs a finite header value; a year says "do not retry".
NEVER_SECONDS = 365 * 86_400

# The end of every prepared RateLimit value (see state_format_of): one_limit_headers cuts it off when there is no t.
_T_FORMAT = b";t=%d"


def sf_string(text: str) -> str:
    """``text`` as an RFC 9651 String: printable ASCII, with quotes and backslashes escaped."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


_LEADING_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def item_name(item: str) -> str:
    """The policy name an item starts with: the String of ``"login";pk=:..:`` decoded (``login``)."""
    match = _LEADING_STRING.match(item)
    if match is None:
        raise ValueError(f"{item!r} does not start with a Structured Field String.")
    # sf_string escapes exactly as JSON does for printable ASCII: a JSON decoder reads it back.
    name: str = json.loads(match.group())
    return name


def policy_item(name: str, quota: int, window_seconds: int, unit: str | None = None) -> str:
    """One RateLimit-Policy list item, e.g. ``"login";q=5;w=60``, with ``qu`` unless the unit is requests."""
    item = f"{sf_string(name)};q={quota};w={window_seconds}"
    return item if unit is None or unit == "requests" else f'{item};qu="{unit}"'


def concurrency_item(name: str, limit: int) -> str:
    """A RateLimit-Policy item for a concurrency limit: ``"name";q=10;qu="concurrent-requests"`` (no window)."""
    return f'{sf_string(name)};q={limit};qu="concurrent-requests"'


def state_format_of(item: str) -> bytes:
    """One policy's RateLimit value as a bytes %-format of (remaining, t); ``item`` is its String and any pk."""
    return item.replace("%", "%%").encode("ascii") + b";r=%d" + _T_FORMAT


def retry_after_seconds(decision: Decision) -> int:
    """Whole seconds, rounded up and at least 1, before a denied hit could pass."""
    if decision.never:
        return NEVER_SECONDS
    return max(1, math.ceil(decision.retry_after))


def effective_window(decision: Decision) -> int | None:
    """The ``t`` of a decision's RateLimit item: seconds within which using its ``r`` is safe; None for no window.

    Using ``r`` units at any moment is safe, as an allowance only grows while it is not used; ``t`` says
    over how long: never 0, at least until the allowance is full again, and never so short that
    ``r / t`` would exceed the policy's ``q / w``, the cap on that ratio the draft asks servers for.
    """
    allowed, _, remaining, _, reset_after, policy = decision  # one unpacking instead of four attribute reads
    if policy is None:
        return None
    if not allowed:
        return retry_after_seconds(decision)
    # -(-a // b): the ceiling of a / b in integers.
    return max(1, math.ceil(reset_after), -(-remaining * policy.window_seconds // policy.quota))


def _reset_seconds(decision: Decision) -> int:
    """X-RateLimit-Reset: the wait on a denial, else seconds until the allowance is full (0 when it is)."""
    allowed, limit, remaining, _, reset_after, _ = decision
    if not allowed:
        return retry_after_seconds(decision)
    if remaining >= limit:
        return 0
    return math.ceil(reset_after)


#: Every header name this module writes, lowercased as ASGI carries them.
HEADER_NAMES = frozenset(
    {
        b"ratelimit-policy",
        b"ratelimit",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"retry-after",
    }
)


def check_mode(mode: str) -> HeaderMode:
    """Validate the ``headers=`` setting."""
    if mode not in HEADER_MODES:
        raise ConfigurationError(f"headers={mode!r} is not a header mode: choose one of {', '.join(HEADER_MODES)}.")
    return mode  # type: ignore[return-value]


def _state_item(name: str, decision: Decision) -> str:
    t = effective_window(decision)
    if t is None:
        return f"{name};r={decision.remaining}"
    return f"{name};r={decision.remaining};t={t}"


def rate_limit_headers(
    decisions: Sequence[Decision],
    policy_items: Sequence[str],
    item_names: Sequence[str],
    mode: HeaderMode,
    denied: bool,
    policy_header: bytes | None = None,
) -> list[tuple[bytes, bytes]]:
    """The raw ASGI headers for one response.

    ``policy_items[i]`` (a preformatted RateLimit-Policy item) and ``item_names[i]`` (its
    String-formatted name, followed by its ``pk`` when it has one) describe ``decisions[i]``;
    ``policy_header``, when given, is the RateLimit-Policy value those items make, joined and
    encoded ahead of time.
    """
    if not decisions:
        return []
    headers: list[tuple[bytes, bytes]] = []
    if mode == "ietf" or mode == "both":
        if policy_header is None:
            policy_header = ", ".join(policy_items).encode("ascii")
        state = ", ".join(_state_item(name, d) for name, d in zip(item_names, decisions, strict=True))
        headers.append((b"ratelimit-policy", policy_header))
        headers.append((b"ratelimit", state.encode("ascii")))
    if mode == "legacy" or mode == "both":
        tightest = _tightest(decisions)
        headers.append((b"x-ratelimit-limit", str(tightest.limit).encode()))
        headers.append((b"x-ratelimit-remaining", str(tightest.remaining).encode()))
        headers.append((b"x-ratelimit-reset", str(_reset_seconds(tightest)).encode()))
    if denied:
        wait = max(retry_after_seconds(d) for d in decisions if not d.allowed)
        headers.append((b"retry-after", str(wait).encode()))
    return headers


def one_limit_headers(policy_header: bytes, state_format: bytes, decision: Decision) -> list[tuple[bytes, bytes]]:
    """What ``rate_limit_headers`` gives one decision in the "ietf" mode; the decision allowed the request.

    The usual response, built from its rule's prepared values: ``policy_header``, the RateLimit-Policy
    value, and ``state_format``, the RateLimit value as a bytes %-format of (remaining, t).
    """
    _, _, remaining, _, reset_after, policy = decision
    if policy is None:  # a backend that names no policy gives no window: the value without its t
        return [(b"ratelimit-policy", policy_header), (b"ratelimit", state_format[: -len(_T_FORMAT)] % remaining)]
    # effective_window() of an allowed decision, without a call.
    t = max(1, math.ceil(reset_after), -(-remaining * policy.window_seconds // policy.quota))
    return [(b"ratelimit-policy", policy_header), (b"ratelimit", state_format % (remaining, t))]


def _tightest(decisions: Sequence[Decision]) -> Decision:
    """The decision a single-policy client should follow: the longest denial, else the least left."""
    denials = [d for d in decisions if not d.allowed]
    if denials:
        return max(denials, key=retry_after_seconds)
    return min(decisions, key=lambda d: d.remaining)
