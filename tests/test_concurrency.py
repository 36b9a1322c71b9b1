"""No over-admission: 4 processes x 100 concurrent tasks on one key of a real Redis admit exactly the limit.

test_cluster.py runs the same workers against a Redis Cluster.

Each worker process connects and loads the script first, then waits for "go" on stdin, so
that all 400 hits per policy race for real.  The windows are a day or more long, so nothing
refills while the test runs; the workers are killed if they have not finished in a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

WORKER = r"""
import asyncio, json, sys

from redis.asyncio import Redis, RedisCluster

from asgi_ratelimit import GCRA, FixedWindow, RedisBackend, SlidingWindow, SlidingWindowCounter, TokenBucket

url, prefix, tasks, cluster = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "cluster"
POLICIES = {
    "sliding_window": SlidingWindow(100, 86400),
    "fixed_window": FixedWindow(100, 366 * 86400),
    "gcra": GCRA(100, 86400),
    "token_bucket": TokenBucket(100, 100 / 86400),
    "sliding_window_counter": SlidingWindowCounter(100, 86400),
}


async def main():
    client = (RedisCluster if cluster else Redis).from_url(url, max_connections=tasks)
    backend = RedisBackend(client, prefix=prefix)
    await backend.hit("warm-up", list(POLICIES.values()))
    print("ready", flush=True)
    sys.stdin.readline()

    async def task():
        # One hit per policy, one after the other: `tasks` hits in flight at any moment.
        return [(name, (await backend.hit("the-one-key", [policy]))[0].allowed) for name, policy in POLICIES.items()]

    results = await asyncio.gather(*(task() for _ in range(tasks)))
    await backend.aclose()
    allowed = {name: 0 for name in POLICIES}
    for name, ok in (pair for pairs in results for pair in pairs):
        allowed[name] += ok
    print(json.dumps(allowed), flush=True)


asyncio.run(main())
"""

PROCESSES = 4
TASKS = 100


@pytest.mark.redis
@pytest.mark.slow
def test_concurrent_hits_from_several_processes_admit_exactly_the_limit(redis_url: str, key_prefix: str) -> None:
    assert admitted_by_workers(redis_url, key_prefix) == {
        "sliding_window": 100,
        "fixed_window": 100,
        "gcra": 100,
        "token_bucket": 100,
        "sliding_window_counter": 100,
    }


def admitted_by_workers(url: str, prefix: str, *, cluster: bool = False) -> dict[str, int]:
    """Hits admitted per policy by all the workers together (test_cluster.py runs it on a cluster)."""
    workers: list[subprocess.Popen[str]] = []
    try:
        for _ in range(PROCESSES):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, url, prefix, str(TASKS), "cluster" if cluster else "single"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        totals: dict[str, int] = {}
        for worker in workers:
            out, _ = worker.communicate(timeout=60)
            assert worker.returncode == 0
            counts: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            for name, allowed in counts.items():
                totals[name] = totals.get(name, 0) + allowed
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)
    return totals
