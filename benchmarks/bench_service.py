"""The decision service through uvicorn: POST /check, one check and a batch of 10, beside the floor, in one run.

Every server is a real process on a free loopback port, loaded by ``wrk -t1`` at 1 and at 50 connections:

- ``floor``: a bare Starlette endpoint that parses the same JSON body and returns a JSON answer (the most a
  Python service on uvicorn can do: every figure of ours is set beside it);
- ``memory``: ``asgi-ratelimit serve`` counting in memory (one worker: more are refused);
- ``redis``: ``asgi-ratelimit serve --redis-url`` on a private redis-server started for the run.

Floor and Redis run with 1 and with 2 workers.  Every request carries the bearer token (the service is run with
one, as it would be in production) and its keys rotate over ``--keys`` identities with a limit no request reaches,
so every answer is an allowed 200.  CPU time is read from /proc for the server's processes and for redis-server,
so each row also says how much CPU a decision costs, and how much of it is Redis's.  The service runs with
``--log-level warning`` (no access log) and ``--timeout 1`` (see server()).

    python benchmarks/bench_service.py --quick        # a smoke run, about 40 s
    python benchmarks/bench_service.py                # the default run, 3 rounds, about 7 minutes

Writes benchmarks/results/service-<timestamp>.json (raw figures and the environment) and .md (the tables).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from httpbench.server import cpu_seconds, free_port, parse_wrk, private_redis, stop, wrk_version

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
TOKEN = "bench-service-token-0123456789abcdef"
LIMIT = {"algorithm": "sliding_window_counter", "limit": 1_000_000_000, "window": 60}
# The wrk script: POST /check with the body template, "{k}" replaced by a key index that rotates.
WRK_SCRIPT = """
local template = os.getenv("BENCH_BODY")
local keys = tonumber(os.getenv("BENCH_KEYS"))
local counter = 0
wrk.method = "POST"
wrk.path = "/check"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
request = function()
  counter = counter + 1
  local body = template:gsub("{k}", tostring(counter % keys))
  return wrk.format(nil, nil, nil, body)
