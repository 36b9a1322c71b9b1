"""Before against after, in process, in one run: two checkouts of the package measured in alternation (A B B A ...).

Each round runs every config once per checkout, each in a fresh subprocess that imports the package from that
checkout (the harness, httpbench, is this one's for both).  Figures are medians over the rounds:

- ``us``: wall time per request, ``cpu_us``: this process's CPU per request (robust to other jobs on the
  machine, unlike wall time);
- ``floor``: one bare redis-py asyncio EVALSHA of hit.lua per call, one at a time, with the very keys and
  arguments RedisBackend sends: the least a lone Redis decision can cost from Python;
- ``lone ratio``: (ours-redis one at a time - bare-starlette one at a time) / floor, in the same subprocess
  round: the time a request gains from the limiter, against the bare call it cannot avoid.

    python benchmarks/bench_ab.py --before /path/to/old/checkout --rounds 5 --seconds 1
    python benchmarks/bench_ab.py --before /path/to/old/checkout --rounds 0 --instructions ours-memory,ours-redis@50

``--uvicorn`` also runs configs through uvicorn (wrk, 50 connections, 5x ``--seconds``): ``us`` is then
1 / req/s and ``cpu_us`` the server's CPU per request.  ``--instructions`` also counts instructions per
request under callgrind (valgrind; hash randomisation off), one request at a time, which holds whatever
else the machine is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

HERE = Path(__file__).resolve().parent
AFTER = HERE.parent
#: (config, requests in flight); the configs are httpbench's.
RUNS = [
    ("bare-starlette", 1),
    ("ours-redis", 1),
    ("ours-redis", 50),
    ("ours-memory", 1),
    ("ours-memory", 50),
    ("ours-flood", 50),
]


async def _floor(url: str, seconds: float) -> dict[str, float]:
    """Bare redis-py EVALSHA of hit.lua, one call at a time, as RedisBackend would send it."""
    from redis.asyncio import Redis

    from asgi_ratelimit import RedisBackend
    from asgi_ratelimit.backends.redis import HIT_SCRIPT
    from asgi_ratelimit.policies import GCRA

    client = Redis.from_url(url)
    backend = RedisBackend(client, prefix="benchab-floor:")
    args = backend._script_args([("127.0.0.1", GCRA(10**9, 60), 1)])
    sha = await client.script_load(HIT_SCRIPT)
    calls = 0
    cpu, start = process_time(), perf_counter()
    deadline = start + seconds
    while perf_counter() < deadline:
        await client.evalsha(sha, 1, *args)
        calls += 1
    elapsed, cpu = perf_counter() - start, process_time() - cpu
    await client.delete(*[key for key in args[:1]])
    await client.aclose()
    return {"us": elapsed * 1e6 / calls, "cpu_us": cpu * 1e6 / calls}


def _builders() -> dict[str, Any]:
    """httpbench's configs, pinned to GCRA: the exact log (the default before) refuses a limit of 10**9."""
    sys.path.insert(0, str(HERE))
    from httpbench import apps

    return {
        "bare-starlette": apps._bare("starlette"),
        "ours-redis": apps._ours("redis", apps.OPEN_PER_MINUTE, "starlette", algorithm="gcra"),
        "ours-memory": apps._ours("memory", apps.OPEN_PER_MINUTE, "starlette", algorithm="gcra"),
        "ours-flood": apps._ours("redis", 1, "starlette", algorithm="gcra"),
    }


async def _serve(url: str, name: str, requests: int) -> None:
    """Serve ``requests`` requests after a warm-up, untimed: the process callgrind counts.

    ``name`` is a config, or ``config@N`` for N requests in flight (one at a time otherwise).
    """
    from httpbench import apps, inprocess

    config, _, flight = name.partition("@")
    concurrency = int(flight or 1)
    built = _builders()[config](apps.BuildContext(url, f"benchab-{os.getpid()}-{config}:"))

    async def worker(count: int) -> None:
        for _ in range(count):
            exchange = inprocess._Exchange()
            await built.app(dict(inprocess.SCOPE_TEMPLATE), exchange.receive, exchange.send)

    await asyncio.gather(*(worker((200 + requests) // concurrency) for _ in range(concurrency)))
    await built.aclose()


def _instructions(tree: Path, url: str, name: str, few: int = 500, many: int = 2500) -> float:
    """Instructions per request under callgrind: the difference of two runs cancels start-up."""
    counts = []
    for requests in (few, many):
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__]
        command += ["--serve", name, str(requests), "--redis-url", url]
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=900)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"{tree} {name}: valgrind failed:\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (many - few)


async def _measure(url: str, seconds: float) -> dict[str, Any]:
    from httpbench import apps, inprocess

    import asgi_ratelimit

    builders = _builders()
    out: dict[str, Any] = {"package": asgi_ratelimit.__file__}
    for name, concurrency in RUNS:
        built = builders[name](apps.BuildContext(url, f"benchab-{os.getpid()}-{name}:"))
        lifespan = inprocess.Lifespan(built.app)
        await lifespan.startup()
        await inprocess.drive(built.app, min(0.3, seconds), concurrency, lifespan.state)  # warm-up
        run = await inprocess.drive(built.app, seconds, concurrency, lifespan.state)
        await lifespan.shutdown()
        await built.aclose()
        out[f"{name}@{concurrency}"] = {
            "us": run.seconds * 1e6 / run.requests,
            "cpu_us": run.cpu_seconds * 1e6 / run.requests,
        }
    out["floor@1"] = await _floor(url, seconds)
    return out


def _worker(url: str, seconds: float) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(_measure(url, seconds))))


