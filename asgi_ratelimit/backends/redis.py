"""RedisBackend: every hit is one EVALSHA of ``lua/hit.lua`` on redis.asyncio."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any, Literal

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .._keys import digest, state_key
from ..errors import BackendError, ConfigurationError
from ..policies import Decision, Policy
from .base import Hit, check_hits, decisions_from_flat
from .memory import system_clock_us

__all__ = ["RedisBackend"]

HIT_SCRIPT = files(__package__).joinpath("lua/hit.lua").read_text(encoding="utf-8")

# redis-py defaults both socket timeouts to 5 s; a limiter's budget is tens of milliseconds,
# and a frozen Redis must not hold a connection for seconds (correctness rule 22).
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
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "rl:",
        clock: Literal["server", "client"] | Callable[[], int] = "server",
    ) -> None:
        if clock == "server":
            self._clock: Callable[[], int] | None = None
        elif clock == "client":
            self._clock = system_clock_us
        elif callable(clock):
            self._clock = clock
        else:
            raise ConfigurationError(f'RedisBackend: clock must be "server", "client" or a callable, got {clock!r}.')
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"RedisBackend: prefix must be a string without braces, got {prefix!r}.")
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(HIT_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, cluster: bool = False, prefix: str = "rl:", **kwargs: Any) -> RedisBackend:
        """Build the client from a ``redis://`` URL; keyword arguments go to redis-py."""
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
        return cls(client, prefix=prefix)

    async def hit(self, key: str, policies: Sequence[Policy], cost: int = 1) -> list[Decision]:
        """Take ``cost`` units from every policy of ``key``, or from none; one Decision per policy."""
        return await self.hit_many([(key, policy, cost) for policy in policies])

    async def hit_many(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decide several (identity, policy, cost) entries as one hit: all taken, or none."""
        check_hits(hits)
        if not hits:
            # Nothing to decide; some proxies reject a script call without keys.
            return []
        keys, args = self._script_call(hits)
        try:
            flat = await self._script(keys=keys, args=args)
        except (redis_errors.RedisError, redis_errors.RedisClusterException) as exc:
            raise BackendError(f"Redis failed to decide a hit: {type(exc).__name__}: {exc}") from exc
        return decisions_from_flat(hits, flat)

    def _script_call(self, hits: Sequence[Hit]) -> tuple[list[str], list[str | int]]:
        """KEYS and ARGV for hit.lua (see the contract at the top of the script)."""
        args: list[str | int] = ["" if self._clock is None else self._clock()]
        keys = []
        digests: dict[str, str] = {}
        for identity, policy, cost in hits:
            hashed = digests.get(identity)
            if hashed is None:
                hashed = digests[identity] = digest(identity)
            keys.append(state_key(self.prefix, hashed, policy))
            args += (policy.code, cost, *policy.params)
        return keys, args

    async def ping(self) -> None:
        """Raise BackendError unless Redis answers PING."""
        try:
            await self.client.ping()
        except redis_errors.RedisError as exc:
            raise BackendError(f"Redis did not answer PING: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()
