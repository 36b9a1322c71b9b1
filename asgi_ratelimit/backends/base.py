"""The Backend protocol: what the middleware, the limiter and the service need from storage."""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..errors import ConfigurationError
from ..policies import MICROS, Concurrency, Decision, Policy, _new_tuple

__all__ = ["Backend", "Claim", "Hit"]

#: One entry of a combined call: (identity, policy, cost).
Hit = tuple[str, Policy, int]


#: One concurrency limit a request claims a slot of: (identity, limit).
Claim = tuple[str, Concurrency]


class Call(asyncio.Future[Any]):
    """The future of one backend call, for a caller with a time budget (the Limiter).

    The backend completes it; the caller may complete it first, at its budget, to stop waiting
    (or cancel it, when the request goes away).  That does not stop the call, which may be on the
    wire already: the backend calls ``end()`` once it is done with a call whose future was already
    done, and the caller hears of it through ``on_end()``.  Waiting on the future itself, rather
    than beside it, saves the caller a future and a turn of the event loop per call.
    """

    _failed: bool | None = None  # once ended: whether the call failed
    _listeners: list[Callable[[bool], object]] | None = None

    def end(self, failed: bool) -> None:
        """For the backend: done with this call, after its future was completed by the caller."""
        if self._failed is not None:
            return
        self._failed = failed
        listeners, self._listeners = self._listeners or [], None
        for listener in listeners:
            listener(failed)

    def on_end(self, listener: Callable[[bool], object]) -> None:
        """For the caller: ``listener(failed)`` once the backend has ended this call (at once if it has)."""
        if self._failed is not None:
            listener(self._failed)
        elif self._listeners is None:
            self._listeners = [listener]
        else:
            self._listeners.append(listener)


#: What Backend.submit() hands back: the decisions themselves, a Call, or something else to await.
Outcome = list[Decision] | Call | Awaitable[list[Decision]]


