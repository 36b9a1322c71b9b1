"""MemoryBackend: the engine's algorithms in plain Python, for one process and no server.

Each function here mirrors its twin in ``lua/hit.lua`` line for line, including where the
Lua side computes in doubles, so that both backends give the same Decisions for the same
sequence of hits (tests/test_conformance.py holds them to it).

On the paths an allowed hit takes, max() and min() of two numbers are written as conditional
expressions: CPython 3.11's builtins parse keyword arguments on every call, which costs more than
the rest of the line.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from bisect import bisect_right, insort
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from .._keys import digest, ledger_key, slots_key, state_key
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
from .base import (
    Charged,
    Claim,
    Hit,
    charged_from_flat,
    check_charges,
    check_hits,
    decision_from_reply,
    slot_decision,
)

__all__ = ["MemoryBackend"]

logger = logging.getLogger("asgi_ratelimit")

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
        max_keys: the most keys kept at once (one per identity and policy, one per identity
            with a concurrency limit).  Expired keys are dropped as they are met.  At the cap,
            keys back to their full allowance go first (forgetting them changes no answer), then
            those with the fewest units consumed, so memory stays bounded under a flood of new
            identities while an exhausted key outlives it.  Evictions are counted in
            ``evictions`` (and the metric asgi_ratelimit_memory_evictions_total) and logged.
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
        # key -> (expires_at_us, state, eviction level), in write order, oldest first.  An OrderedDict, not a
        # dict: a dict's first item is found by scanning past the slots its deletions left at the
        # front, so evicting at the cap under a flood cost time in proportion to the cap.
        self._store: OrderedDict[str, tuple[int, Any, int]] = OrderedDict()
        self._writes_to_sweep = _SWEEP_EVERY  # writes left before the next sweep of expired keys
        # (identity, policy key suffix) -> state key: hashing the identity costs more than the
        # decision itself.  Bounded: emptied whenever it reaches the key cap.
        self._keys: dict[tuple[str, str], str] = {}
        #: Keys dropped at the cap, by kind: "at_rest" (back to full: no answer changes) and "live".
        self.evictions: dict[str, int] = {"at_rest": 0, "live": 0}
        self._buckets: dict[int, OrderedDict[str, None]] = {}  # eviction level -> keys, oldest first
        self._levels: list[int] = []  # a heap of the buckets' levels (and of some emptied since)
        self._evicted_unlogged = 0
        self._last_eviction_log = -math.inf

    #: submit() decides at once: the Limiter waits on no task and no timer.
    in_process = True
    real_time = True

    def __len__(self) -> int:
        return len(self._store)

    def _decide(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> list[Decision]:
        """Decide ``hits`` and take a slot named ``token`` of every claim, or nothing at all (as hit.lua).

        Decided at once, without a coroutine, as nothing here waits on I/O; atomic because it never awaits.
        """
        now = time.time_ns() // 1000 if self._system_clock else self._clock()  # as system_clock_us()
        if len(hits) == 1 and not claims:  # the common case: one policy decides and writes in one step
            identity, policy, cost = hits[0]
            if cost.__class__ is not int or cost < 1:  # a bool's class is bool: refused too
                check_hits(hits)  # raises, naming the bad cost
            key = self._keys.get((identity, policy.key_suffix)) or self._key(identity, policy)  # no call when known
            allowed, retry, remaining, reset = _ALGORITHMS[policy.code](self, key, now, cost, policy, True)
            return [decision_from_reply(policy, allowed, retry, remaining, reset)]
        # Every entry and slot is decided before any is written, as in hit.lua, so a denied hit takes
        # nothing.  Nothing changes in between, so the committing pass allows too.
        check_hits(hits)
        keys = [self._key(identity, policy) for identity, policy, _ in hits]
        names = [slots_key(self.prefix, digest(identity)) for identity, _ in claims]
        replies = [
            _ALGORITHMS[policy.code](self, key, now, cost, policy, False)
            for key, (_, policy, cost) in zip(keys, hits, strict=True)
        ]
        slot_replies = [
            self._slot(name, now, limit, token, False) for name, (_, limit) in zip(names, claims, strict=True)
        ]
        if all(reply[0] for reply in replies) and all(reply[0] for reply in slot_replies):
            replies = [
                _ALGORITHMS[policy.code](self, key, now, cost, policy, True)
                for key, (_, policy, cost) in zip(keys, hits, strict=True)
            ]
            slot_replies = [
                self._slot(name, now, limit, token, True) for name, (_, limit) in zip(names, claims, strict=True)
            ]
        return [decision_from_reply(policy, *reply) for (_, policy, _), reply in zip(hits, replies, strict=True)] + [
            slot_decision(limit, *reply) for (_, limit), reply in zip(claims, slot_replies, strict=True)
        ]

    #: What the Limiter calls: _decide() itself, with no coroutine and no extra call.  A subclass that
    #: changes decisions overrides submit(); hit(), hit_many() and acquire() keep deciding through _decide().
    submit = _decide

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        """Take ``cost`` units from every policy of ``key``, or from none; one Decision per policy."""
        return self._decide([(key, policy, cost) for policy in policies], (), "")

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide several (identity, policy, cost) entries as one hit: all taken, or none."""
        return self._decide(hits, (), "")

    async def acquire(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> list[Decision]:
        """Decide ``hits`` and take a slot named ``token`` of every claim, or nothing at all (as hit.lua)."""
        return self._decide(hits, claims, token)

    async def check(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide ``hits`` without taking anything (hit.lua's "check" mode)."""
        return self.check_now(hits)

    def check_now(self, hits: Sequence[Hit]) -> list[Decision]:
        """The synchronous core of check."""
        now = self._clock()
        check_hits(hits)
        return [
            decision_from_reply(
                policy, *_ALGORITHMS[policy.code](self, self._key(identity, policy), now, cost, policy, False)
            )
            for identity, policy, cost in hits
        ]

    async def charge(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        """Take every hit's cost, even into debt, once per ``token`` (hit.lua's "charge" mode)."""
        return self.charge_now(hits, token, remember_us)

    def charge_now(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        """The synchronous core of charge: the ledger of the first identity remembers the token, as on Redis.

        An empty token is remembered nowhere (hit.lua does the same): the middleware's charges here are
        made once, at once, and never retried.
        """
        now = self._clock()
        check_charges(hits)
        if not hits:
            return [], 0
        fresh = True
        ledger_name = ""
        ledger: _Ledger | None = None
        if token:
            ledger_name = ledger_key(self.prefix, digest(hits[0][0]))
            ledger = self._get(ledger_name, now)
            if ledger is None:
                ledger = _Ledger({}, [])
            else:
                ledger.forget(now)
            fresh = token not in ledger.ends
        flat: list[int] = []
        for identity, policy, cost in hits:
            key = self._key(identity, policy)
            decide = _ALGORITHMS[policy.code]
            if fresh:
                decide(self, key, now, cost, policy, True, True)
            flat += decide(self, key, now, 1, policy, False)
        if fresh and ledger is not None:
            ledger.add(token, now + remember_us)
            entry = self._store.get(ledger_name)
            kept_us = entry[0] - now if entry is not None and entry[0] - now > remember_us else remember_us
            # Level 0: forgetting a ledger changes no answer unless a charge is sent again.
            self._set(ledger_name, ledger, now, kept_us, 0)
        return charged_from_flat(hits, flat)

    async def release(self, claims: Sequence[Claim], token: str) -> None:
        """Give back the slots named ``token``.

        No tombstone is kept, unlike release.lua: an acquire here is decided the moment it is
        called, so none can still be on its way when its request gives up.
        """
        store = self._store
        for identity, _ in claims:
            key = slots_key(self.prefix, digest(identity))
            entry = store.get(key)
            if entry is not None and entry[1].pop(token, None) is not None:
                # One slot fewer: the key moves down a bucket (to 0, at rest, with none left).
                level = len(entry[1]).bit_length()
                if level != entry[2]:
                    store[key] = (entry[0], entry[1], level)  # keeps its place in write order
                    self._unbucket(key, entry[2])
                    self._bucket(key, level)

    async def reset(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget ``key``'s state under each of ``policies``: its next hit finds a full allowance."""
        hashed = digest(key)
        for policy in policies:
            name = state_key(self.prefix, hashed, policy)
            entry = self._store.get(name)
            if entry is not None:
                self._drop(name, entry[2])  # out of its eviction bucket too

    async def ping(self) -> None:
        """Always answers: the state lives in this process."""

    async def aclose(self) -> None:
        """Drop all state."""
        self._store.clear()
        self._buckets.clear()
        self._levels.clear()

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
            self._drop(key, entry[2])
            return None
        return entry[1]

    def _set(self, key: str, state: Any, now: int, ttl_from_now_us: int, units: int) -> None:
        """Store ``state`` until it is back to full; ``units`` are those it has consumed (what forgetting it costs)."""
        store = self._store
        old = store.get(key)
        level = units.bit_length()  # see _evict: 0 for none, 1 for one, 2 for two or three, 3 for 4 to 7...
        # The TTL hit.lua sets: whole milliseconds, rounded up (in integers: no float division), at least 1.
        ttl_ms = -(-ttl_from_now_us // 1000)
        store[key] = (now + (ttl_ms if ttl_ms > 1 else 1) * 1000, state, level)
        # The front holds the least recently written.
        store.move_to_end(key)
        if old is None:
            self._bucket(key, level)
        elif old[2] != level:  # a key's level changes a few times in its life, not at every hit
            self._unbucket(key, old[2])
            self._bucket(key, level)
        self._writes_to_sweep -= 1
        if not self._writes_to_sweep:
            self._writes_to_sweep = _SWEEP_EVERY
            self._sweep(now)
        if len(store) > self.max_keys:  # one key was added at most
            self._evict(now)

    def _sweep(self, now: int, budget: int = 512) -> None:
        """Drop expired keys among the least recently written ones."""
        expired = [(key, entry[2]) for key, entry in islice(self._store.items(), budget) if entry[0] <= now]
        for key, level in expired:
            self._drop(key, level)

    def _drop(self, key: str, level: int) -> None:
        del self._store[key]
        self._unbucket(key, level)

    def _bucket(self, key: str, level: int) -> None:
        bucket = self._buckets.get(level)
        if bucket is None:
            bucket = self._buckets[level] = OrderedDict()
            heapq.heappush(self._levels, level)
        bucket[key] = None

    def _unbucket(self, key: str, level: int) -> None:
        bucket = self._buckets[level]
        del bucket[key]
        if not bucket:
            del self._buckets[level]  # it leaves the heap when it reaches the top

    # -- eviction at max_keys ------------------------------------------------------------
    #
    # Every key sits in the bucket of its level: the number of binary digits of the units it has
    # consumed (a slots key: of its slots taken), so 0 for none, 1 for one, 2 for two or three,
    # 3 for four to seven...  A heap holds the levels, so the key whose loss admits the fewest
    # extra requests is found without a scan: the oldest key of the lowest level.  Levels, not
    # units: a key changes level a few times in its life, not at every hit, so the hot path
    # rarely moves it between buckets.  Within a level the oldest goes first.

    def _evict(self, now: int) -> None:
        """Drop one key, the one whose loss costs the fewest extra admissions (the store is one over max_keys).

        A key back to full goes first (forgetting it changes no answer): the least recently
        written one if it has expired (where expired keys gather), else one of level 0.  Then the
        oldest key of the lowest level (the fewest units consumed, within a factor of two): an
        exhausted key outlives any flood of fresh ones.
        """
        store = self._store
        oldest = next(iter(store))  # an OrderedDict finds its first key at once
        entry = store[oldest]
        if entry[0] <= now:
            self._drop(oldest, entry[2])
            self.evictions["at_rest"] += 1
            return
        levels = self._levels
        buckets = self._buckets
        while levels[0] not in buckets:
            heapq.heappop(levels)
        level = levels[0]
        bucket = buckets[level]
        key, _ = bucket.popitem(last=False)
        if not bucket:
            del buckets[level]
        expires = store.pop(key)[0]
        if level == 0 or expires <= now:
            self.evictions["at_rest"] += 1
            return
        self.evictions["live"] += 1
        self._evicted_unlogged += 1
        if self._evicted_unlogged & 1023 == 1:  # the clock is read on the first and every 1024th
            self._log_evictions()

    def _log_evictions(self) -> None:
        clock = time.monotonic()
        if clock - self._last_eviction_log < _EVICTION_LOG_INTERVAL:
            return
        logger.warning(
            "asgi_ratelimit: MemoryBackend is at max_keys=%d: %d keys in use were evicted since the last "
            "report (the fewest units consumed first); their identities start over from a full allowance",
            self.max_keys,
            self._evicted_unlogged,
        )
        self._last_eviction_log = clock
        self._evicted_unlogged = 0

    # -- the algorithms, mirroring hit.lua ---------------------------------------------

    def _token_bucket(self, key: str, now: int, cost: int, policy: Policy, commit: bool, force: bool = False) -> Reply:
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
        if need > full and not force:
            return 0, -1, remaining, reset
        if tokens < need and not force:
            return 0, stamp + _refill_time(need - stored, rate) - now, remaining, reset
        if not commit:
            return 1, 0, remaining, reset
        left = tokens - need
        if left > full:
            left = full  # a refund fills the bucket no further than full, as hit.lua
        reset_after = _refill_time(full - left, rate)
        self._set(key, (left, now), now, reset_after, capacity - left // SCALE)
        return 1, 0, left // SCALE, reset_after

    def _sliding_window(
        self, key: str, now: int, cost: int, policy: Policy, commit: bool, force: bool = False
    ) -> Reply:
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
        if force and cost > limit:
            cost = limit  # as hit.lua: `limit` units at `now` refuse the key until they expire, as more would
        elif force and cost < 0:
            cost = 0  # a refund: the log keeps what was spent, as hit.lua
        if cost > limit:
            return 0, -1, limit - count, reset
        if count + cost > limit and not force:
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
        self._set(key, kept, now, window, count + cost)
        return 1, 0, limit - count - cost, window

    def _gcra(self, key: str, now: int, cost: int, policy: Policy, commit: bool, force: bool = False) -> Reply:
        interval, burst = policy.numbers
        stored = self._get(key, now)
        tat = stored if stored is not None and stored > now else now
        tolerance = burst * interval
        available = math.floor((tolerance - (tat - now)) / interval)
        if cost > burst and not force:
            return 0, -1, available, tat - now
        new_tat = tat + cost * interval
        if new_tat < now:
            new_tat = now  # a refund gives back no more than a full allowance
        if new_tat - now > tolerance and not force:
            return 0, new_tat - now - tolerance, available, tat - now
        if not commit:
            return 1, 0, available, tat - now
        reset = new_tat - now
        left = math.floor((tolerance - reset) / interval)
        self._set(key, new_tat, now, reset, burst - left)
        return 1, 0, left, reset

    def _fixed_window(self, key: str, now: int, cost: int, policy: Policy, commit: bool, force: bool = False) -> Reply:
        limit, window = policy.numbers
        index = _window_index(now, window)
        state = self._get(key, now)
        count = state[1] if state is not None and state[0] == index else 0
        ends = (index + 1) * window - now
        reset = ends if count > 0 else 0
        if cost > limit and not force:
            return 0, -1, limit - count, reset
        if count + cost > limit and not force:
            return 0, ends, limit - count, reset
        if not commit:
            return 1, 0, limit - count, reset
        after = count + cost if count + cost > 0 else 0  # a refund takes the count down to 0 at most
        self._set(key, (index, after), now, ends, after)
        return 1, 0, limit - after, ends

    def _window_counter(
        self, key: str, now: int, cost: int, policy: Policy, commit: bool, force: bool = False
    ) -> Reply:
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
        if cost > limit and not force:
            return 0, -1, remaining, reset
        if weighted + current + cost > limit and not force:
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
        after = current + cost if current + cost > 0 else 0  # a refund takes the count down to 0 at most
        reset_after = 2 * window - elapsed
        left = math.floor(limit - weighted - after)
        left = left if left > 0 else 0
        self._set(key, (index, after, previous), now, reset_after, limit - left)
        return 1, 0, left, reset_after

    def _slot(self, key: str, now: int, limit: Concurrency, token: str, commit: bool) -> tuple[int, int, int]:
        """(allowed, retry_us, remaining) for one concurrency slot, as the concurrency entry of hit.lua."""
        slots: dict[str, int] | None = self._get(key, now)
        if slots is None:
            slots = {}
        else:
            for expired in [name for name, ends in slots.items() if ends <= now]:
                del slots[expired]
        in_use = len(slots)
        if in_use >= limit.limit:
            oldest = min(slots.values())
            return 0, max(1, min(_SLOT_RETRY, oldest - now)), 0
        if not commit:
            return 1, 0, limit.limit - in_use
        slots[token] = now + limit.timeout_us
        self._set(key, slots, now, limit.timeout_us, len(slots))
        return 1, 0, limit.limit - in_use - 1


@dataclass
class _Ledger:
    """The tokens of the charges one identity has taken, with when each is forgotten (hit.lua's sorted set)."""

    ends: dict[str, int]  # token -> forgotten at (us)
    heap: list[tuple[int, str]]  # (forgotten at, token): the next to forget on top, found without a scan

    def add(self, token: str, ends: int) -> None:
        self.ends[token] = ends
        heapq.heappush(self.heap, (ends, token))

    def forget(self, now: int) -> None:
        """Drop the tokens whose time has come (as ZREMRANGEBYSCORE -inf now)."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, token = heapq.heappop(heap)
            if self.ends.get(token, now + 1) <= now:
                del self.ends[token]


_SLOT_RETRY = 1_000_000  # the most a refused slot tells a client to wait (us), as in hit.lua
_EVICTION_LOG_INTERVAL = 10.0  # seconds between two log lines about evictions


class _Algorithm(Protocol):
    def __call__(
        self,
        backend: MemoryBackend,
        key: str,
        now: int,
        cost: int,
        policy: Policy,
        commit: bool,
        force: bool = False,
        /,
    ) -> Reply: ...


_ALGORITHMS: dict[int, _Algorithm] = {
    TOKEN_BUCKET: MemoryBackend._token_bucket,
    SLIDING_WINDOW: MemoryBackend._sliding_window,
    GCRA_CODE: MemoryBackend._gcra,
    FIXED_WINDOW: MemoryBackend._fixed_window,
    SLIDING_WINDOW_COUNTER: MemoryBackend._window_counter,
}
