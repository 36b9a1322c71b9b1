"""The local deny cache: a hit just denied is denied again in-process until Redis could allow it.

This is exact, not an approximation.  When Redis denies a hit, each denying policy reports how
long until it could pass (retry_after); other processes can only consume more in the meantime,
which pushes that moment later, never earlier.  So until the earliest of those moments, Redis
would deny the same hit again.  The clock starts when the call was *sent*, before Redis decided,
so the local deadline is never later than Redis's own: the round trip is subtracted.

Only the same hit (same identities, policies and costs) is answered from the cache, so every
cached decision still describes the request it answers.  Memory is bounded by ``max_entries``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from .policies import Decision, new_decision

__all__ = ["DenyCache"]


class DenyCache:
    """Denials remembered until the moment Redis could first allow the same hit."""

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        # signature -> (deadline, sent_at, decisions); insertion order is age, oldest first.
        # OrderedDict: evicting the oldest stays O(1) however many entries were deleted before it.
        self._entries: OrderedDict[Any, tuple[float, float, Sequence[Decision]]] = OrderedDict()
        self.hits = 0  # denials answered locally, for tests and benchmarks

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, signature: Any) -> list[Decision] | None:
        """The cached denial for this hit, its waits brought up to now; None when there is none."""
        entry = self._entries.get(signature)
        if entry is None:
            return None
        deadline, sent_at, decisions = entry
        now = self._clock()
        if now >= deadline:
            del self._entries[signature]
            return None
        self.hits += 1
        elapsed = now - sent_at
        return [
            new_decision(
                d.allowed,
                d.limit,
                d.remaining,
                d.retry_after if d.allowed else max(0.0, d.retry_after - elapsed),
                max(0.0, d.reset_after - elapsed),
                d.policy,
            )
            for d in decisions
        ]

    def put(self, signature: Any, decisions: Sequence[Decision], sent_at: float) -> None:
        """Remember a denied hit whose call was sent at ``sent_at`` (this cache's clock)."""
        wait = min((d.retry_after for d in decisions if not d.allowed), default=0.0)
        if wait <= 0:
            return
        entries = self._entries
        entries.pop(signature, None)
        if len(entries) >= self.max_entries:
            self._make_room()
        # A "never" denial (cost above capacity) stays until evicted: it can never pass.
        entries[signature] = (math.inf if math.isinf(wait) else sent_at + wait, sent_at, decisions)

    def forget(self, identity: str) -> None:
        """Drop every remembered denial of a hit on ``identity`` (its state was just reset)."""
        stale = [signature for signature in self._entries if any(hit[0] == identity for hit in signature)]
        for signature in stale:
            del self._entries[signature]

    def _make_room(self) -> None:
        entries = self._entries
        now = self._clock()
        expired = [key for key in itertools.islice(entries, 256) if entries[key][0] <= now]
        for key in expired:
            del entries[key]
        while len(entries) >= self.max_entries:
            entries.popitem(last=False)
