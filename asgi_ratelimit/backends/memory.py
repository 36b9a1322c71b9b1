"""MemoryBackend: the engine's algorithms in plain Python, for one process and no server.

Each function here mirrors its twin in ``lua/hit.lua`` line for line, including where the
Lua side computes in doubles, so that both backends give the same Decisions for the same
sequence of hits (tests/test_conformance.py holds them to it).

On the paths an allowed hit takes, max() and min() of two numbers are written as conditional
expressions: CPython 3.11's builtins parse keyword arguments on every call, which costs more than
the rest of the line.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any

from .._keys import digest, slots_key, state_key
from ..errors import ConfigurationError
from ..policies import (
    FIXED_WINDOW,
    GCRA_CODE,
    SLIDING_WINDOW,
    SLIDING_WINDOW_COUNTER,
    TOKEN_BUCKET,
    Concurrency,
    Decision,
    Policy,
)
from .base import Hit, Slot, check_hits, decision_from_reply, new_token

__all__ = ["MemoryBackend"]

SCALE = 1_000_000  # micro-tokens per token, as in hit.lua
_SWEEP_EVERY = 1024  # writes between two sweeps of expired keys

# (allowed, retry_us, remaining, reset_us): one entry of hit.lua's reply.  An algorithm called with
# commit=True writes the hit when it allows and answers with the state after it; with commit=False
# (or when it denies) it writes nothing and answers with the state before it.
Reply = tuple[int, int, int, int]


def _window_index(now: int, window: int) -> int:
    return now // window


def _refill_time(deficit: int, rate: float) -> int:
    """The fewest whole microseconds after which the refill, floor(elapsed * rate), reaches ``deficit``.

    Searched on the same double arithmetic as the refill (and as hit.lua): ceil(deficit / rate)
    alone can fall a microsecond short, or overshoot by one.
    """
    if deficit <= 0:
        return 0
    elapsed = math.ceil(deficit / rate)
    while math.floor(elapsed * rate) < deficit:
        elapsed += 1
    while elapsed > 0 and math.floor((elapsed - 1) * rate) >= deficit:
        elapsed -= 1
    return elapsed


def system_clock_us() -> int:
    """Wall-clock time in integer microseconds, the epoch Redis's TIME uses."""
    return time.time_ns() // 1000