@runtime_checkable
class Backend(Protocol):
    """Storage that decides hits atomically.

    A backend may subclass this protocol to inherit ``submit``, ``in_process`` and ``real_time``;
    the two backends here define their own.
    """

    #: Whether submit() always returns the decisions themselves, never an awaitable: the Limiter then
    #: keeps no deny cache (a decision costs less than a lookup) and releases slots without a task.
    in_process: bool = False
    #: Whether the backend's clock moves with real time (an injected test clock need not): the
    #: Limiter's deny cache relies on it.
    real_time: bool = True

    def submit(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> Outcome:
        """Start acquire(hits, claims, token) for a caller with a time budget (the Limiter), without waiting.

        Returns the decisions when they are known at once, else a Call (see there) or another
        awaitable of them: a coroutine is the caller's to run as a task and cancel, a future is
        followed.  Failures may be raised here or by the awaitable.
        """
        return self.acquire(hits, claims, token) if claims else self.hit_many(hits)

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        """Take ``cost`` units from every policy of ``key``, or from none; one Decision per policy."""
        ...

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide several (identity, policy, cost) entries as one hit: all taken, or none."""
        ...

    async def acquire(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> list[Decision]:
        """Decide ``hits`` and take a slot named ``token`` of every claim, all in one step, or nothing at all.

        One Decision per hit, then one per claim.  A token already released (release() came first,
        from a request that stopped waiting) takes nothing.
        """
        ...

    async def release(self, claims: Sequence[Claim], token: str) -> None:
        """Give back the slots named ``token``; one not taken yet is refused to a later acquire for one lease.

        A slot never released expires after its Concurrency timeout (the lease).
        """
        ...

    async def reset(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget ``key``'s state under each of ``policies``: its next hit finds a full allowance."""
        ...

    async def ping(self) -> None:
        """Raise BackendError unless the storage answers."""
        ...

    async def aclose(self) -> None:
        """Release connections and tasks."""
        ...


#: A charge's answer: the Decisions a next request of one unit would meet, and the units the key owes
#: (how far below zero its most indebted policy is; 0 when none is).
Charged = tuple[list[Decision], int]

#: The code of a charge ledger entry in hit.lua: the key remembering the tokens already charged.
LEDGER_CODE = 7


@runtime_checkable
class ChargingBackend(Protocol):
    """A Backend that can also check without spending, and charge after the fact (rules with counts= or charge=)."""

    async def check(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide ``hits`` without taking anything: each Decision says whether that cost would be allowed now."""
        ...

    async def charge(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        """Take every hit's cost, even past its limit (into debt), once per ``token`` for ``remember_us``.

        The same call again with the same token (a retry) takes nothing more, and answers the same way.
        """
        ...


def charged_from_flat(hits: Sequence[Hit], flat: Sequence[int]) -> Charged:
    """A charge's flat reply (the state after it, per entry) as Decisions and the units owed."""
    owed = 0
    for remaining in flat[2::4]:
        if -remaining > owed:
            owed = -remaining
    return decisions_from_flat(hits, flat), owed


def new_token() -> str:
    """A unique name for one request's concurrency slots."""
    return secrets.token_hex(8)


def slot_decision(limit: Concurrency, allowed: int, retry_us: int, remaining: int) -> Decision:
    """A concurrency claim's answer as a Decision (a slot frees whenever a request ends: no reset time)."""
    return Decision(allowed == 1, limit.limit, remaining if remaining > 0 else 0, retry_us / MICROS, 0.0)


def check_hits(hits: Sequence[Hit]) -> None:
    """Reject entries the scripts cannot decide correctly (a bad cost, one state key twice)."""
    # Two policies that differ only in ways their parameters do not keep (GCRA(10, 1) and
    # GCRA(10, 1, burst=10)) share a state key: both would be decided on the old state and
    # the second write would undo the first, so the comparison is on the key, not the policy.
    if len(hits) == 1:  # the common case: nothing can repeat
        cost = hits[0][2]
        if cost.__class__ is int and cost >= 1:  # not a bool: its class is bool
            return
    seen: set[tuple[str, str]] = set()
    for identity, policy, cost in hits:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ConfigurationError(f"The cost of a hit must be a whole number of at least 1, got {cost!r}.")
        if len(hits) > 1:
            state = (identity, policy.key_suffix)
            if state in seen:
                raise ConfigurationError(
                    f"{policy!r} appears twice for one key in a single hit (or with another policy of the same state)."
                )
            seen.add(state)


def check_charges(hits: Sequence[Hit]) -> None:
    """check_hits() for a charge, whose cost may also be below 0: a refund (of an estimate spent up front)."""
    check_hits(
        [(identity, policy, -cost if cost.__class__ is int and cost < 0 else cost) for identity, policy, cost in hits]
    )


def decisions_from_flat(hits: Sequence[Hit], flat: Sequence[int]) -> list[Decision]:
    """Turn the scripts' flat reply (allowed, retry_us, remaining, reset_us per entry) into Decisions."""
    values = iter(flat)
    # zip over one iterator takes the reply four values at a time.
    return [
        decision_from_reply(policy, allowed, retry_us, remaining, reset_us)
        for (_, policy, _), allowed, retry_us, remaining, reset_us in zip(
            hits, values, values, values, values, strict=True
        )
    ]


def decision_from_reply(policy: Policy, allowed: int, retry_us: int, remaining: int, reset_us: int) -> Decision:
    """One entry of a script's reply as a Decision (retry_us -1 means never)."""
    # Built in one step, as new_decision() does, without a call: this runs for every decision.
    return _new_tuple(
        Decision,
        (
            allowed == 1,
            policy.quota,
            remaining if remaining > 0 else 0,
            math.inf if retry_us < 0 else retry_us / MICROS,
            reset_us / MICROS if reset_us > 0 else 0.0,
            policy,
        ),
    )
