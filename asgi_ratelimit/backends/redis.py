"""RedisBackend: every hit is one EVALSHA of ``lua/hit.lua`` on redis.asyncio (Redis, Cluster or Sentinel)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from functools import partial
from importlib.resources import files
from typing import Any, Literal

import redis
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._keys import digest, ledger_key, slots_key, state_key
from ..errors import BackendError, ConfigurationError
from ..policies import Concurrency, Decision, Policy
from ._coalesce import ScriptCaller
from .base import (
    LEDGER_CODE,
    Charged,
    Claim,
    Hit,
    Outcome,
    charged_from_flat,
    check_charges,
    check_hits,
    decision_from_reply,
    decisions_from_flat,
    slot_decision,
)
from .memory import system_clock_us

logger = logging.getLogger("asgi_ratelimit")

__all__ = ["RedisBackend"]

#: One entry of a script call: a rate-limit hit, or a concurrency claim (cost 1).
Entry = tuple[str, Policy | Concurrency, int]

_COSTS = [str(cost).encode() for cost in range(64)]  # the common costs, encoded once

HIT_SCRIPT = files(__package__).joinpath("lua/hit.lua").read_text(encoding="utf-8")
RELEASE_SCRIPT = files(__package__).joinpath("lua/release.lua").read_text(encoding="utf-8")

# redis-py defaults both socket timeouts to 5 s; a limiter's budget is tens of milliseconds,
# and a frozen Redis must not hold a connection for seconds: a cancelled redis-py call can wait out the
# socket's whole timeout before it lets go.
DEFAULT_SOCKET_TIMEOUT = 0.5


class RedisBackend:
    """Storage on Redis (or Redis Cluster): atomic Lua scripts, one round trip per hit.

    Args:
        client: a ``redis.asyncio.Redis`` (or ``RedisCluster``) client.
        prefix: prepended to every key, e.g. to share one Redis between applications.
        clock: ``"server"`` (default) takes the time from Redis's TIME inside the script, so
            every application server agrees.  ``"client"`` sends this process's clock instead,
            for managed services that reject TIME in scripts: servers whose clocks disagree
            then disagree on the limits too.  A callable returning integer microseconds is
            used as the client clock (tests inject one).
        coalesce: send hits issued while a round trip is in flight together, as one pipeline
            (default True; ignored on Redis Cluster, where pipelines cannot carry scripts).
            Every hit is still its own atomic script run: no decision changes.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "rl:",
        clock: Literal["server", "client"] | Callable[[], int] = "server",
        coalesce: bool = True,
    ) -> None:
        if clock == "server":
            self._clock: Callable[[], int] | None = None
        elif clock == "client":
            self._clock = system_clock_us
        elif callable(clock):
            self._clock = clock
        else:
            raise ConfigurationError(f'RedisBackend: clock must be "server", "client" or a callable, got {clock!r}.')
        # An injected clock need not move with real time; the limiter's deny cache relies on it doing so.
        self.real_time = not callable(clock)
        self.in_process = False
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"RedisBackend: prefix must be a string without braces, got {prefix!r}.")
        self.client = client
        self.prefix = prefix
        self.cluster = _is_cluster(client)
        wire = not self.cluster and hasattr(client, "connection_pool")
        self._call = ScriptCaller(client, HIT_SCRIPT, coalesce=coalesce and not self.cluster, wire=wire)
        self._release = ScriptCaller(client, RELEASE_SCRIPT, coalesce=coalesce and not self.cluster, wire=wire)
        # Set once the client is initialised and the script loaded (see _initialise).
        self._initialised = False
        self._initialising: asyncio.Task[None] | None = None
        self._sentinels: list[Any] = []  # clients of the sentinels, when built by from_sentinel
        # redis-py's RedisCluster fails a command at once (MaxConnectionsError) when a node's pool
        # is exhausted, and without pipelines every call in flight holds a connection: wait for a
        # free one instead.  One bound for the whole client, so no node's pool can run out.
        self._in_flight: asyncio.Semaphore | None = None
        if self.cluster:
            self._in_flight = asyncio.Semaphore(_max_connections(client))
            if _closes_all_on_timeout(redis.__version__):
                logger.warning(
                    "RedisBackend: redis-py %s closes all the connections of a RedisCluster client, in use or "
                    "not, when one command times out or loses its connection; a decision in flight on another "
                    "node can then fail inside redis-py.  redis-py 7.2 and later close only the failed connection "
                    "(pip install 'redis>=7.2').",
                    redis.__version__,
                )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        cluster: bool = False,
        prefix: str = "rl:",
        clock: Literal["server", "client"] | Callable[[], int] = "server",
        coalesce: bool = True,
        **kwargs: Any,
    ) -> RedisBackend:
        """Build the client from a ``redis://`` URL (a RedisCluster when ``cluster=True``).

        Other keyword arguments go to redis-py.  Socket timeouts default to 0.5 s rather than
        redis-py's 5 s, so a frozen Redis cannot hold a connection for long.
        """
        kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
        kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT)
        # A pooled connection goes stale when Redis restarts (or a proxy drops idle ones): retry
        # once, at once, on a fresh connection.  Timeouts are not retried: they have spent the
        # request's budget already.  A replayed hit can only be counted twice, never admitted twice.
        kwargs.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)))
        client: Any
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            client = RedisCluster.from_url(url, **kwargs)
        else:
            client = Redis.from_url(url, **kwargs)
        return cls(client, prefix=prefix, clock=clock, coalesce=coalesce)

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        prefix: str = "rl:",
        clock: Literal["server", "client"] | Callable[[], int] = "server",
        coalesce: bool = True,
        sentinel_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RedisBackend:
        """Build a client for the primary that Redis Sentinel names for ``service_name``; follows failovers.

        ``sentinels`` are (host, port) pairs; ``sentinel_kwargs`` go to the connections to the
        sentinels (e.g. their password), other keyword arguments to the connections to Redis.
        The same defaults as ``from_url`` apply: 0.5 s socket timeouts and one immediate retry
        on a connection error, which is what carries a hit over to the new primary.
        """
        from redis.asyncio.sentinel import Sentinel

        kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
        kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT)
        kwargs.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,)))
        sentinel_kwargs = dict(sentinel_kwargs or {})
        sentinel_kwargs.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
        sentinel_kwargs.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT)
        sentinel = Sentinel(list(sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call,unused-ignore]
        backend = cls(sentinel.master_for(service_name), prefix=prefix, clock=clock, coalesce=coalesce)
        backend._sentinels = list(sentinel.sentinels)  # their connections are ours to close
        return backend

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        """Take ``cost`` units from every policy of ``key``, or from none; one Decision per policy."""
        return await self.hit_many([(key, policy, cost) for policy in policies])

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide several (identity, policy, cost) entries as one hit: all taken, or none."""
        check_hits(hits)
        if not hits:
            # Nothing to decide; some proxies reject a script call without keys.
            return []
        if not self._initialised:
            await self._ready()
        if self._in_flight is None:
            return await self._decide(hits)
        if len({identity for identity, _, _ in hits}) > 1:
            return await self._hit_across_slots(hits)
        async with self._in_flight:
            return await self._decide(hits)

    def submit(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> Outcome:
        """Start acquire(hits, claims, token) for a caller with a time budget (the Limiter), without awaiting.

        On one Redis, once initialised, rate limits alone: the future of the Decisions (it fails with
        redis-py's own errors), which the round trip's own task completes; the caller may stop waiting
        on it at any moment.  Otherwise (slots to claim, a cluster, the first call, nothing to decide)
        the acquire() coroutine, for the caller to run.
        """
        if claims or not self._initialised or self._in_flight is not None or not hits:
            return self.acquire(hits, claims, token)
        check_hits(hits)
        return self._call.submit(len(hits), *self._script_args(hits), transform=partial(decisions_from_flat, hits))

    async def _decide(self, hits: Sequence[Hit]) -> list[Decision]:
        """One script call for hits whose keys share a slot (always so on a single Redis)."""
        try:
            flat = await self._call(len(hits), *self._script_args(hits))
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to decide a hit: {type(exc).__name__}: {exc}") from exc
        return decisions_from_flat(hits, flat)

    async def _hit_across_slots(self, hits: Sequence[Hit]) -> list[Decision]:
        """On a cluster, each identity's keys live in their own slot: one call per identity, all at once.

        Each identity's policies stay all-or-nothing; across identities (two rules keyed on the IP
        and on the API key) the calls are independent, as no script can span two slots.
        """
        groups: dict[str, list[int]] = {}
        for index, (identity, _, _) in enumerate(hits):
            groups.setdefault(identity, []).append(index)
        parts = await asyncio.gather(*(self.hit_many([hits[i] for i in indexes]) for indexes in groups.values()))
        decisions: list[Decision | None] = [None] * len(hits)
        for indexes, part in zip(groups.values(), parts, strict=True):
            for index, decision in zip(indexes, part, strict=True):
                decisions[index] = decision
        return [decision for decision in decisions if decision is not None]

    async def _ready(self) -> None:
        """Initialise the client and load the script once, before the first decision.

        A fresh RedisCluster hit by many concurrent commands before it has initialised failed
        intermittently inside redis-py: every first hit waits here for one
        shared initialisation instead.  It runs as a task of its own, so a request that gives
        up at its budget (the limiter cancels it) does not cut the initialisation short for the
        requests behind it; if it fails, the next hit starts another.
        """
        task = self._initialising
        if task is None:
            task = self._initialising = asyncio.get_running_loop().create_task(self._initialise())
            task.add_done_callback(self._initialised_or_not)
        try:
            await asyncio.shield(task)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to initialise: {type(exc).__name__}: {exc}") from exc

    async def _initialise(self) -> None:
        if self.cluster:
            await self.client.initialize()
        # On a cluster redis-py sends SCRIPT LOAD to every primary.  A primary that loses the
        # script later (a promoted replica, SCRIPT FLUSH) answers NOSCRIPT, and ScriptCaller reloads.
        await self.client.script_load(HIT_SCRIPT)

    def _initialised_or_not(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._initialised = True
        else:
            self._initialising = None  # the next hit tries again

    def _script_args(self, hits: Sequence[Hit]) -> list[bytes | str | int]:
        """KEYS then ARGV for hit.lua (see the contract at the top of the script).

        Arguments go out as bytes where they can: redis-py then sends them without encoding each.
        """
        keys, args, _ = self._keys_and_args(hits)
        keys += args
        return keys

    def _keys_and_args(
        self, hits: Sequence[Hit]
    ) -> tuple[list[bytes | str | int], list[bytes | str | int], dict[str, str]]:
        """hit.lua's KEYS and ARGV for ``hits`` (the clock, then four values per hit), and each identity's digest."""
        keys: list[bytes | str | int] = []
        args: list[bytes | str | int] = [b"" if self._clock is None else self._clock()]
        digests: dict[str, str] = {}
        for identity, policy, cost in hits:
            hashed = digests.get(identity)
            if hashed is None:
                hashed = digests[identity] = digest(identity)
            keys.append(state_key(self.prefix, hashed, policy).encode())
            code, p1, p2 = policy.script_args
            args += (code, _COSTS[cost] if 0 <= cost < len(_COSTS) else cost, p1, p2)
        return keys, args, digests

    async def acquire(self, hits: Sequence[Hit], claims: Sequence[Claim], token: str) -> list[Decision]:
        """Decide ``hits`` and take a slot named ``token`` of every claim in one script call, or nothing at all.

        One Decision per hit, then one per claim.  On a cluster each identity's hits and claims are
        one call (its keys share a hash slot), as in hit_many.
        """
        check_hits(hits)
        if not claims:
            return await self.hit_many(hits)
        if not self._initialised:
            await self._ready()
        entries: list[Entry] = [*hits, *((identity, limit, 1) for identity, limit in claims)]
        if self._in_flight is None:
            return await self._decide_entries(entries, token)
        groups: dict[str, list[int]] = {}
        for index, (identity, _, _) in enumerate(entries):
            groups.setdefault(identity, []).append(index)
        parts = await asyncio.gather(
            *(self._decide_in_slot([entries[i] for i in indexes], token) for indexes in groups.values())
        )
        decisions: list[Decision | None] = [None] * len(entries)
        for indexes, part in zip(groups.values(), parts, strict=True):
            for index, decision in zip(indexes, part, strict=True):
                decisions[index] = decision
        return [decision for decision in decisions if decision is not None]

    async def _decide_in_slot(self, entries: list[Entry], token: str) -> list[Decision]:
        assert self._in_flight is not None
        async with self._in_flight:
            return await self._decide_entries(entries, token)

    async def _decide_entries(self, entries: Sequence[Entry], token: str) -> list[Decision]:
        """One hit.lua call over rate-limit entries and concurrency slots alike."""
        keys: list[bytes | str | int] = []
        args: list[bytes | str | int] = [b"" if self._clock is None else self._clock()]
        digests: dict[str, str] = {}  # a rule's identity names its rate limits and its slot alike
        for identity, limit, cost in entries:
            hashed = digests.get(identity)
            if hashed is None:
                hashed = digests[identity] = digest(identity)
            if isinstance(limit, Concurrency):
                keys.append(slots_key(self.prefix, hashed).encode())
                args += (limit.code, 1, limit.limit, limit.timeout_us)
            else:
                keys.append(state_key(self.prefix, hashed, limit).encode())
                code, p1, p2 = limit.script_args
                args += (code, cost, p1, p2)
        args.append(token)
        try:
            flat = await self._call(len(keys), *keys, *args)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to decide a hit: {type(exc).__name__}: {exc}") from exc
        values = iter(flat)
        return [
            slot_decision(limit, allowed, retry_us, remaining)
            if isinstance(limit, Concurrency)
            else decision_from_reply(limit, allowed, retry_us, remaining, reset_us)
            for (_, limit, _), allowed, retry_us, remaining, reset_us in zip(
                entries, values, values, values, values, strict=True
            )
        ]

    async def check(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide ``hits`` without taking anything: one hit.lua call in "check" mode (one per identity on a cluster)."""
        return decisions_from_flat(hits, await self._in_mode(hits, b"check", "", 0))

    async def charge(self, hits: Sequence[Hit], token: str, remember_us: int) -> Charged:
        """Take every hit's cost, even into debt, once per ``token``: one hit.lua call in "charge" mode.

        The identity's ledger (of the first hit's identity; of each identity on a cluster) remembers
        the token for ``remember_us``, so the call sent again after a lost reply takes nothing more.
        """
        return charged_from_flat(hits, await self._in_mode(hits, b"charge", token, remember_us))

    async def _in_mode(self, hits: Sequence[Hit], mode: bytes, token: str, remember_us: int) -> list[int]:
        """The flat reply of hit.lua in ``mode`` for ``hits``, in their order."""
        if mode == b"charge":
            check_charges(hits)
        else:
            check_hits(hits)
        if not hits:
            return []
        if not self._initialised:
            await self._ready()
        if self._in_flight is None:
            return await self._flat_in_mode(hits, mode, token, remember_us)
        groups: dict[str, list[int]] = {}
        for index, (identity, _, _) in enumerate(hits):
            groups.setdefault(identity, []).append(index)
        parts = await asyncio.gather(
            *(self._flat_in_slot([hits[i] for i in indexes], mode, token, remember_us) for indexes in groups.values())
        )
        flat = [0] * (4 * len(hits))
        for indexes, part in zip(groups.values(), parts, strict=True):
            for place, index in enumerate(indexes):
                flat[4 * index : 4 * index + 4] = part[4 * place : 4 * place + 4]
        return flat

    async def _flat_in_slot(self, hits: Sequence[Hit], mode: bytes, token: str, remember_us: int) -> list[int]:
        assert self._in_flight is not None
        async with self._in_flight:
            return await self._flat_in_mode(hits, mode, token, remember_us)

    async def _flat_in_mode(self, hits: Sequence[Hit], mode: bytes, token: str, remember_us: int) -> list[int]:
        keys, args, digests = self._keys_and_args(hits)
        if mode == b"charge":
            keys.append(ledger_key(self.prefix, digests[hits[0][0]]).encode())
            args += (LEDGER_CODE, 1, remember_us, 0)
        args += (token, mode)
        try:
            flat: list[int] = await self._call(len(keys), *keys, *args)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to {mode.decode()} a hit: {type(exc).__name__}: {exc}") from exc
        return flat

    async def release(self, claims: Sequence[Claim], token: str) -> None:
        """Give back the slots named ``token``; one not taken yet is barred to a late acquire (release.lua)."""
        if not claims:
            return
        if not self._initialised:
            await self._ready()
        if self.cluster:  # each identity's slots key lives in its own hash slot
            await asyncio.gather(*(self._release_keys([claim], token) for claim in claims))
            return
        await self._release_keys(claims, token)

    async def _release_keys(self, claims: Sequence[Claim], token: str) -> None:
        keys = [slots_key(self.prefix, digest(identity)) for identity, _ in claims]
        now = b"" if self._clock is None else self._clock()
        try:
            await self._release(len(keys), *keys, now, token, *(limit.timeout_us for _, limit in claims))
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to release a slot: {type(exc).__name__}: {exc}") from exc

    async def reset(self, key: str, policies: Sequence[Policy]) -> None:
        """Forget ``key``'s state under each of ``policies`` (one DEL): its next hit finds a full allowance."""
        if not policies:
            return
        hashed = digest(key)
        # One identity's keys share a hash tag, so one DEL covers them on a cluster too.
        try:
            await self.client.delete(*(state_key(self.prefix, hashed, policy) for policy in policies))
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to reset a key: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Raise BackendError unless Redis answers PING."""
        try:
            await self.client.ping()
        except redis_errors.RedisError as exc:
            raise BackendError(f"Redis did not answer PING: {type(exc).__name__}: {exc}") from exc

    @property
    def round_trips(self) -> int:
        """Round trips that decided hits so far (a pipeline of coalesced hits counts once); releases not included."""
        return self._call.round_trips

    async def aclose(self) -> None:
        """Close the client's connections (and the sentinels', when built by from_sentinel)."""
        await self.client.aclose()
        for sentinel in self._sentinels:
            await sentinel.aclose()


def _max_connections(client: Any) -> int:
    """The size of each node's connection pool in a RedisCluster (redis-py's default is 100)."""
    limit = getattr(getattr(client, "nodes_manager", None), "connection_kwargs", {}).get("max_connections")
    return limit if isinstance(limit, int) and limit > 0 else 100


def _closes_all_on_timeout(version: str) -> bool:
    """Whether this redis-py's RedisCluster closes all its connections, in use or not, on one command's timeout.

    Before 7.2 it did, on a timeout or a connection error: a command in flight on another node, caught
    between connecting and sending, then failed with an AttributeError from inside redis-py.
    """
    numbers = re.match(r"(\d+)\.(\d+)", version)
    return numbers is not None and (int(numbers[1]), int(numbers[2])) < (7, 2)


def _is_cluster(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)
