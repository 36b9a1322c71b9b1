"""Slot releases that did not get through at once, retried until they do or their lease ends.

A concurrency slot left in Redis by a request that is no longer running refuses others for the
rest of its lease (a minute, say).  So a release is not given up while Redis could still take it:
the first attempt is awaited within the request's time budget; one that fails or runs past it is
handed here, and sent again, with a growing pause, until it succeeds or the lease has passed (the
slot has expired by then, whatever happened).  Releases ignore the circuit breaker: the breaker
protects requests from a slow backend, and nothing waits on these.

The same goes for an acquire whose outcome is unknown (abandoned at the budget, cancelled, failed
after it may have been sent): its slots are released here too.  release.lua bars a token that is
not there yet, so the release works whether it reaches Redis before or after the late acquire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from ._metrics import ReleaseResult
from .backends.base import Backend, Claim

__all__ = ["PendingReleases"]

logger = logging.getLogger("asgi_ratelimit")

FIRST_PAUSE = 0.02  # seconds before the first retry
MOST_PAUSE = 0.5  # the longest pause between two rounds: once Redis answers, slots come back within it
BATCH = 64  # releases sent at once in one round


class PendingReleases:
    """Releases to retry, one entry per request token, bounded in number."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_pending: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = 10.0,
        on_result: Callable[[ReleaseResult], None] | None = None,
    ) -> None:
        self.backend = backend
        self.max_pending = max_pending
        self._clock = clock
        self._log_interval = log_interval
        self._last_log = -float("inf")
        self._on_result = on_result
        # token -> (claims, deadline, the attempt still under way or None); insertion order is age.
        self._pending: dict[str, tuple[Sequence[Claim], float, asyncio.Future[None] | None]] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, claims: Sequence[Claim], token: str, attempt: asyncio.Future[None] | None = None) -> None:
        """Release ``token``'s slots until it succeeds or their lease has passed; ``attempt`` is one under way."""
        if not claims:
            return
        if len(self._pending) >= self.max_pending and token not in self._pending:
            # The oldest is the nearest to its lease's end: it expires by itself soonest.
            oldest = next(iter(self._pending))
            self._finish(oldest, "dropped")
        lease = max(limit.timeout for _, limit in claims)
        self._pending[token] = (claims, self._clock() + lease, attempt)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait(self) -> None:
        """Until nothing is pending (tests and shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    def _finish(self, token: str, result: ReleaseResult) -> None:
        entry = self._pending.pop(token, None)
        if entry is not None and entry[2] is not None and not entry[2].done():
            entry[2].add_done_callback(_retrieve)
        if self._on_result is not None:
            self._on_result(result)
        if result != "released":
            now = self._clock()
            if now - self._last_log >= self._log_interval:
                self._last_log = now
                logger.warning(
                    "asgi_ratelimit: a concurrency slot release was %s; the slot frees when its lease ends",
                    "given up at the end of its lease" if result == "expired" else "dropped (too many pending)",
                )

    async def _run(self) -> None:
        pause = FIRST_PAUSE
        while self._pending:
            now = self._clock()
            for token in [token for token, (_, deadline, _) in self._pending.items() if deadline <= now]:
                self._finish(token, "expired")
            batch = list(self._pending.items())[:BATCH]
            if not batch:
                break
            outcomes = await asyncio.gather(
                *(self._attempt(claims, token, attempt) for token, (claims, _, attempt) in batch),
                return_exceptions=True,
            )
            progress = False
            for (token, (claims, deadline, _)), outcome in zip(batch, outcomes, strict=True):
                if token not in self._pending:
                    continue
                if outcome is None:
                    self._finish(token, "released")
                    progress = True
                else:
                    self._pending[token] = (claims, deadline, None)  # sent again next round
            if self._pending:
                await asyncio.sleep(pause)
                pause = FIRST_PAUSE if progress else min(pause * 2, MOST_PAUSE)

    async def _attempt(self, claims: Sequence[Claim], token: str, attempt: asyncio.Future[None] | None) -> None:
        if attempt is not None:
            await attempt  # the first attempt, still under way: its outcome counts
            return
        await self.backend.release(claims, token)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
