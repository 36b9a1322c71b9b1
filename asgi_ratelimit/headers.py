"""The response headers API clients read: RateLimit, RateLimit-Policy, Retry-After, X-RateLimit-*.

RateLimit-Policy and RateLimit follow draft-ietf-httpapi-ratelimit-headers-10: Structured Field
Lists (RFC 9651) with one item per applied limit, the item a String naming the policy:

    RateLimit-Policy: "login";q=5;w=60
    RateLimit: "login";r=0;t=42

``t`` is the number of whole seconds, rounded up, until more quota is available: on a denial the
wait before this request could pass (at least 1), otherwise the time until the allowance is full
again (0 when it already is).  Retry-After is sent on denials only, and equals the largest ``t``
among the policies that denied.  The legacy X-RateLimit-Reset is, like ``t``, seconds from now
(not an epoch timestamp).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from .errors import ConfigurationError
from .policies import Decision

__all__ = [
    "HEADER_MODES",
    "HEADER_NAMES",
    "HeaderMode",
    "concurrency_item",
    "one_limit_headers",
    "policy_item",
    "rate_limit_headers",
    "retry_after_seconds",
    "sf_string",
]

HeaderMode = Literal["ietf", "legacy", "both", "none"]
HEADER_MODES: tuple[str, ...] = ("ietf", "legacy", "both", "none")

# A "never" wait (cost above capacity) still needs a finite header value; a year says "do not retry".
NEVER_SECONDS = 365 * 86_400


def sf_string(text: str) -> str:
    """``text`` as an RFC 9651 String: printable ASCII, with quotes and backslashes escaped."""
    cleaned = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_item(name: str, quota: int, window_seconds: int) -> str:
    """One RateLimit-Policy list item, e.g. ``"login";q=5;w=60``."""
    return f"{sf_string(name)};q={quota};w={window_seconds}"


def concurrency_item(name: str, limit: int) -> str:
    """A RateLimit-Policy item for a concurrency limit: ``"name";q=10;qu="concurrent-requests"``."""
    return f'{sf_string(name)};q={limit};qu="concurrent-requests"'


def retry_after_seconds(decision: Decision) -> int:
    """Whole seconds, rounded up and at least 1, before a denied hit could pass."""
    if decision.never:
        return NEVER_SECONDS
    return max(1, math.ceil(decision.retry_after))


def _t_seconds(decision: Decision) -> int:
    allowed, limit, remaining, _, reset_after, _ = decision  # one unpacking instead of four attribute reads
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
    String-formatted name) describe ``decisions[i]``; ``policy_header``, when given, is the
    RateLimit-Policy value those items make, joined and encoded ahead of time.
    """
    if not decisions:
        return []
    headers: list[tuple[bytes, bytes]] = []
    if mode == "ietf" or mode == "both":
        if policy_header is None:
            policy_header = ", ".join(policy_items).encode("ascii")
        state = ", ".join(
            f"{name};r={d.remaining};t={_t_seconds(d)}" for name, d in zip(item_names, decisions, strict=True)
        )
        headers.append((b"ratelimit-policy", policy_header))
        headers.append((b"ratelimit", state.encode("ascii")))
    if mode == "legacy" or mode == "both":
        tightest = _tightest(decisions)
        headers.append((b"x-ratelimit-limit", str(tightest.limit).encode()))
        headers.append((b"x-ratelimit-remaining", str(tightest.remaining).encode()))
        headers.append((b"x-ratelimit-reset", str(_t_seconds(tightest)).encode()))
    if denied:
        wait = max(retry_after_seconds(d) for d in decisions if not d.allowed)
        headers.append((b"retry-after", str(wait).encode()))
    return headers


def one_limit_headers(policy_header: bytes, state_format: bytes, decision: Decision) -> list[tuple[bytes, bytes]]:
    """What ``rate_limit_headers`` gives one decision in the "ietf" mode; the decision allowed the request.

    The usual response, built from its rule's prepared values: ``policy_header``, the RateLimit-Policy
    value, and ``state_format``, the RateLimit value as a bytes %-format of (remaining, t).
    """
    _, limit, remaining, _, reset_after, _ = decision
    t = 0 if remaining >= limit else math.ceil(reset_after)  # _t_seconds() of an allowed decision, without a call
    return [(b"ratelimit-policy", policy_header), (b"ratelimit", state_format % (remaining, t))]


def _tightest(decisions: Sequence[Decision]) -> Decision:
    """The decision a single-policy client should follow: the longest denial, else the least left."""
    denials = [d for d in decisions if not d.allowed]
    if denials:
        return max(denials, key=retry_after_seconds)
    return min(decisions, key=lambda d: d.remaining)
