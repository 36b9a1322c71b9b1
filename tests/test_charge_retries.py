"""PendingCharges: a charge that failed is sent again until it gets through, or given up at its deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from asgi_ratelimit import GCRA, Decision
from asgi_ratelimit._charge_retries import PendingCharge, PendingCharges
from asgi_ratelimit.backends.base import Charged, Hit
from asgi_ratelimit.errors import BackendError

HITS: list[Hit] = [("rule\x1fk", GCRA(10, 60), 3)]


class Flaky:
    """A backend whose charge fails ``failures`` times, then succeeds; it records every token it was sent."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.sent: list[str] = []

    async def check(self, hits: Sequence[Hit]) -> list[Decision]:
        raise AssertionError("not called")

    async def charge(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        self.sent.append(token)
        if self.failures:
            self.failures -= 1
            raise BackendError("Redis is away")
        return [], 0


def pending(token: str, within: float) -> PendingCharge:
    return PendingCharge(HITS, ("rule",), token, 10**6, time.monotonic() + within, None)


async def test_a_failed_charge_is_sent_again_with_its_token_until_it_gets_through() -> None:
    backend = Flaky(failures=3)
    done: list[tuple[str, Charged | None]] = []
    charges = PendingCharges(backend, lambda charge, result: done.append((charge.token, result)))
    charges.add(pending("t1", within=5))
    await asyncio.wait_for(charges.wait(), 5)
    assert backend.sent == ["t1"] * 4  # the same token each time: a retry that already got through is a no-op
    assert done == [("t1", ([], 0))]
    assert len(charges) == 0


async def test_a_charge_is_given_up_at_its_deadline() -> None:
    backend = Flaky(failures=10**6)
    done: list[tuple[str, Charged | None]] = []
    charges = PendingCharges(backend, lambda charge, result: done.append((charge.token, result)))
    charges.add(pending("t1", within=0.2))
    await asyncio.wait_for(charges.wait(), 5)
    assert done == [("t1", None)]
    assert len(backend.sent) >= 2


async def test_the_first_attempt_still_under_way_counts() -> None:
    backend = Flaky(failures=0)
    done: list[tuple[str, Charged | None]] = []
    charges = PendingCharges(backend, lambda charge, result: done.append((charge.token, result)))
    first: asyncio.Future[Charged] = asyncio.get_running_loop().create_future()
    charge = pending("t1", within=5)
    charge.attempt = first
    charges.add(charge)
    await asyncio.sleep(0.05)
    first.set_result(([], 7))
    await asyncio.wait_for(charges.wait(), 5)
    assert done == [("t1", ([], 7))] and backend.sent == []  # not sent again: the late reply counted
