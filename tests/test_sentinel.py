"""RedisBackend behind Redis Sentinel: one primary, one replica and one sentinel on free loopback ports.

The backend is built with RedisBackend.from_sentinel, decides, then SENTINEL FAILOVER swaps the
primary and the replica; decisions continue on the new primary, with the state replicated to it.
Every process started here is stopped afterwards.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis as sync_redis
from conftest import RedisProcess, _missing, free_port

from asgi_ratelimit import BackendError, FixedWindow, RedisBackend

pytestmark = pytest.mark.redis

SERVICE = "mymaster"


@dataclass
class SentinelSetup:
    primary: RedisProcess
    replica: RedisProcess
    sentinel_port: int

    def primary_port(self) -> int:
        with sync_redis.Redis(port=self.sentinel_port, socket_timeout=1) as sentinel:
            _host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)


def _wait(condition: Callable[[], bool], message: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.05)


def _replica_synced(port: int) -> bool:
    with sync_redis.Redis(port=port, socket_timeout=1) as client:
        info = client.info("replication")
    return info["role"] == "slave" and info.get("master_link_status") == "up"


def _sentinel_sees_replica(port: int) -> bool:
    try:
        with sync_redis.Redis(port=port, socket_timeout=1) as sentinel:
            return len(sentinel.sentinel_slaves(SERVICE)) == 1
    except sync_redis.RedisError:
        return False


@pytest.fixture
def sentinel_setup(redis_server_factory: Callable[..., RedisProcess], tmp_path: object) -> Iterator[SentinelSetup]:
    """A primary, its replica and a sentinel watching them (quorum 1), on free loopback ports."""
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("the redis-server binary is not installed (apt-get install redis-server)")
    primary = redis_server_factory()
    replica = redis_server_factory("--replicaof", "127.0.0.1", str(primary.port))
    _wait(lambda: _replica_synced(replica.port), "the replica did not sync")
    port = free_port()
    config = f"{tmp_path}/sentinel.conf"
    with open(config, "w", encoding="utf-8") as file:
        file.write(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary.port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 5000\n"
        )
    process = subprocess.Popen([binary, config, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _sentinel_sees_replica(port), "the sentinel did not discover the replica")
        yield SentinelSetup(primary, replica, port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


async def test_decisions_continue_across_a_sentinel_failover(sentinel_setup: SentinelSetup, key_prefix: str) -> None:
    backend = RedisBackend.from_sentinel([("127.0.0.1", sentinel_setup.sentinel_port)], SERVICE, prefix=key_prefix)
    policy = FixedWindow(10, 3600)
    try:
        assert [(await backend.hit("alice", [policy]))[0].remaining for _ in range(3)] == [9, 8, 7]
        old = sentinel_setup.primary_port()
        assert old == sentinel_setup.primary.port
        # Let the write reach the replica before the swap (SENTINEL FAILOVER waits for it too).
        _wait(lambda: _replicated(sentinel_setup.replica.port, key_prefix), "the state did not replicate")
        _wait(lambda: _failover_accepted(sentinel_setup.sentinel_port), "the sentinel refused to fail over")
        _wait(lambda: sentinel_setup.primary_port() == sentinel_setup.replica.port, "the sentinel did not fail over")
        # Until the sentinel turns the old primary into a replica, it still takes writes that the
        # resync then drops (asynchronous replication): wait for that, to test deterministic state.
        _wait(lambda: _role(old) == "slave", "the old primary did not become a replica")
        started = time.monotonic()
        # A pooled connection to the old primary now answers READONLY: redis-py drops it, and the
        # backend's one retry asks the sentinel for the new primary.
        remaining = None
        while remaining is None and time.monotonic() < started + 10:
            try:
                remaining = (await backend.hit("alice", [policy]))[0].remaining
            except BackendError:
                await asyncio.sleep(0.05)
        assert remaining == 6, "decided on the new primary, with the state it replicated"
        assert (await backend.hit("bob", [policy]))[0].remaining == 9
    finally:
        await backend.aclose()
    with sync_redis.Redis(port=sentinel_setup.replica.port) as new_primary:
        assert new_primary.info("replication")["role"] == "master"
        keys = list(new_primary.scan_iter(match=f"{key_prefix}*"))
        assert len(keys) == 2 and all(new_primary.pttl(key) > 0 for key in keys)


def _replicated(port: int, prefix: str) -> bool:
    with sync_redis.Redis(port=port, socket_timeout=1) as client:
        return any(True for _ in client.scan_iter(match=f"{prefix}*"))


def _failover_accepted(port: int) -> bool:
    """Ask for a failover; a sentinel that has not yet pinged the new replica enough answers NOGOODSLAVE."""
    with sync_redis.Redis(port=port, socket_timeout=1) as sentinel:
        try:
            sentinel.execute_command("SENTINEL FAILOVER", SERVICE)
        except sync_redis.ResponseError as exc:
            if "NOGOODSLAVE" in str(exc):
                return False
            raise
    return True


def _role(port: int) -> str:
    with sync_redis.Redis(port=port, socket_timeout=1) as client:
        return str(client.info("replication")["role"])
