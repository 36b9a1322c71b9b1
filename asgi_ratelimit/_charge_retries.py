"""Charges that did not get through at once, sent again until they do or their window has passed.

A charge made after a response must not be lost on a Redis blip: the request awaits the first attempt
within its time budget, and one that fails or runs past it is handed here, and sent again, with a
growing pause, until it succeeds or the window of its policies has passed (a charge later than that
would count against a window it was not made in).  Retries ignore the circuit breaker: it protects
requests from a slow backend, and nothing waits on these.  A retry of a charge that did get through
(its reply lost) takes nothing more: hit.lua's ledger remembers each charge's token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .backends.base import Charged, ChargingBackend, Hit

__all__ = ["PendingCharge", "PendingCharges", "retrieve"]

FIRST_PAUSE: Final = 0.02  # seconds before the first retry of a charge
MOST_PAUSE: Final = 0.5  # the longest pause between two rounds
MAX_PENDING: Final = 10_000  # beyond it the oldest charge is given up (counted as lost)
BATCH: Final = 64  # charges sent at once in one round


@dataclass
class PendingCharge:
    """One request's charge, with what a retry needs to send it again."""

    hits: Sequence[Hit]
    names: tuple[str, ...]  # the rule of each hit, for metrics
    token: str
    remember_us: int
    deadline: float  # monotonic seconds
    attempt: asyncio.Future[Charged] | None


class PendingCharges:
    """Charges that did not get through within the budget, sent again until they do or their window has passed."""

    def __init__(self, backend: ChargingBackend, on_done: Callable[[PendingCharge, Charged | None], None]) -> None:
        self.backend = backend
        self._on_done = on_done
        self._pending: dict[str, PendingCharge] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, charge: PendingCharge) -> None:
        """Send ``charge`` again until it succeeds or its deadline passes; its ``attempt`` is one under way."""
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            self._on_done(self._pending.pop(oldest), None)
        self._pending[charge.token] = charge
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def wait(self) -> None:
        """Until nothing is pending (tests and shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def _run(self) -> None:
        pause = FIRST_PAUSE
        while self._pending:
            now = time.monotonic()
            for token in [token for token, charge in self._pending.items() if charge.deadline <= now]:
                charge = self._pending.pop(token)
                if charge.attempt is not None:
                    charge.attempt.add_done_callback(retrieve)
                self._on_done(charge, None)
            batch = list(self._pending.values())[:BATCH]
            outcomes = await asyncio.gather(*(self._attempt(charge) for charge in batch), return_exceptions=True)
            progress = False
            for charge, outcome in zip(batch, outcomes, strict=True):
                if self._pending.get(charge.token) is not charge:
                    continue
                if isinstance(outcome, BaseException):
                    charge.attempt = None  # sent again next round
                else:
                    del self._pending[charge.token]
                    self._on_done(charge, outcome)
                    progress = True
            if self._pending:
                await asyncio.sleep(pause)
                pause = FIRST_PAUSE if progress else min(pause * 2, MOST_PAUSE)

    async def _attempt(self, charge: PendingCharge) -> Charged:
        if charge.attempt is not None:
            return await charge.attempt  # the first attempt, still under way: its outcome counts
        return await self.backend.charge(charge.hits, charge.token, charge.remember_us)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Take a finished attempt's outcome, so asyncio does not warn that nobody did."""
    if not future.cancelled():
        future.exception()