end
"""


def body_template(batch: int) -> str:
    if batch == 1:
        return json.dumps({"key": "user:{k}", **LIMIT})
    return json.dumps({"checks": [{"key": f"user:{{k}}:{index}", **LIMIT} for index in range(batch)]})


@dataclass
class Running:
    process: subprocess.Popen[bytes]
    base: str

    def pids(self) -> list[int]:
        """The server's process and its children (uvicorn's workers), from /proc."""
        found = [self.process.pid]
        index = 0
        while index < len(found):
            try:
                children = Path(f"/proc/{found[index]}/task/{found[index]}/children").read_text().split()
            except OSError:
                children = []
            found += [int(child) for child in children]
            index += 1
        return found

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) or 0.0 for pid in self.pids())


@contextmanager
def server(kind: str, workers: int, redis_url: str | None) -> Iterator[Running]:
    port = free_port()
    env = {**os.environ, "ASGI_RATELIMIT_TOKEN": TOKEN}
    if kind == "floor":
        command = [sys.executable, "-m", "uvicorn", "--factory", "service_floor:create_app"]
        command += ["--app-dir", str(BENCH_DIR), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    else:
        command = [sys.executable, "-m", "asgi_ratelimit", "serve", "--port", str(port), "--workers", str(workers)]
        # A budget of 1 s, not the default 0.05: on this shared machine a saturated event loop sometimes takes
        # longer than 50 ms to read Redis's answer, and the run would measure 503s, not decisions.
        command += ["--log-level", "warning", "--timeout", "1"]
        if redis_url is not None:
            command += ["--redis-url", redis_url, "--prefix", "benchservice:"]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield _started(Running(process, f"http://127.0.0.1:{port}"), command, log, workers)
        finally:
            stop(process)


def _started(running: Running, command: list[str], log: Any, workers: int) -> Running:
    """``running`` once it answers, and each of its workers has decided a check."""
    process = running.process
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{command} exited: {log.read().decode(errors='replace')}")
        try:
            if httpx.get(f"{running.base}/health/live", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command} did not answer within 30 s")
        time.sleep(0.1)
    # Every worker up before measuring: a few requests over fresh connections reach them all.
    for _ in range(4 * workers):
        check = httpx.post(
            f"{running.base}/check",
            content=body_template(1).replace("{k}", "warm"),
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=5,
        )
        assert check.status_code == 200 and check.json()["allowed"], check.text
    return running


def run_wrk(base: str, batch: int, connections: int, seconds: int, keys: int, script: Path) -> dict[str, Any]:
    env = {**os.environ, "BENCH_BODY": body_template(batch), "BENCH_KEYS": str(keys), "BENCH_TOKEN": TOKEN}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency", "-s", str(script)]
    done = subprocess.run([*command, base], capture_output=True, text=True, timeout=seconds + 30, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    if "rps" not in result:
        raise RuntimeError(f"could not read wrk's output:\n{done.stdout}")
    return result


def redis_cpu(url: str) -> float:
    import redis

    client = redis.Redis.from_url(url)
    try:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    finally:
        client.close()


SETUPS = [("floor", 1), ("floor", 2), ("memory", 1), ("redis", 1), ("redis", 2)]
MEDIAN_FIELDS = ("rps", "p50_ms", "p99_ms", "server_cpu_us", "redis_cpu_us")


def measure(args: argparse.Namespace, script: Path) -> list[dict[str, Any]]:
    """Every (server, body, connections) run once per round, servers in A B C ... then C B A ... order."""
    rows = []
    with private_redis() as redis_url:
        for round_index in range(args.rounds):
            setups = SETUPS if round_index % 2 == 0 else SETUPS[::-1]
            rows += measure_round(args, script, redis_url, setups, round_index)
    return rows


def measure_round(
    args: argparse.Namespace, script: Path, redis_url: str, setups: list[tuple[str, int]], round_index: int
) -> list[dict[str, Any]]:
    rows = []
    for kind, workers in setups:
        with server(kind, workers, redis_url if kind == "redis" else None) as running:
            for batch in (1, 10):
                for connections in (1, 50):
                    if args.warmup:
                        run_wrk(running.base, batch, connections, args.warmup, args.keys, script)
                    cpu_before, redis_before = running.cpu(), redis_cpu(redis_url)
                    result = run_wrk(running.base, batch, connections, args.duration, args.keys, script)
                    requests = max(1, result["requests"])
                    result.update(
                        round=round_index,
                        kind=kind,
                        workers=workers,
                        batch=batch,
                        connections=connections,
                        server_cpu_us=(running.cpu() - cpu_before) / requests * 1e6,
                        redis_cpu_us=(redis_cpu(redis_url) - redis_before) / requests * 1e6,
                    )
                    rows.append(result)
                    print(
                        f"{kind:6} workers={workers} batch={batch:2} c={connections:2}: {result['rps']:8,.0f} req/s"
                        f"  p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms"
                        f"  server CPU {result['server_cpu_us']:.0f} µs/req  Redis {result['redis_cpu_us']:.0f}",
                        flush=True,
                    )
    return rows


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, workers, checks, connections): the median of each figure over the rounds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["workers"], row["batch"], row["connections"]), []).append(row)
    merged = []
    for (kind, workers, batch, connections), runs in groups.items():
        row: dict[str, Any] = {"kind": kind, "workers": workers, "batch": batch, "connections": connections}
        for field in MEDIAN_FIELDS:
            row[field] = statistics.median(run[field] for run in runs)
        row["errors"] = sum(run["non_2xx"] + run["socket_errors"] for run in runs)
        row["requests"] = sum(run["requests"] for run in runs)
        merged.append(row)
    order = {setup: index for index, setup in enumerate(SETUPS)}
    return sorted(merged, key=lambda r: (order[(r["kind"], r["workers"])], r["batch"], r["connections"]))


def render(document: dict[str, Any]) -> str:
    rows = medians(document["rows"])
    floor = {(r["workers"], r["batch"], r["connections"]): r["rps"] for r in rows if r["kind"] == "floor"}
    env = document["environment"]
    lines = [
        f"asgi_ratelimit decision service — {document['run_id']} — medians of {document['rounds']} round(s), "
        f"wrk -t1, {document['duration']} s per run, keys rotating over {document['keys']}",
        f"{env['cpus']} CPUs shared by the server, wrk and redis-server (nothing pinned); Python {env['python']}; "
        f"{env['wrk']}",
        "",
        "| server | workers | checks | connections | req/s | x floor | p50 ms | p99 ms | server CPU µs/req "
        "| checks/s per server core | Redis CPU µs/req | non-2xx / requests |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        # Memory runs one worker only: it is set beside the one-worker floor.
        ratio = r["rps"] / floor[(r["workers"], r["batch"], r["connections"])]
        lines.append(
            f"| {r['kind']} | {r['workers']} | {r['batch']} | {r['connections']} | {r['rps']:,.0f} | {ratio:.2f} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_us']:.0f} "
            f"| {r['batch'] * 1e6 / r['server_cpu_us']:,.0f} | {r['redis_cpu_us']:.0f} "
            f"| {r['errors']} / {r['requests']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per run, no warm-up (a smoke run)")
    parser.add_argument("--rounds", type=int, help="rounds over all servers, medians reported (default 3, --quick 1)")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a saved run and exit")
    parser.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 5, --quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up before each (default 1, --quick 0)")
    parser.add_argument("--keys", type=int, default=10_000, help="identities the requests rotate over")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"bench_service.py: ignoring {' '.join(unknown)}", file=sys.stderr)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.duration = args.duration or (1 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if wrk_version() == "missing":
        sys.exit("bench_service.py needs wrk (apt-get install wrk)")
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script_file:
        script_file.write(WRK_SCRIPT)
    script = Path(script_file.name)
    try:
        rows = measure(args, script)
    finally:
        script.unlink(missing_ok=True)
    packages = {}
    for name in ("asgi-ratelimit-middleware", "starlette", "uvicorn", "uvloop", "httptools", "redis", "hiredis"):
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "missing"
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout
    document = {
        "run_id": run_id,
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "keys": args.keys,
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "wrk": wrk_version(),
            "redis_server": redis_version.strip(),
            "packages": packages,
        },
        "rows": rows,
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"service-{run_id}.json").write_text(json.dumps(document, indent=2) + "\n")
    table = render(document)
    (RESULTS_DIR / f"service-{run_id}.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
