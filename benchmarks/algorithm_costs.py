"""What "100/minute" means under each algorithm, and what it costs: the table in docs/algorithms.md.

For each algorithm, the limit string "100/minute" is measured four ways:

- the most requests any 60 seconds can admit: a greedy client (one attempt every 10 ms) starts after a
  long idle time at several offsets into a minute, on MemoryBackend with a manual clock, and the largest
  count of admissions within any 60 s of its run is kept;
- Redis memory of one client's state after it has used its whole allowance (MEMORY USAGE);
- Redis commands per decision (INFO commandstats; the script call itself and the commands it runs);
- Redis CPU per decision (INFO used_cpu_user + used_cpu_sys over many decisions).

Redis is a redis-server of its own on a free loopback port, started and stopped here, so nothing else
runs on it.  Writes benchmarks/results/algorithms-<time>.json and prints a Markdown table.

    python benchmarks/algorithm_costs.py [--decisions 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from asgi_ratelimit import MemoryBackend, RedisBackend, parse_limit
from asgi_ratelimit.policies import ALGORITHMS

LIMIT = "100/minute"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MICROS = 1_000_000


def most_in_any_minute(algorithm: str) -> int:
    """The largest number of admissions within any 60 s of a greedy client's run, over several start offsets."""
    policy = parse_limit(LIMIT, algorithm)
    best = 0
    # 58.9 s in: the first second's burst lands at the very end of one window, as a boundary attack does.
    for offset_ms in (0, 15_000, 30_000, 58_900, 59_990):
        now = [1_800_000_000 * MICROS]  # a minute boundary, far from zero
        backend = MemoryBackend(clock=lambda box=now: box[0])
        start = now[0] + offset_ms * 1000
        admitted: list[int] = []
        for step in range(18_000):  # 180 s, one attempt every 10 ms
            now[0] = start + step * 10_000
            (decision,) = backend.submit([("client", policy, 1)], (), "")
            if decision.allowed:
                admitted.append(now[0])
        low = 0
        for high, at in enumerate(admitted):  # two pointers: admissions within [at - 60 s, at]
            while admitted[low] <= at - 60 * MICROS:
                low += 1
            best = max(best, high - low + 1)
    return best


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def redis_costs(url: str, algorithm: str, decisions: int) -> dict[str, float]:
    client = Redis.from_url(url)
    backend = RedisBackend(client, prefix=f"cost:{algorithm}:")
    policy = parse_limit(LIMIT, algorithm)
    try:
        await client.flushall()
        # One client uses its whole allowance: the state a busy client keeps.
        for _ in range(100):
            await backend.hit_many([("full", policy, 1)])
        keys = [key async for key in client.scan_iter(match=f"cost:{algorithm}:*")]
        memory = sum([await client.memory_usage(key, samples=0) or 0 for key in keys])
        await client.config_resetstat()
        before = await client.info("cpu")
        # Decisions spread over 1,000 clients, a few each, none near its limit: the usual allowed request.
        for n in range(decisions):
            await backend.hit_many([(f"client-{n % 1000}", policy, 1)])
        after = await client.info("cpu")
        stats = await client.info("commandstats")
        calls = sum(int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info")
        cpu = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_user", "used_cpu_sys"))
        return {
            "bytes_full_client": memory,
            "keys_full_client": len(keys),
            "commands_per_decision": calls / decisions,
            "redis_cpu_us_per_decision": cpu / decisions * MICROS,
        }
    finally:
        await backend.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--decisions", type=int, default=20_000, help="decisions per algorithm on Redis")
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="algorithm-costs-")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    rows: dict[str, Any] = {}
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        for algorithm in ALGORITHMS:
            rows[algorithm] = {"most_in_any_60s": most_in_any_minute(algorithm)}
            rows[algorithm].update(asyncio.run(redis_costs(url, algorithm, args.decisions)))
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"algorithms-{stamp}.json"
    out.write_text(json.dumps({"limit": LIMIT, "decisions": args.decisions, "rows": rows}, indent=2) + "\n")
    print(
        f"| algorithm ({LIMIT}) | most in any 60 s | Redis bytes, one full client | commands per decision | "
        "Redis CPU per decision |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['most_in_any_60s']} | {row['bytes_full_client']:,} | "
            f"{row['commands_per_decision']:.1f} | {row['redis_cpu_us_per_decision']:.1f} µs |"
        )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
