"""A real Redis Cluster for tests and benchmarks: N primaries (and replicas) on free loopback ports.

Started with redis-server processes and ``redis-cli --cluster create``, stopped (every process
it started, by PID) when the context ends.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import redis as sync_redis


def _free_ports(count: int) -> list[int]:
    """Free ports whose cluster bus port (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class RedisCluster:
    """The processes of a running cluster."""

    directory: str
    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.processes[port] = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"{self.directory}/nodes-{port}.conf",
                "--cluster-node-timeout",
                "2000",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_until(lambda: _ping(port), f"redis-server on port {port} did not start")

    def kill_node(self, port: int) -> None:
        """Kill one node abruptly (SIGKILL), as a crash would."""
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=5)

    def primaries(self) -> list[int]:
        """Ports of the nodes that are primaries right now."""
        result = []
        for port in self.processes:
            try:
                client = sync_redis.Redis(port=port, socket_timeout=1)
                if client.info("replication")["role"] == "master":
                    result.append(port)
                client.close()
            except sync_redis.RedisError:
                continue
        return result

    def keys_by_primary(self, pattern: str) -> dict[int, list[bytes]]:
        """Every key matching ``pattern`` (SCAN MATCH), on each node that is a primary right now."""
        found: dict[int, list[bytes]] = {}
        for port in self.primaries():
            client = sync_redis.Redis(port=port, socket_timeout=5)
            try:
                found[port] = list(client.scan_iter(match=pattern, count=1000))
            finally:
                client.close()
        return found

    def primary_for_slot(self, slot: int) -> int:
        """The port of the primary serving ``slot``, as the cluster itself says now."""
        for port in self.primaries():
            client = sync_redis.Redis(port=port, socket_timeout=1)
            try:
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        return int(primary[1])
            except sync_redis.RedisError:
                continue
            finally:
                client.close()
        raise LookupError(f"no live primary reports slot {slot}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.processes.clear()


def _ping(port: int) -> bool:
    try:
        client = sync_redis.Redis(port=port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except sync_redis.RedisError:
        return False


def _wait_until(condition: object, message: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.05)


def cluster_ok(port: int) -> bool:
    try:
        client = sync_redis.Redis(port=port, socket_timeout=1)
        try:
            info = client.execute_command("CLUSTER INFO")
        finally:
            client.close()
    except sync_redis.RedisError:
        return False
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO into a dict
        return info.get("cluster_state") == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


def _assign_slots_by_hand(ports: list[int]) -> None:
    bounds = [round(i * 16384 / len(ports)) for i in range(len(ports) + 1)]
    for index, port in enumerate(ports):
        client = sync_redis.Redis(port=port)
        try:
            client.execute_command("CLUSTER ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
            if index:
                client.execute_command("CLUSTER MEET", "127.0.0.1", ports[0])
        finally:
            client.close()


def _replicas_seen(port: int, primaries: int, replicas: int) -> bool:
    """Whether ``port`` lists every primary with its replicas in CLUSTER SLOTS, each replica's link up."""
    try:
        client = sync_redis.Redis(port=port, socket_timeout=1)
        try:
            ranges = client.execute_command("CLUSTER SLOTS")
            info = client.info("replication")
        finally:
            client.close()
    except sync_redis.RedisError:
        return False
    if info["role"] == "slave" and info.get("master_link_status") != "up":
        return False
    return len({int(r[2][1]) for r in ranges}) == primaries and all(len(r) - 3 == replicas for r in ranges)


@contextmanager
def redis_cluster(primaries: int = 3, replicas: int = 1) -> Iterator[RedisCluster]:
    """Start a cluster of ``primaries * (1 + replicas)`` nodes and yield it; always torn down."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        raise FileNotFoundError("redis-server and redis-cli are needed (apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="asgi-ratelimit-cluster-") as directory:
        cluster = RedisCluster(directory=directory, ports=_free_ports(primaries * (1 + replicas)))
        try:
            for port in cluster.ports:
                cluster.start_node(port)
            if primaries < 3 and replicas == 0:
                # redis-cli refuses a cluster of fewer than three primaries: split the slots by hand.
                _assign_slots_by_hand(cluster.ports)
            else:
                subprocess.run(
                    [
                        "redis-cli",
                        "--cluster",
                        "create",
                        *(f"127.0.0.1:{p}" for p in cluster.ports),
                        "--cluster-replicas",
                        str(replicas),
                        "--cluster-yes",
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    timeout=60,
                )
            for port in cluster.ports:
                _wait_until(lambda p=port: cluster_ok(p), f"cluster node {port} did not reach cluster_state:ok")
                # A replica that has not synced yet cannot be promoted: a failover test would find the
                # cluster down for good.  Wait until every node sees every replica attached.
                _wait_until(
                    lambda p=port: _replicas_seen(p, primaries, replicas),
                    f"cluster node {port} did not see {replicas} synced replica(s) per primary",
                )
            yield cluster
        finally:
            cluster.stop()
