"""Decisions per second on a Redis Cluster of 1, 2 and 3 primaries (no replicas), from one Python process.

For each cluster size, a fresh cluster is started on free loopback ports (tests/redis_cluster.py),
RedisBackend.from_url(url, cluster=True) decides GCRA hits for identities drawn from 10,000, one at a
time (sequential) and with 50 and 200 hits in flight, each for a fixed duration after a warm-up.
Writes benchmarks/results/cluster-<timestamp>.json and draws docs/plots/scaling.png.

    python benchmarks/cluster_bench.py [--seconds 3]      (or: nox -s bench_cluster)

Read the note in docs/scaling.md before reading the numbers: the client and every redis-server
share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import redis  # noqa: E402
from redis_cluster import redis_cluster  # noqa: E402

from asgi_ratelimit import GCRA, RedisBackend  # noqa: E402

SIZES = (1, 2, 3)
IN_FLIGHT = (1, 50, 200)
IDENTITIES = 10_000


async def measure(url: str, in_flight: int, seconds: float) -> dict[str, Any]:
    backend = RedisBackend.from_url(url, cluster=True, prefix="bench:")
    policy = GCRA(1_000_000, 60)
    rng = random.Random(in_flight)
    done = 0
    errors = 0
    stop_at = 0.0

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            try:
                await backend.hit(f"user-{rng.randrange(IDENTITIES)}", [policy])
                done += 1
            except Exception:
                errors += 1

    try:
        stop_at = time.perf_counter() + min(1.0, seconds / 3)  # warm-up: connections, script, slot map
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        done = errors = 0
        started = time.perf_counter()
        cpu = time.process_time()
        stop_at = started + seconds
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    finally:
        await backend.aclose()
    return {
        "in_flight": in_flight,
        "decisions": done,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "decisions_per_second": round(done / elapsed),
        "client_cpu_share": round(cpu / elapsed, 2),  # 1.0 = one core busy all the time
    }


def redis_cpu_seconds(ports: list[int]) -> float:
    total = 0.0
    for port in ports:
        with redis.Redis(port=port) as client:
            info = client.info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def run(seconds: float) -> list[dict[str, Any]]:
    rows = []
    for primaries in SIZES:
        with redis_cluster(primaries=primaries, replicas=0) as cluster:
            for in_flight in IN_FLIGHT:
                before = redis_cpu_seconds(cluster.ports)
                row = asyncio.run(measure(cluster.url, in_flight, seconds))
                redis_cpu = redis_cpu_seconds(cluster.ports) - before
                row["primaries"] = primaries
                # Includes the warm-up: an upper bound on the servers' share while measuring.
                row["redis_cpu_share"] = round(redis_cpu / row["seconds"], 2)
                rows.append(row)
                print(
                    f"{primaries} primaries, {in_flight:>3} in flight: {row['decisions_per_second']:>6} decisions/s"
                    f"  (client CPU {row['client_cpu_share']:.2f}, redis CPU <= {row['redis_cpu_share']:.2f},"
                    f" errors {row['errors']})",
                    flush=True,
                )
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for in_flight in IN_FLIGHT:
        points = [(r["primaries"], r["decisions_per_second"]) for r in rows if r["in_flight"] == in_flight]
        label = "sequential" if in_flight == 1 else f"{in_flight} in flight"
        axes.plot([p for p, _ in points], [d for _, d in points], marker="o", label=label)
    axes.set_xticks(list(SIZES))
    axes.set_xlabel("primaries in the cluster")
    axes.set_ylabel("decisions per second")
    axes.set_ylim(bottom=0)
    axes.set_title("RedisBackend on Redis Cluster, one Python client, 2 shared cores")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point (default 3)")
    args = parser.parse_args()
    rows = run(args.seconds)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "cluster_bench",
        "when": stamp,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "redis_py": redis.__version__,
        "redis_server": server,
        "policy": "GCRA(1000000, 60), identities drawn from 10,000, server clock",
        "rows": rows,
    }
    out = ROOT / "benchmarks" / "results" / f"cluster-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plot(rows, ROOT / "docs" / "plots" / "scaling.png")
    print(f"wrote {out.relative_to(ROOT)} and docs/plots/scaling.png")


if __name__ == "__main__":
    main()
