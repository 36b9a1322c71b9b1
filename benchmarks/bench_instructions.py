"""Instructions per request, counted by valgrind: what the middleware adds, free of the machine's noise.

Requests per second move by tens of percent between runs on a shared machine, and by a factor of three
between machines.  The number of instructions a request executes does not: callgrind counts the same
total for the same code, inputs and Python every time, whatever else the machine is doing.  So this is
the figure to compare two versions of the hot path with.

Each config (from httpbench/apps.py, without Redis) is called in process, as bench_http.py does, under
``valgrind --tool=callgrind`` twice: once for ``--few`` requests and once for ``--many``.  The difference
divided by the difference in requests cancels Python's start-up and the app's construction.  Hash
randomisation is off (PYTHONHASHSEED=0) so that dict probing repeats exactly.

    python benchmarks/bench_instructions.py                    # bare-starlette and ours-memory
    python benchmarks/bench_instructions.py --configs bare-starlette,ours-memory,ours-flood
    python benchmarks/bench_instructions.py --quick           # fewer requests: a smoke run

It needs valgrind (``apt-get install valgrind``); without it, it says so and exits.  A run takes about a
minute per config.  Instructions are not time: a cache miss costs more than an add, and a server adds its
own work around each request (see bench_http.py for req/s through uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from httpbench import apps, inprocess

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = "bare-starlette,ours-memory"
WARMUP = 200  # requests before counting starts to matter: caches filled, code specialised by the interpreter


async def _serve(config_name: str, requests: int) -> None:
    config = next(config for config in apps.CONFIGS if config.name == config_name)
    built = config.build(apps.BuildContext(redis_url="redis://127.0.0.1:6379/1", prefix="benchinstr:"))
    app = built.app
    statuses: set[int] = set()
    for _ in range(WARMUP + requests):
        exchange = inprocess._Exchange()
        await app(dict(inprocess.SCOPE_TEMPLATE), exchange.receive, exchange.send)
        statuses.add(exchange.status)
    await built.aclose()
    if statuses != {config.expect}:
        raise SystemExit(f"{config_name}: answered {sorted(statuses)}, expected {config.expect}")


def _count(config_name: str, requests: int) -> int:
    """The instructions callgrind counts for one process serving ``requests`` requests (after the warm-up)."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        config_name,
        str(requests),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{config_name}: valgrind failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated configs ({DEFAULT_CONFIGS})")
    parser.add_argument("--few", type=int, default=500, help="requests in the first count (500)")
    parser.add_argument("--many", type=int, default=2500, help="requests in the second count (2500)")
    parser.add_argument("--quick", action="store_true", help="200 and 700 requests: a smoke run")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "REQUESTS"), help=argparse.SUPPRESS)
    # `nox -s bench -- ARGS` gives every script the same arguments: name the ones meant for the others.
    args, unknown = parser.parse_known_args()
    if unknown:
        print(f"note: ignoring {' '.join(unknown)} (not options of bench_instructions.py)")
    if args.quick:
        args.few, args.many = 200, 700
    if args.child:
        asyncio.run(_serve(args.child[0], int(args.child[1])))
        return
    if shutil.which("valgrind") is None:
        print("note: valgrind is not installed (apt-get install valgrind): nothing counted")
        return
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    known = {config.name: config for config in apps.CONFIGS}
    for name in names:
        if name not in known:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(known)}")
        if known[name].redis:
            raise SystemExit(f"{name} talks to Redis, whose work is outside this process: not counted here")
    if args.many <= args.few:
        raise SystemExit(f"--many ({args.many}) must be above --few ({args.few})")

    per_request: dict[str, float] = {}
    for name in names:
        few, many = _count(name, args.few), _count(name, args.many)
        per_request[name] = (many - few) / (args.many - args.few)
        print(f"  {name:<20} {per_request[name]:>10,.0f} instructions per request", flush=True)

    print("\nInstructions per request, in process (valgrind --tool=callgrind, PYTHONHASHSEED=0)")
    print("| config | instructions per request | added over the bare app |")
    print("|---|---:|---:|")
    for name in names:
        bare = per_request.get(known[name].bare)
        added = "" if bare is None or name == known[name].bare else f"+{per_request[name] - bare:,.0f}"
        print(f"| {name} | {per_request[name]:,.0f} | {added} |")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"instructions-{stamp}.json"
    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip(),
        "few": args.few,
        "many": args.many,
        "warmup": WARMUP,
    }
    out.write_text(json.dumps({"meta": meta, "instructions_per_request": per_request}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
