"""Engine decisions per second, per algorithm and backend, next to redis-py's own EVALSHA ceiling.

Every algorithm runs on MemoryBackend and on RedisBackend (redis.asyncio, hiredis when installed, server
clock), one call at a time and with 50 calls in flight (asyncio tasks).  The ceiling is measured in the
same run and on the same client: redis-py's Script object calling ``return 1`` with one key, which is
the least any one-EVALSHA-per-decision limiter can cost.  Configs alternate within every round
(A B C ... A B C ...) and the table shows medians over rounds, so slow drift on a shared machine hits
every config alike.

Keys: 10,000 random identities, limits high enough that (almost) every hit is allowed; the table's
last column shows the share denied.  A one-hot-key variant (a single identity) runs on Redis with 50 in
flight.

    python benchmarks/bench_engine.py            # about 2.5 minutes
    python benchmarks/bench_engine.py --quick    # under 30 seconds
    python benchmarks/bench_engine.py --redis-url redis://127.0.0.1:6379/0

Raw results go to benchmarks/results/engine-<timestamp>.json.  Keys live under a unique prefix, expire
by themselves within seconds, and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

import asgi_ratelimit
from asgi_ratelimit import MemoryBackend, Policy, RedisBackend, parse_limit

RESULTS = Path(__file__).resolve().parent / "results"
ALGORITHMS = ["token_bucket", "sliding_window", "gcra", "fixed_window", "sliding_window_counter"]
# Spread over 10,000 identities at ~20k decisions/s, each key sees ~2 hits/s: about 20 per window,
# far below the limit.  The sliding log therefore holds ~20 entries per key (a realistic small set).
MANY_KEYS_LIMIT = "1000 per 10 seconds"
# One identity takes every hit: the limit must exceed any rate this machine reaches.
HOT_KEY_LIMIT = "1000000 per 1 second"
IDENTITIES = 10_000
IN_FLIGHT = 50

Call = Callable[[str], Awaitable[bool]]

# The least any limiter that keeps state in Redis does per decision: read one key and write it back
# with a TTL.  No algorithm, no server clock: its ratio to the ceiling bounds what any algorithm can reach.
FLOOR_NAME = "get+set px"
FLOOR_SCRIPT = "local v = redis.call('GET', KEYS[1]); redis.call('SET', KEYS[1], '1', 'PX', 10000); return 1"


@dataclass(frozen=True)
class Config:
    """One line of the table."""

    backend: str  # "memory", "redis", "redis-single" (coalescing off), "ceiling" or "floor"
    algorithm: str  # an algorithm name, or "evalsha return 1"
    keys: str  # "10k" or "hot"
    concurrency: int

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.algorithm}/{self.keys}/c{self.concurrency}"


def configs() -> list[Config]:
    """Every config, in the order each round runs them: the ceiling next to the Redis runs of its mode."""
    out: list[Config] = []
    for concurrency in (1, IN_FLIGHT):
        out.append(Config("ceiling", "evalsha return 1", "one", concurrency))
        out.append(Config("floor", FLOOR_NAME, "10k", concurrency))
        out += [Config("redis", algorithm, "10k", concurrency) for algorithm in ALGORITHMS]
        if concurrency == IN_FLIGHT:
            out += [Config("redis", algorithm, "hot", concurrency) for algorithm in ALGORITHMS]
            # The same calls without coalescing: one EVALSHA round trip per decision, for comparison.
            out += [Config("redis-single", algorithm, "10k", concurrency) for algorithm in ALGORITHMS]
        out += [Config("memory", algorithm, "10k", concurrency) for algorithm in ALGORITHMS]
    return out


async def measure(call: Call, identities: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    """Run ``call`` from ``concurrency`` tasks for ``seconds``; count calls and denials."""
    clock = time.perf_counter
    count = len(identities)

    async def worker(start: int, deadline: float) -> tuple[int, int]:
        done = denied = 0
        i = start
        while clock() < deadline:
            if not await call(identities[i % count]):
                denied += 1
            i += 1
            done += 1
        return done, denied

    cpu0 = time.process_time()
    t0 = clock()
    deadline = t0 + seconds
    starts = [random.randrange(count) for _ in range(concurrency)]
    results = await asyncio.gather(*(worker(start, deadline) for start in starts))
    elapsed = clock() - t0
    cpu = time.process_time() - cpu0
    done = sum(r[0] for r in results)
    denied = sum(r[1] for r in results)
    return {
        "decisions": done,
        "denied": denied,
        "seconds": elapsed,
        "per_second": done / elapsed,
        "client_cpu_us_per_decision": cpu * 1e6 / max(done, 1),
    }


async def redis_cpu(client: Redis) -> float:
    """Seconds of CPU the Redis server has used (shared server: includes other clients' work)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def engine_call(backend: Any, policy: Policy) -> Call:
    policies = [policy]

    async def call(identity: str) -> bool:
        decisions = await backend.hit(identity, policies)
        return bool(decisions[0].allowed)

    return call


def ceiling_call(client: Redis, key: str) -> Call:
    # redis-py's own Script object: EVALSHA, falling back to SCRIPT LOAD on NOSCRIPT.
    script = client.register_script("return 1")
    keys = [key]

    async def call(identity: str) -> bool:
        return bool(await script(keys=keys))

    return call


def floor_call(client: Redis, prefix: str) -> Call:
    script = client.register_script(FLOOR_SCRIPT)

    async def call(identity: str) -> bool:
        return bool(await script(keys=[f"{prefix}floor:{identity}"]))

    return call


async def run(args: argparse.Namespace) -> dict[str, Any]:
    client = Redis.from_url(args.redis_url)
    await client.ping()
    server = await client.info("server")
    prefix = f"bench-engine-{uuid.uuid4().hex[:12]}:"
    rng = random.Random(args.seed)
    many = [f"client-{rng.getrandbits(64):016x}" for _ in range(IDENTITIES)]
    hot = ["the-one-hot-client"]

    redis_backend = RedisBackend(client, prefix=prefix)
    single_backend = RedisBackend(client, prefix=prefix, coalesce=False)
    calls: dict[Config, tuple[Call, list[str]]] = {}
    for config in configs():
        if config.backend == "ceiling":
            calls[config] = (ceiling_call(client, f"{prefix}{{ceiling}}"), many)
            continue
        if config.backend == "floor":
            calls[config] = (floor_call(client, prefix), many)
            continue
        limit = HOT_KEY_LIMIT if config.keys == "hot" else MANY_KEYS_LIMIT
        policy = parse_limit(limit, config.algorithm)
        # A fresh MemoryBackend per config: its state (and its LRU cap) is not shared between lines.
        backend = {"memory": MemoryBackend(prefix=prefix), "redis": redis_backend, "redis-single": single_backend}[
            config.backend
        ]
        calls[config] = (engine_call(backend, policy), hot if config.keys == "hot" else many)

    order = list(calls)
    # Warm-up: loads the scripts, fills the connection pool to 50, creates the keys.
    for config in order:
        call, identities = calls[config]
        await measure(call, identities, config.concurrency, args.warmup)

    raw: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        for config in order:
            call, identities = calls[config]
            cpu0 = await redis_cpu(client)
            result = await measure(call, identities, config.concurrency, args.seconds)
            result["redis_cpu_us_per_decision"] = (await redis_cpu(client) - cpu0) * 1e6 / max(result["decisions"], 1)
            raw.append({"round": round_no, "config": config.name, **result})
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)

    deleted = 0
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        deleted += await client.unlink(key)
    await client.aclose()

    summary = summarize(order, raw)
    return {
        "benchmark": "benchmarks/bench_engine.py",
        "started": args.started,
        "argv": sys.argv[1:],
        "environment": {
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "loop": args.loop,
            "redis_py": redis.__version__,
            "hiredis": _hiredis_version(),
            "redis_server": server.get("redis_version"),
            "asgi_ratelimit": asgi_ratelimit.__version__,
        },
        "parameters": {
            "rounds": args.rounds,
            "seconds_per_measurement": args.seconds,
            "identities": IDENTITIES,
            "in_flight": IN_FLIGHT,
            "many_keys_limit": MANY_KEYS_LIMIT,
            "hot_key_limit": HOT_KEY_LIMIT,
            "clock": "server",
            "keys_deleted_at_end": deleted,
        },
        "summary": summary,
        "raw": raw,
    }


