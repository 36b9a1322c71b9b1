"""Redis memory per active key, for each algorithm, measured with MEMORY USAGE on real keys.

Each case hits one identity through RedisBackend (server clock) the way traffic would: once for the
algorithms whose state is a fixed size, and 10, 100, 128, 129, 1,000 and 10,000 times for the
sliding-window log, whose sorted set holds one member per admitted hit (128 entries is Redis's default
zset-max-listpack-entries: above it the set becomes a skiplist).  ``MEMORY USAGE key SAMPLES 0``
counts the key name, the value and every element exactly; it does not count the key's entry in the
expires table.  Keys live under a unique prefix and are deleted afterwards.

    python benchmarks/memory_per_key.py
    python benchmarks/memory_per_key.py --redis-url redis://127.0.0.1:6379/0

Writes benchmarks/results/memory-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

import asgi_ratelimit
from asgi_ratelimit import RedisBackend, parse_limit

RESULTS = Path(__file__).resolve().parent / "results"
# (algorithm, limit string, hits on one identity)
CASES = [
    ("token_bucket", "100/minute", 1),
    ("gcra", "100/minute", 1),
    ("fixed_window", "100/minute", 1),
    ("sliding_window_counter", "100/minute", 1),
    ("sliding_window", "100/minute", 1),
    ("sliding_window", "100/minute", 10),
    ("sliding_window", "1000/minute", 100),
    ("sliding_window", "1000/minute", 128),
    ("sliding_window", "1000/minute", 129),
    ("sliding_window", "1000/minute", 1000),
    ("sliding_window", "10000/hour", 10000),
]
# Concurrent hits while filling big logs: the admitted members still get distinct names.
FILL_IN_FLIGHT = 20


async def measure_case(
    client: Redis, run_prefix: str, index: int, algorithm: str, limit: str, hits: int
) -> dict[str, Any]:
    prefix = f"{run_prefix}{index}:"
    backend = RedisBackend(client, prefix=prefix)
    policies = [parse_limit(limit, algorithm)]
    identity = f"memory-probe-{index}"
    allowed = 0
    remaining = hits
    while remaining:
        batch = min(remaining, FILL_IN_FLIGHT)
        results = await asyncio.gather(*(backend.hit(identity, policies) for _ in range(batch)))
        allowed += sum(decisions[0].allowed for decisions in results)
        remaining -= batch
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if len(keys) != 1:
        raise RuntimeError(f"expected one key under {prefix!r}, found {len(keys)}")
    key = keys[0]
    usage = await client.memory_usage(key, samples=0)
    key_type = (await client.type(key)).decode()
    encoding = (await client.object("encoding", key)).decode()
    if key_type == "zset":
        entries = await client.zcard(key)
    elif key_type == "hash":
        entries = await client.hlen(key)
    else:
        entries = 1
    await client.unlink(key)
    return {
        "algorithm": algorithm,
        "limit": limit,
        "hits": hits,
        "allowed": allowed,
        "type": key_type,
        "encoding": encoding,
        "entries": entries,
        "key_name_bytes": len(key),
        "memory_usage_bytes": usage,
        "bytes_per_entry": usage / entries if key_type == "zset" else None,
    }


async def run(redis_url: str) -> dict[str, Any]:
    client = Redis.from_url(redis_url)
    server = await client.info("server")
    memory_info = await client.info("memory")
    listpack_entries = (await client.config_get("zset-max-listpack-entries")).get("zset-max-listpack-entries")
    run_prefix = f"mem{uuid.uuid4().hex[:8]}-"  # short: the key name counts in MEMORY USAGE
    rows = []
    try:
        for index, (algorithm, limit, hits) in enumerate(CASES):
            rows.append(await measure_case(client, run_prefix, index, algorithm, limit, hits))
    finally:
        async for key in client.scan_iter(match=f"{run_prefix}*", count=1000):
            await client.unlink(key)
        await client.aclose()
    return {
        "benchmark": "benchmarks/memory_per_key.py",
        "environment": {
            "python": sys.version.split()[0],
            "redis_py": redis.__version__,
            "redis_server": server.get("redis_version"),
            "allocator": memory_info.get("mem_allocator"),
            "zset_max_listpack_entries": listpack_entries,
            "asgi_ratelimit": asgi_ratelimit.__version__,
        },
        "note": "MEMORY USAGE <key> SAMPLES 0: key name + value; excludes the key's entry in the expires table.",
        "results": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(
        f"Redis memory per active key: redis-server {env['redis_server']} ({env['allocator']}),"
        f" zset-max-listpack-entries {env['zset_max_listpack_entries']}"
    )
    header = (
        f"{'algorithm':<24} {'limit':<12} {'hits':>6} {'type/encoding':<17} {'entries':>7} {'key len':>7}"
        f" {'bytes':>9} {'bytes/entry':>11}"
    )
    print(header)
    print("-" * len(header))
    for row in report["results"]:
        per_entry = "" if row["bytes_per_entry"] is None else f"{row['bytes_per_entry']:.1f}"
        print(
            f"{row['algorithm']:<24} {row['limit']:<12} {row['hits']:>6,} {row['type'] + '/' + row['encoding']:<17}"
            f" {row['entries']:>7,} {row['key_name_bytes']:>7} {row['memory_usage_bytes']:>9,} {per_entry:>11}"
        )
    print(report["note"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--no-write", action="store_true", help="print the table but write no JSON file")
    args = parser.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = asyncio.run(run(args.redis_url))
    report["started"] = started
    print_table(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"memory-{started}.json"
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