def _round(tree: Path, url: str, seconds: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, __file__, "--worker", "--redis-url", url, "--seconds", str(seconds)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(str(tree)):
        raise RuntimeError(f"{tree}: imported {result['package']} instead")
    return result


def _uvicorn(tree: Path, url: str, config: str, seconds: int) -> dict[str, float]:
    """One wrk run (50 connections) against uvicorn serving httpbench's ``config`` from ``tree``."""
    sys.path.insert(0, str(HERE))
    from httpbench import apps, server

    env = {
        "PYTHONPATH": str(tree),
        apps.ENV_CONFIG: config,
        apps.ENV_REDIS_URL: url,
        apps.ENV_PREFIX: f"benchab-{os.getpid()}-{config}:",
    }
    with server.uvicorn_server(env, 0) as running:
        server.run_wrk(running.url, 1, 50, 1, latency=False)  # warm-up
        cpu_before = server.cpu_seconds(running.proc.pid) or 0.0
        figures = server.run_wrk(running.url, seconds, 50, 1)
        cpu_after = server.cpu_seconds(running.proc.pid) or 0.0
    return {"rps": figures["rps"], "cpu_us": (cpu_after - cpu_before) * 1e6 / figures["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="the other checkout (its top directory)")
    parser.add_argument("--after", type=Path, default=AFTER, help="the checkout to compare (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1"))
    parser.add_argument(
        "--instructions", default="", help="configs to count instructions of under callgrind, e.g. ours-memory"
    )
    parser.add_argument(
        "--uvicorn", default="", help="httpbench configs to also run through uvicorn and wrk, e.g. ours-redis-fixed"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.redis_url, args.seconds)
        return
    if args.serve:
        asyncio.run(_serve(args.redis_url, args.serve[0], int(args.serve[1])))
        return
    if args.before is None:
        parser.error("--before is required")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name in filter(None, args.instructions.split(",")):
        counted = {label: _instructions(tree, args.redis_url, name) for label, tree in trees.items()}
        print(
            f"instructions per request, {name}: before {counted['before']:,.0f}, after {counted['after']:,.0f}"
            f" ({counted['after'] / counted['before']:.3f})"
        )
    rounds: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    for index in range(args.rounds):
        # A B, then B A, and so on: neither side always runs on a machine just warmed (or tired) by the other.
        order = list(trees.items())
        for label, tree in order if index % 2 == 0 else reversed(order):
            rounds[label].append(_round(tree, args.redis_url, args.seconds))
            for config in filter(None, args.uvicorn.split(",")):
                run = _uvicorn(tree, args.redis_url, config, max(1, round(args.seconds * 5)))
                rounds[label][-1][f"{config}@uvicorn"] = {"us": 1e6 / run["rps"], "cpu_us": run["cpu_us"]}
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    if not args.rounds:
        return
    keys = [f"{name}@{concurrency}" for name, concurrency in RUNS] + ["floor@1"]
    keys += [f"{config}@uvicorn" for config in filter(None, args.uvicorn.split(","))]
    print("| run | before µs | after µs | after/before | before CPU µs | after CPU µs | after/before |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in keys:
        cells = []
        for metric in ("us", "cpu_us"):
            before = statistics.median(r[key][metric] for r in rounds["before"])
            after = statistics.median(r[key][metric] for r in rounds["after"])
            cells.append(f"{before:.1f} | {after:.1f} | {after / before:.3f}")
        print(f"| {key} | {' | '.join(cells)} |")
    for label in trees:
        ratios = [(r["ours-redis@1"]["us"] - r["bare-starlette@1"]["us"]) / r["floor@1"]["us"] for r in rounds[label]]
        print(f"lone ratio ({label}): median {statistics.median(ratios):.2f} of the bare EVALSHA, rounds {ratios}")


if __name__ == "__main__":
    main()