class MemoryBackend:
    """In-process storage with the same answers as RedisBackend; the embedded default.

    Args:
        max_keys: the most keys kept at once.  Expired keys are dropped as they are met;
            when the cap is reached the least recently written key is evicted, so memory
            stays bounded under a flood of unique identities.
        prefix: the key prefix (kept for parity with RedisBackend).
        clock: a function returning the time in integer microseconds (tests inject one).
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        prefix: str = "rl:",
        clock: Callable[[], int] | None = None,
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError(f"MemoryBackend: max_keys must be a whole number above 0, got {max_keys!r}.")
        self.max_keys = max_keys
        self.prefix = prefix
        self._clock = clock or system_clock_us
        self._system_clock = clock is None  # then decide() reads it inline: one call less per decision
        # key -> (expires_at_us, state), in write order, oldest first.  An OrderedDict, not a
        # dict: a dict's first item is found by scanning past the slots its deletions left at the
        # front, so evicting at the cap under a flood cost time in proportion to the cap.
        self._store: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._writes_to_sweep = _SWEEP_EVERY  # writes left before the next sweep of expired keys
        # (identity, policy key suffix) -> state key: hashing the identity costs more than the
        # decision itself.  Bounded: emptied whenever it reaches the key cap.
        self._keys: dict[tuple[str, str], str] = {}

    def __len__(self) -> int:
        return len(self._store)

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        """Take ``cost`` units from every policy of ``key``, or from none; one Decision per policy."""
        return self.decide([(key, policy, cost) for policy in policies])

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide several (identity, policy, cost) entries as one hit: all taken, or none."""
        return self.decide(hits)

    async def acquire(self, key: str, limit: Concurrency) -> Slot:
        """Take one of ``limit.limit`` concurrency slots of ``key``, unless all are in use (mirrors acquire.lua)."""
        now = self._clock()
        name = slots_key(self.prefix, digest(key))
        slots: dict[str, int] = self._get(name, now) or {}
        for token in [token for token, expires in slots.items() if expires <= now]:
            del slots[token]
        if len(slots) >= limit.limit:
            return Slot(False, len(slots), "")
        token = new_token()
        slots[token] = now + limit.timeout_us
        self._set(name, slots, now, limit.timeout_us)
        return Slot(True, len(slots), token)

    async def release(self, key: str, token: str) -> None:
        """Give back the slot ``token`` of ``key``."""
        slots = self._store.get(slots_key(self.prefix, digest(key)))
        if slots is not None:
            slots[1].pop(token, None)

    async def reset(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget ``key``'s state under each of ``policies``: its next hit finds a full allowance."""
        hashed = digest(key)
        for policy in policies:
            self._store.pop(state_key(self.prefix, hashed, policy), None)

    async def ping(self) -> None:
        """Always answers: the state lives in this process."""

    async def aclose(self) -> None:
        """Drop all state."""
        self._store.clear()

    def decide(self, hits: Sequence[Hit]) -> list[Decision]:
        """The synchronous core of hit_many: atomic because it never awaits."""
        now = time.time_ns() // 1000 if self._system_clock else self._clock()  # as system_clock_us()
        if len(hits) == 1:  # the common case: one policy decides and writes in one step
            identity, policy, cost = hits[0]
            if cost.__class__ is not int or cost < 1:  # a bool's class is bool: refused too
                check_hits(hits)  # raises, naming the bad cost
            key = self._keys.get((identity, policy.key_suffix)) or self._key(identity, policy)  # no call when known
            allowed, retry, remaining, reset = _ALGORITHMS[policy.code](self, key, now, cost, policy, True)
            return [decision_from_reply(policy, allowed, retry, remaining, reset)]
        # Several policies: all are decided before any is written, as in hit.lua, so a denied hit
        # takes from none of them.  Nothing changes in between, so the committing pass allows too.
        check_hits(hits)
        keys = [self._key(identity, policy) for identity, policy, _ in hits]
        replies = [
            _ALGORITHMS[policy.code](self, key, now, cost, policy, False)
            for key, (_, policy, cost) in zip(keys, hits, strict=True)
        ]
        if all(reply[0] for reply in replies):
            replies = [
                _ALGORITHMS[policy.code](self, key, now, cost, policy, True)
                for key, (_, policy, cost) in zip(keys, hits, strict=True)
            ]
        return [decision_from_reply(policy, *reply) for (_, policy, _), reply in zip(hits, replies, strict=True)]

    # -- storage ---------------------------------------------------------------------

    def _key(self, identity: str, policy: Policy) -> str:
        """The state key of ``identity`` under ``policy``, as RedisBackend names it."""
        key = self._keys.get((identity, policy.key_suffix))
        if key is None:
            if len(self._keys) >= self.max_keys:
                self._keys.clear()
            key = self._keys[(identity, policy.key_suffix)] = state_key(self.prefix, digest(identity), policy)
        return key

    def _get(self, key: str, now: int) -> Any:
        entry = self._store.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._store[key]
            return None
        return entry[1]

    def _set(self, key: str, state: Any, now: int, ttl_from_now_us: int) -> None:
        store = self._store
        # The TTL hit.lua sets: whole milliseconds, rounded up (in integers: no float division), at least 1.
        ttl_ms = -(-ttl_from_now_us // 1000)
        store[key] = (now + (ttl_ms if ttl_ms > 1 else 1) * 1000, state)
        # The front holds the least recently written.
        store.move_to_end(key)
        self._writes_to_sweep -= 1
        if not self._writes_to_sweep:
            self._writes_to_sweep = _SWEEP_EVERY
            self._sweep(now)
        if len(store) > self.max_keys:  # one key was added at most
            store.popitem(last=False)

    def _sweep(self, now: int, budget: int = 512) -> None:
        """Drop expired keys among the least recently written ones."""
        store = self._store
        expired = [key for key, entry in islice(store.items(), budget) if entry[0] <= now]
        for key in expired:
            del store[key]

    # -- the algorithms, mirroring hit.lua ---------------------------------------------

    def _token_bucket(self, key: str, now: int, cost: int, policy: Policy, commit: bool) -> Reply:
        rate = float(policy.numbers[0])
        capacity = policy.numbers[1]
        full = capacity * SCALE
        state = self._get(key, now)
        stored, stamp = (full, now) if state is None else state
        tokens = stored
        if now > stamp:
            refilled = stored + math.floor((now - stamp) * rate)
            tokens = refilled if refilled < full else full
        need = cost * SCALE
        remaining = tokens // SCALE
        # Waits are counted from the stored stamp, as the refill is, so that they are exact.
        reset = stamp + _refill_time(full - stored, rate) - now if tokens < full else 0
        if need > full:
            return 0, -1, remaining, reset
        if tokens < need:
            return 0, stamp + _refill_time(need - stored, rate) - now, remaining, reset
        if not commit:
            return 1, 0, remaining, reset
        left = tokens - need
        reset_after = _refill_time(full - left, rate)
        self._set(key, (left, now), now, reset_after)
        return 1, 0, left // SCALE, reset_after

    def _sliding_window(self, key: str, now: int, cost: int, policy: Policy, commit: bool) -> Reply:
        limit, window = policy.numbers
        scores: list[int] | None = self._get(key, now)
        live_from = 0
        # The oldest entry still in the window means nothing expired: the search is skipped.
        if scores and scores[0] <= now - window:
            live_from = bisect_right(scores, now - window)
        count = 0 if scores is None else len(scores) - live_from
        reset = 0
        if scores and count > 0:
            newest_ends = scores[-1] + window - now
            reset = newest_ends if newest_ends > 0 else 0
        if cost > limit:
            return 0, -1, limit - count, reset
        if count + cost > limit:
            assert scores is not None
            nth = scores[live_from + count + cost - limit - 1]
            return 0, max(1, nth + window - now), limit - count, reset
        if not commit:
            return 1, 0, limit - count, reset
        kept = [] if scores is None else scores
        if live_from and live_from * 2 >= len(kept):
            # Expired entries go once they are half the log; until then the search skips them.  Dropping
            # them on every hit would shift the whole log each time: O(limit) per request.
            del kept[:live_from]
        if not kept or kept[-1] <= now:
            # The usual case: time moved forward, so the log stays sorted.
            if cost == 1:
                kept.append(now)
            else:
                kept += [now] * cost
        else:
            for _ in range(cost):  # the clock stepped back: keep the log sorted all the same
                insort(kept, now)
        self._set(key, kept, now, window)
        return 1, 0, limit - count - cost, window

    def _gcra(self, key: str, now: int, cost: int, policy: Policy, commit: bool) -> Reply:
        interval, burst = policy.numbers
        stored = self._get(key, now)
        tat = stored if stored is not None and stored > now else now
        tolerance = burst * interval
        available = math.floor((tolerance - (tat - now)) / interval)
        if cost > burst:
            return 0, -1, available, tat - now
        new_tat = tat + cost * interval
        if new_tat - now > tolerance:
            return 0, new_tat - now - tolerance, available, tat - now
        if not commit:
            return 1, 0, available, tat - now
        reset = new_tat - now
        self._set(key, new_tat, now, reset)
        return 1, 0, math.floor((tolerance - reset) / interval), reset

    def _fixed_window(self, key: str, now: int, cost: int, policy: Policy, commit: bool) -> Reply:
        limit, window = policy.numbers
        index = _window_index(now, window)
        state = self._get(key, now)
        count = state[1] if state is not None and state[0] == index else 0
        ends = (index + 1) * window - now
        reset = ends if count > 0 else 0
        if cost > limit:
            return 0, -1, limit - count, reset
        if count + cost > limit:
            return 0, ends, limit - count, reset
        if not commit:
            return 1, 0, limit - count, reset
        self._set(key, (index, count + cost), now, ends)
        return 1, 0, limit - count - cost, ends

    def _window_counter(self, key: str, now: int, cost: int, policy: Policy, commit: bool) -> Reply:
        limit, window = policy.numbers
        index = _window_index(now, window)
        elapsed = now - index * window
        state = self._get(key, now)
        current = previous = 0
        if state is not None:
            if state[0] == index:
                current, previous = state[1], state[2]
            elif state[0] == index - 1:
                previous = state[1]
        # Floats, in the order hit.lua computes them, so both round alike.
        weighted = float(previous) * float(window - elapsed) / float(window)
        reset = 2 * window - elapsed if current > 0 else (window - elapsed if previous > 0 else 0)
        remaining = math.floor(limit - weighted - current)
        remaining = remaining if remaining > 0 else 0
        if cost > limit:
            return 0, -1, remaining, reset
        if weighted + current + cost > limit:
            spare = limit - current - cost
            if spare >= 0:
                wait = math.ceil(window - float(spare) * float(window) / float(previous) - elapsed)
            else:
                wait = (
                    window - elapsed + max(0, math.ceil(window - float(limit - cost) * float(window) / float(current)))
                )
            return 0, max(1, wait), remaining, reset
        if not commit:
            return 1, 0, remaining, reset
        after = current + cost
        reset_after = 2 * window - elapsed
        self._set(key, (index, after, previous), now, reset_after)
        left = math.floor(limit - weighted - after)
        return 1, 0, left if left > 0 else 0, reset_after


_ALGORITHMS: dict[int, Callable[[MemoryBackend, str, int, int, Policy, bool], Reply]] = {
    TOKEN_BUCKET: MemoryBackend._token_bucket,
    SLIDING_WINDOW: MemoryBackend._sliding_window,
    GCRA_CODE: MemoryBackend._gcra,
    FIXED_WINDOW: MemoryBackend._fixed_window,
    SLIDING_WINDOW_COUNTER: MemoryBackend._window_counter,
}