def summarize(order: list[Config], raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over rounds; ratios to the ceiling of the same concurrency, as a ratio of medians and paired."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in raw:
        by_name.setdefault(row["config"], []).append(row)
    ceilings = {c.concurrency: c.name for c in order if c.backend == "ceiling"}
    out = []
    for config in order:
        rows = sorted(by_name[config.name], key=lambda r: r["round"])
        ceiling_rows = sorted(by_name[ceilings[config.concurrency]], key=lambda r: r["round"])
        median = statistics.median(r["per_second"] for r in rows)
        ceiling = statistics.median(r["per_second"] for r in ceiling_rows)
        paired = statistics.median(r["per_second"] / c["per_second"] for r, c in zip(rows, ceiling_rows, strict=True))
        decisions = sum(r["decisions"] for r in rows)
        out.append(
            {
                "config": config.name,
                "backend": config.backend,
                "algorithm": config.algorithm,
                "keys": config.keys,
                "concurrency": config.concurrency,
                "median_per_second": median,
                "min_per_second": min(r["per_second"] for r in rows),
                "max_per_second": max(r["per_second"] for r in rows),
                "ceiling_median_per_second": ceiling,
                "ratio_to_ceiling": median / ceiling,
                "paired_median_ratio_to_ceiling": paired,
                "us_per_decision": 1e6 / median,
                "client_cpu_us_per_decision": statistics.median(r["client_cpu_us_per_decision"] for r in rows),
                "redis_cpu_us_per_decision": statistics.median(r["redis_cpu_us_per_decision"] for r in rows),
                "denied_share": sum(r["denied"] for r in rows) / max(decisions, 1),
            }
        )
    return out


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    params = report["parameters"]
    print(
        f"\nasgi_ratelimit engine: Python {env['python']} ({env['loop']}), redis-py {env['redis_py']}"
        f" (hiredis {env['hiredis']}), redis-server {env['redis_server']}, {env['cpu_count']} cores;"
        f" medians of {params['rounds']} rounds of {params['seconds_per_measurement']} s"
    )
    print(f"keys: {params['identities']:,} identities at {params['many_keys_limit']!r}; hot: one identity")
    header = (
        f"{'backend':<12} {'algorithm':<24} {'keys':<4} {'in flight':>9} {'decisions/s':>12} {'min-max':>15}"
        f" {'ceiling/s':>10} {'ratio':>6} {'paired':>6} {'client µs':>9} {'redis µs':>8} {'denied':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in report["summary"]:
        print(
            f"{row['backend']:<12} {row['algorithm']:<24} {row['keys']:<4} {row['concurrency']:>9}"
            f" {row['median_per_second']:>12,.0f} {row['min_per_second']:>7,.0f}-{row['max_per_second']:<7,.0f}"
            f" {row['ceiling_median_per_second']:>10,.0f} {row['ratio_to_ceiling']:>6.2f}"
            f" {row['paired_median_ratio_to_ceiling']:>6.2f} {row['client_cpu_us_per_decision']:>9.1f}"
            f" {row['redis_cpu_us_per_decision']:>8.1f} {row['denied_share']:>7.2%}"
        )
    print(
        "ratio = median / median of the ceiling (redis-py Script, `return 1`, one key) at the same concurrency;"
        " paired = median of per-round ratios.\nclient µs = this process's CPU per decision;"
        " redis µs = redis-server CPU per decision (shared server: includes other clients)."
    )
    redis_rows = [r for r in report["summary"] if r["backend"] == "redis" and r["keys"] == "10k"]
    misses = [f"{r['algorithm']}/c{r['concurrency']}" for r in redis_rows if r["ratio_to_ceiling"] < 0.8]
    verdict = "met" if not misses else "NOT met by " + ", ".join(misses)
    print(f"target (every algorithm on Redis >= 80% of the ceiling): {verdict}")
    floors = [f"c{r['concurrency']} {r['ratio_to_ceiling']:.2f}" for r in report["summary"] if r["backend"] == "floor"]
    print(f"floor (a script that only GETs and SETs one key) as a share of the ceiling: {', '.join(floors)}")
    single = {r["algorithm"]: r for r in report["summary"] if r["backend"] == "redis-single"}
    gains = [
        f"{r['algorithm']} {r['median_per_second'] / single[r['algorithm']]['median_per_second']:.2f}x"
        for r in redis_rows
        if r["concurrency"] == IN_FLIGHT and r["algorithm"] in single
    ]
    if gains:
        print(f"coalescing, {IN_FLIGHT} in flight, coalesced / one round trip per decision: " + ", ".join(gains))


def _hiredis_version() -> str | None:
    try:
        import hiredis
    except ImportError:
        return None
    return str(getattr(hiredis, "__version__", "installed"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 short rounds, under 30 seconds")
    parser.add_argument("--rounds", type=int, help="rounds (default 5; 3 with --quick)")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 1.0; 0.25 with --quick)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio event loop")
    parser.add_argument("--no-write", action="store_true", help="print the table but write no JSON file")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (0.25 if args.quick else 1.0)
    args.warmup = 0.1 if args.quick else 0.3
    args.started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    loop_factory = None
    args.loop = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
            args.loop = f"uvloop {uvloop.__version__}"
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            report = runner.run(run(args))
    else:
        if loop_factory is not None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        report = asyncio.run(run(args))
    print_table(report)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"engine-{args.started}.json"
        path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
