"""The Backend protocol: what the middleware, the limiter and the service need from storage."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..errors import ConfigurationError
from ..policies import MICROS, Concurrency, Decision, Policy, new_decision

__all__ = [
    "LEDGER_CODE",
    "Backend",
    "Charged",
    "ChargingBackend",
    "Claim",
    "Hit",
    "charged_from_flat",
    "check_charges",
    "check_hits",
    "decision_from_reply",
    "decisions_from_flat",
    "new_token",
    "slot_decision",
]

#: One entry of a combined call: (identity, policy, cost).
Hit = tuple[str, Policy, int]


#: One concurrency limit a request claims a slot of: (identity, limit).
Claim = tuple[str, Concurrency]


@runtime_checkable
class Backend(Protocol):
    """Storage that decides hits atomically."""

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
    return new_decision(
        allowed == 1,
        policy.quota,
        remaining if remaining > 0 else 0,
        math.inf if retry_us < 0 else retry_us / MICROS,
        reset_us / MICROS if reset_us > 0 else 0.0,
        policy,
    )
