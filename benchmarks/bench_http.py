"""HTTP comparison: asgi_ratelimit against the bare apps and the other Python rate limiters, in one run.

Every config (see httpbench/apps.py) serves ``GET /`` with a small JSON body, keyed by client IP, and is
measured three ways, configs alternating A B C ... C B A ... over ``--rounds`` rounds:

1. in process: the ASGI app called directly with hand-built scope/receive/send, sequentially and with
   ``--concurrency`` requests in flight;
2. through uvicorn (1 worker, uvloop, httptools) loaded by ``wrk -t1 -c<concurrency>``;
3. Redis per request: round trips, commands (counting those run inside Lua) and scripts, counted exactly on
   a private redis-server once per config, and from the shared Redis's counters during every run.

Prints medians and ratios (against the bare app of the same framework, and ours against the best peer) and
writes the raw per-round figures with the environment to benchmarks/results/http-<timestamp>.json.

    python benchmarks/bench_http.py --quick          # smoke test, under a minute
    python benchmarks/bench_http.py                  # the default run, about 7 minutes
    python benchmarks/bench_http.py --only slowapi,ours-redis --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import redis
from httpbench import apps, inprocess, redisstats, report, server
from httpbench.apps import Config

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KEY_TOKEN = "benchhttp"
PACKAGES = (
    "asgi-ratelimit-middleware",
    "starlette",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
    "slowapi",
    "limits",
    "fastapi-limiter",
    "pyrate-limiter",
    "asgi-ratelimit",
)
# --only accepts these group names besides config names and patterns.
GROUPS = {"ours": "ours", "peers": "peer", "bare": "bare"}
T = TypeVar("T")


# -- command line ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (1 round, 1 s per wrk run): < 1 min")
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help="configs to run: names, shell patterns, or the groups ours, peers, bare; see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the configs and exit")
    parser.add_argument("--rounds", type=int, help="rounds over all configs (default 3, --quick 1)")
    parser.add_argument("--duration", type=int, help="seconds of each measured wrk run (default 5, --quick 1)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up before each (default 1, --quick 0)")
    parser.add_argument(
        "--inprocess-seconds", type=float, help="seconds of each in-process run (default 1.0, --quick 0.1)"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight / wrk connections (50)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/1", help="the Redis every limiter uses")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin uvicorn and wrk to CPUs")
    parser.add_argument("--no-server", dest="server", action="store_false", help="skip the uvicorn + wrk runs")
    parser.add_argument("--no-inprocess", dest="inprocess", action="store_false", help="skip the in-process runs")
    parser.add_argument(
        "--no-private-redis", dest="private_redis", action="store_false", help="skip the exact Redis counts"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where the JSON goes (benchmarks/results)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="recompute the summary and tables of a results file from its raw rounds, rewrite it and its .md",
    )
    # nox passes the same arguments to every benchmarks/bench_*.py: tolerate the other scripts' options.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"note: ignoring arguments bench_http.py does not know: {' '.join(unknown)}")
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (1 if quick else 5)
    args.warmup = args.warmup if args.warmup is not None else (0 if quick else 1)
    args.inprocess_seconds = args.inprocess_seconds or (0.1 if quick else 1.0)
    return args


def select(only: str | None) -> tuple[list[Config], list[str]]:
    """The configs named by --only (plus the bare apps they are compared with), and notes on the rest."""
    if not only:
        return list(apps.CONFIGS), []
    patterns = [name.strip() for name in only.split(",") if name.strip()]
    kinds = {GROUPS[pattern] for pattern in patterns if pattern in GROUPS}

    def chosen(config: Config) -> bool:
        return config.kind in kinds or any(fnmatch.fnmatch(config.name, pattern) for pattern in patterns)

    notes = [
        f"no config matches {pattern!r}"
        for pattern in patterns
        if pattern not in GROUPS and not fnmatch.filter(apps.BY_NAME, pattern)
    ]
    wanted = {config.name for config in apps.CONFIGS if chosen(config)}
    wanted |= {apps.BY_NAME[name].bare for name in wanted}
    return [config for config in apps.CONFIGS if config.name in wanted], notes


# -- running ---------------------------------------------------------------------------------------------


def run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh uvloop loop (asyncio's if uvloop is missing), as uvicorn would."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(factory())
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(factory())
    uvloop.install()  # pragma: no cover - Python 3.10
    return asyncio.run(factory())


async def _in_process(
    config: Config, ctx: apps.BuildContext, phases: list[tuple[str, float, int]], counters: Any
) -> dict[str, Any]:
    """Build the app, run its lifespan, then each (name, seconds, concurrency) phase with counters around it."""
    built = config.build(ctx)
    lifespan = inprocess.Lifespan(built.app)
    results: dict[str, Any] = {}
    try:
        await lifespan.startup()
        for name, seconds, concurrency in phases:
            before = counters()
            run = await inprocess.drive(built.app, seconds, concurrency, lifespan.state)
            after = counters()
            results[name] = run.as_dict()
            if before is not None:
                results[name]["redis"] = redisstats.per_request(before, after, run.requests)
        await lifespan.shutdown()
    finally:
        await built.aclose()
    return results


def key_prefix(run_id: str, config: Config) -> str:
    return f"{KEY_TOKEN}-{run_id}-{config.name}:"


def exact_redis_counts(configs: list[Config], args: argparse.Namespace, run_id: str) -> dict[str, Any]:
    """Per-request Redis figures for each Redis config, on a private redis-server that nothing else uses."""
    results: dict[str, Any] = {}
    seconds = 0.06 if args.quick else 0.3
    try:
        with server.private_redis() as url:
            client = redis.Redis.from_url(url)
            for config in configs:
                if not config.redis:
                    continue
                ctx = apps.BuildContext(url, key_prefix(run_id, config))
                # Warm up with requests in flight, so the pool has grown before anything is counted.
                phases = [("warmup", seconds / 2, args.concurrency), ("sequential", seconds, 1)]
                phases.append(("concurrent", seconds, args.concurrency))
                start = redisstats.snapshot(client)
                try:
                    runs = run_async(
                        lambda c=config, x=ctx, p=phases: _in_process(c, x, p, lambda: redisstats.snapshot(client))
                    )
                except Exception as exc:
                    results[config.name] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"  {config.name}: exact Redis count failed: {exc}")
                    continue
                end = redisstats.snapshot(client)
                results[config.name] = {
                    "sequential": runs["sequential"]["redis"],
                    "concurrent": runs["concurrent"]["redis"],
                    # Everything the app opened, warm-up included: the size its pool grew to.
                    "connections_opened": end.connections_received - start.connections_received,
                    "keys": redisstats.sample_keys(client, f"*{ctx.prefix}*"),
                }
            client.close()
    except RuntimeError as exc:
        print(f"note: no exact Redis counts ({exc}); the shared Redis's counters are used instead")
    return results


def run_config(
    config: Config, args: argparse.Namespace, run_id: str, shared: Any, cpus: tuple[int | None, int | None]
) -> dict[str, Any]:
    """One round of one config: in process, then under uvicorn."""
    ctx = apps.BuildContext(args.redis_url, key_prefix(run_id, config))
    result: dict[str, Any] = {}

    def counters() -> redisstats.Snapshot:
        return redisstats.snapshot(shared)

    if args.inprocess:
        warmup = min(0.3, args.inprocess_seconds)
        phases = [("warmup", warmup, args.concurrency), ("sequential", args.inprocess_seconds, 1)]
        phases.append(("concurrent", args.inprocess_seconds, args.concurrency))
        try:
            runs = run_async(lambda: _in_process(config, ctx, phases, counters))
            runs.pop("warmup", None)
            result["inprocess"] = runs
        except Exception as exc:
            result["inprocess"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {config.name}: in-process run failed: {exc}")

    if args.server:
        env = {apps.ENV_CONFIG: config.name, apps.ENV_REDIS_URL: args.redis_url, apps.ENV_PREFIX: ctx.prefix}
        server_cpu, wrk_cpu = cpus
        try:
            with server.uvicorn_server(env, server_cpu) as running:
                if args.warmup:
                    server.run_wrk(running.url, args.warmup, args.concurrency, wrk_cpu, latency=False)
                before, cpu_before = counters(), server.cpu_seconds(running.proc.pid)
                figures = server.run_wrk(running.url, args.duration, args.concurrency, wrk_cpu)
                after, cpu_after = counters(), server.cpu_seconds(running.proc.pid)
                requests = figures.get("requests", 0)
                figures["redis"] = redisstats.per_request(before, after, requests)
                if cpu_before is not None and cpu_after is not None and requests:
                    # The server's CPU per request holds up when other jobs take CPU; its req/s does not.
                    figures["cpu_us"] = round((cpu_after - cpu_before) * 1e6 / requests, 2)
                figures["rss_kib"] = server.rss_kib(running.proc.pid)
            result["server"] = figures
        except Exception as exc:
            result["server"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {config.name}: uvicorn run failed: {exc}")
    return result


# -- summary ---------------------------------------------------------------------------------------------


def _get(data: dict[str, Any], *path: str) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def summarise(configs: list[Config], rounds: list[dict[str, Any]], exact: dict[str, Any]) -> dict[str, Any]:
    """Per config: medians over rounds, and per-round ratios to the bare app of the same round, medianed."""
    summary: dict[str, Any] = {}
    for config in configs:
        per_round = [r["results"].get(config.name, {}) for r in rounds]
        bares = [r["results"].get(config.bare, {}) for r in rounds]
        row: dict[str, Any] = {"label": config.label, "kind": config.kind, "framework": config.framework}
        for path, key in (
            (("server", "rps"), "server_rps"),
            (("inprocess", "sequential", "rps"), "seq_rps"),
            (("inprocess", "concurrent", "rps"), "conc_rps"),
        ):
            values = [_get(result, *path) for result in per_round]
            references = [_get(bare, *path) for bare in bares]
            row[key] = report.median(values)
            row[f"{key}_ratio"] = report.median(report.ratio(v, b) for v, b in zip(values, references, strict=True))
            row[f"{key}_added_us"] = report.median(
                report.added_us(v, b) for v, b in zip(values, references, strict=True)
            )
        for path, key in (
            (("server", "cpu_us"), "server_cpu_us"),
            (("inprocess", "sequential", "cpu_us"), "seq_cpu_us"),
            (("inprocess", "concurrent", "cpu_us"), "conc_cpu_us"),
        ):
            values = [_get(result, *path) for result in per_round]
            references = [_get(bare, *path) for bare in bares]
            row[key] = report.median(values)
            row[f"{key}_added"] = report.median(
                v - b if v is not None and b is not None else None for v, b in zip(values, references, strict=True)
            )
        for field in ("p50_ms", "p99_ms", "rss_kib"):
            row[field] = report.median(_get(result, "server", field) for result in per_round)
        row["server_requests"] = sum(_get(result, "server", "requests") or 0 for result in per_round)
        row["server_non_2xx"] = sum(_get(result, "server", "non_2xx") or 0 for result in per_round)
        row["server_socket_errors"] = sum(_get(result, "server", "socket_errors") or 0 for result in per_round)
        statuses: dict[str, int] = {}
        for result in per_round:
            for phase in ("sequential", "concurrent"):
                for code, count in (_get(result, "inprocess", phase, "statuses") or {}).items():
                    statuses[code] = statuses.get(code, 0) + count
        row["inprocess_statuses"] = statuses
        row["shared_redis"] = {
            measure: report.median(_get(result, "server", "redis", measure) for result in per_round)
            for measure in ("commands", "scripts", "round_trips")
        }
        row["shared_redis_inprocess"] = {
            phase: {
                measure: report.median(_get(result, "inprocess", phase, "redis", measure) for result in per_round)
                for measure in ("commands", "scripts", "round_trips")
            }
            for phase in ("sequential", "concurrent")
        }
        row["exact_redis"] = exact.get(config.name)
        row["errors"] = [
            f"round {index + 1} {phase}: {result[phase]['error']}"
            for index, result in enumerate(per_round)
            for phase in ("inprocess", "server")
            if isinstance(result.get(phase), dict) and "error" in result[phase]
        ]
        row["warnings"] = _checks(config, row)
        summary[config.name] = row
    return summary


def _checks(config: Config, row: dict[str, Any]) -> list[str]:
    """Is the config doing what it claims: the expected statuses, and reaching Redis when it should?"""
    warnings: list[str] = []
    requests, non_2xx = row["server_requests"], row["server_non_2xx"]
    statuses = row["inprocess_statuses"]
    in_process_total = sum(statuses.values())
    expected = statuses.get(str(config.expect), 0)
    if config.expect == 200:
        if non_2xx:
            warnings.append(f"{non_2xx} of {requests} responses through uvicorn were not 2xx")
        if in_process_total and expected != in_process_total:
            warnings.append(f"in process, statuses were {statuses}, expected only 200")
    else:
        if requests and non_2xx < 0.99 * requests:
            warnings.append(f"only {non_2xx} of {requests} responses through uvicorn were rejected")
        if in_process_total and expected < 0.99 * in_process_total:
            warnings.append(f"in process, statuses were {statuses}, expected ~all {config.expect}")
    if row["server_socket_errors"]:
        warnings.append(f"wrk saw {row['server_socket_errors']} socket errors")
    if config.redis and config.expect == 200:
        # A limiter that fails open (a timeout, a circuit breaker) answers without Redis. Each decision runs
        # a fixed number of commands (counted exactly on the private Redis); a run with fewer per request
        # skipped Redis for some requests, and its figures are not those of a limiter. (The shared counters
        # include other clients' traffic, so they can hide a shortfall but not invent one.)
        runs = {
            "exact, in flight": _get(row, "exact_redis", "concurrent", "commands"),
            "uvicorn": row["shared_redis"]["commands"],
            "in process, sequential": row["shared_redis_inprocess"]["sequential"]["commands"],
            "in process, in flight": row["shared_redis_inprocess"]["concurrent"]["commands"],
        }
        reference = _get(row, "exact_redis", "sequential", "commands")
        if reference is None:
            reference = max((value for value in runs.values() if value is not None), default=None)
        if reference is not None and reference < 0.95:
            warnings.append(f"only {reference:.2f} Redis commands per request: is it using Redis at all?")
        elif reference is not None:
            low = {run: value for run, value in runs.items() if value is not None and value < 0.9 * reference}
            if low:
                shown = ", ".join(f"{run}: {value:.2f}" for run, value in low.items())
                warnings.append(
                    f"Redis commands per request fell below the {reference:.2f} of a decision ({shown}): "
                    "some requests did not reach Redis (failing open?)"
                )
    return warnings


def render(summary: dict[str, Any], skipped: dict[str, str], meta: dict[str, Any]) -> str:
    """The tables and notes printed at the end."""
    names = list(summary)
    out: list[str] = []
    settings = meta["settings"]
    out.append(
        f"asgi_ratelimit HTTP comparison — {meta['timestamp']} — {settings['rounds']} round(s), medians; "
        f"ratio = per-round ratio to the bare app of the same framework"
    )
    out.append(
        f"{meta['environment']['cpu_count']} CPUs shared by uvicorn, wrk and Redis ({settings['pinning']}); "
        f"Python {meta['environment']['python']}"
    )

    if settings["server"]:
        out.append("")
        out.append(
            f"Through uvicorn (1 worker, {' '.join(settings['uvicorn_options'][:4])}), "
            f"wrk -t1 -c{settings['concurrency']} -d{settings['duration']}s"
        )
        rows = []
        for name in names:
            row = summary[name]
            rows.append(
                [
                    name,
                    report.fmt(row["server_rps"]),
                    report.fmt(row["server_rps_ratio"], 3),
                    report.fmt_signed(row["server_rps_added_us"]),
                    report.fmt(row["server_cpu_us"], 1),
                    report.fmt_signed(row["server_cpu_us_added"]),
                    report.fmt(row["p50_ms"], 2),
                    report.fmt(row["p99_ms"], 2),
                    f"{row['server_non_2xx']:,} / {row['server_requests']:,}",
                    report.fmt((row["rss_kib"] or 0) / 1024 if row["rss_kib"] else None, 1),
                ]
            )
        headers = ["config", "req/s", "ratio", "+µs/req", "CPU µs/req", "+CPU µs", "p50 ms", "p99 ms"]
        headers += ["non-2xx / requests", "RSS MiB"]
        out.append(report.table(headers, rows))

    if settings["inprocess"]:
        out.append("")
        out.append(
            f"In process (scope/receive/send by hand, uvloop): sequential and {settings['concurrency']} in flight"
        )
        rows = []
        for name in names:
            row = summary[name]
            statuses = ", ".join(f"{code}: {count:,}" for code, count in row["inprocess_statuses"].items())
            rows.append(
                [
                    name,
                    report.fmt(row["seq_rps"]),
                    report.fmt(row["seq_rps_ratio"], 3),
                    report.fmt_signed(row["seq_rps_added_us"]),
                    report.fmt(row["conc_rps"]),
                    report.fmt(row["conc_rps_ratio"], 3),
                    report.fmt_signed(row["conc_rps_added_us"]),
                    report.fmt_signed(row["seq_cpu_us_added"]),
                    report.fmt_signed(row["conc_cpu_us_added"]),
                    statuses or "-",
                ]
            )
        headers = ["config", "seq req/s", "ratio", "+µs/req", f"{settings['concurrency']}-flight req/s"]
        headers += ["ratio", "+µs/req", "+CPU µs seq", "+CPU µs flight", "statuses"]
        out.append(report.table(headers, rows, [False, *([True] * 8), False]))

    redis_rows = [name for name in names if apps.BY_NAME[name].redis]
    if redis_rows:
        out.append("")
        out.append(
            "Redis per request: exact counts on a private redis-server (commands include those run inside Lua; "
            "round trips = socket reads);"
        )
        out.append("'shared' = the shared Redis's counters during the uvicorn runs (includes anyone else's traffic)")
        rows = []
        for name in redis_rows:
            row = summary[name]
            exact = row["exact_redis"] or {}
            rows.append(
                [
                    name,
                    report.fmt(_get(exact, "sequential", "round_trips"), 2),
                    report.fmt(_get(exact, "concurrent", "round_trips"), 2),
                    report.fmt(_get(exact, "sequential", "commands"), 2),
                    report.fmt(_get(exact, "sequential", "scripts"), 2),
                    report.fmt(exact.get("connections_opened")),
                    report.fmt(_get(exact, "concurrent", "cpu_us"), 1),
                    report.fmt(row["shared_redis"]["round_trips"], 2),
                    report.fmt(row["shared_redis"]["commands"], 2),
                ]
            )
        headers = ["config", "round trips", f"RT, {settings['concurrency']} in flight", "commands", "scripts"]
        headers += ["connections", "Redis CPU µs", "shared RT", "shared cmds"]
        out.append(report.table(headers, rows))

    out.extend(_versus(summary))

    if "bare-fastapi" in summary and "bare-starlette" in summary:
        fastapi_row, starlette_row = summary["bare-fastapi"], summary["bare-starlette"]
        relative = report.ratio(fastapi_row["server_rps"], starlette_row["server_rps"])
        if relative is not None:
            out.append("")
            out.append(
                f"bare FastAPI through uvicorn = {relative:.2f} of bare Starlette (FastAPI rows are compared to it)"
            )

    notes = [f"skipped {name}: {reason}" for name, reason in skipped.items()]
    for name in names:
        notes += [f"ERROR {name}: {error}" for error in summary[name]["errors"]]
        notes += [f"WARNING {name}: {warning}" for warning in summary[name]["warnings"]]
    if notes:
        out.append("")
        out.extend(notes)
    return "\n".join(out)


# Added cost per request by which "best peer" is chosen, first available: CPU holds up under load, and an
# absolute cost, unlike a ratio to the bare app, does not flatter limiters on a slower framework.
VERSUS_MEASURES = (
    ("server_cpu_us_added", "+server CPU µs/req under uvicorn"),
    ("conc_cpu_us_added", "+CPU µs/req in process, in flight"),
    ("conc_rps_added_us", "+µs/req in process, in flight"),
)


def _versus(summary: dict[str, Any]) -> list[str]:
    """Each of our configs against the cheapest peer that expects the same status."""
    ours = [name for name, row in summary.items() if row["kind"] == "ours"]
    if not ours:
        return []
    rows = []
    chosen_by = ""
    for name in ours:
        expect = apps.BY_NAME[name].expect
        peers = [peer for peer, row in summary.items() if row["kind"] == "peer" and apps.BY_NAME[peer].expect == expect]
        measure = next(
            (
                key
                for key, _ in VERSUS_MEASURES
                if summary[name][key] is not None and any(summary[peer][key] is not None for peer in peers)
            ),
            None,
        )
        if measure is None:
            continue
        chosen_by = dict(VERSUS_MEASURES)[measure]
        ranked = [peer for peer in peers if summary[peer][measure] is not None]
        best = min(ranked, key=lambda peer: summary[peer][measure])
        mine, theirs = summary[name], summary[best]

        def both(key: str, digits: int = 1, mine: dict[str, Any] = mine, theirs: dict[str, Any] = theirs) -> str:
            if key.endswith("_rps"):
                return f"{report.fmt(mine[key])} vs {report.fmt(theirs[key])}"
            return f"{report.fmt_signed(mine[key], digits)} vs {report.fmt_signed(theirs[key], digits)}"

        cheaper = report.ratio(theirs[measure], mine[measure]) if mine[measure] > 0 else None
        rows.append(
            [
                name,
                best,
                both(measure),
                report.fmt(cheaper, 2, "x"),
                both("server_rps"),
                both("conc_rps_added_us"),
                both("conc_cpu_us_added"),
            ]
        )
    if not rows:
        return ["", "Ours against the best peer: no peer with results in this run (see --only)"]
    out = [
        "",
        f"Ours against the best peer: the peer expecting the same status with the least {chosen_by};",
        "'peer / ours' = the peer's added cost over ours (above 1: ours costs less)",
    ]
    headers = ["ours", "best peer", "added cost", "peer / ours", "uvicorn req/s", "+µs in flight", "+CPU µs in flight"]
    out.append(report.table(headers, rows, [False, False, True, True, True, True, True]))
    return out


# -- environment -----------------------------------------------------------------------------------------


def environment(shared: Any) -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        redis_version = shared.info("server").get("redis_version")
    except redis.RedisError:
        redis_version = None
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    )
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "redis_server": redis_version,
        "wrk": server.wrk_version(),
        "git": git.stdout.strip() or None,
        "versions": versions,
    }


# -- main ------------------------------------------------------------------------------------------------


def rerender(path: Path) -> int:
    """Summarise a results file again from its raw rounds with this version of the code, and rewrite it."""
    document = json.loads(path.read_text())
    configs = [apps.BY_NAME[name] for name in document["configs"] if name in apps.BY_NAME]
    summary = summarise(configs, document["rounds"], document.get("exact_redis", {}))
    document["summary"] = summary
    document["meta"]["rendered"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = render(summary, document.get("skipped", {}), document["meta"])
    print(text)
    path.write_text(json.dumps(document, indent=1) + "\n")
    path.with_suffix(".md").write_text(text + "\n")
    print(f"\nrewrote {path} and {path.with_suffix('.md').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args.render)
    if args.list:
        for config in apps.CONFIGS:
            reason = apps.missing_requirement(config)
            print(f"{config.name:22} {config.label}" + (f"  [skipped here: {reason}]" if reason else ""))
        return 0

    selected, notes = select(args.only)
    for note in notes:
        print(f"note: {note}")
    skipped: dict[str, str] = {}
    configs: list[Config] = []
    for config in selected:
        reason = apps.missing_requirement(config)
        if reason:
            skipped[config.name] = reason
            print(f"note: skipping {config.name}: {reason}")
        else:
            configs.append(config)
    if not any(config.kind != "bare" for config in configs):
        print("note: nothing to compare (no limiter config selected and runnable)")
        return 0

    shared = redis.Redis.from_url(args.redis_url)
    try:
        shared.ping()
    except redis.RedisError as exc:
        print(f"error: no Redis at {args.redis_url}: {exc}", file=sys.stderr)
        return 2
    if args.server and shutil.which("wrk") is None:
        print("note: wrk is not installed: skipping the uvicorn runs")
        args.server = False

    cpus: tuple[int | None, int | None] = (None, None)
    pinning = "not pinned"
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if args.pin and len(affinity) >= 2 and server.pin_prefix(0):
        cpus = (affinity[0], affinity[1])
        pinning = f"uvicorn on CPU {cpus[0]}, wrk on CPU {cpus[1]}, Redis and this harness unpinned"

    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    run_id = f"{stamp}-{os.getpid()}"
    meta: dict[str, Any] = {
        "benchmark": "bench_http",
        "timestamp": stamp,
        "environment": environment(shared),
        "settings": {
            "rounds": args.rounds,
            "duration": args.duration,
            "warmup": args.warmup,
            "inprocess_seconds": args.inprocess_seconds,
            "concurrency": args.concurrency,
            "redis_url": args.redis_url,
            "key_prefix": f"{KEY_TOKEN}-{run_id}-",
            "quick": args.quick,
            "server": args.server,
            "inprocess": args.inprocess,
            "pinning": pinning,
            "uvicorn_options": server.uvicorn_options(),
            "order": "configs in table order on odd rounds, reversed on even rounds",
        },
    }
    print(
        f"{len(configs)} configs x {args.rounds} round(s); wrk {args.duration}s (+{args.warmup}s warm-up), "
        f"in process {args.inprocess_seconds}s x 2; {pinning}"
    )

    rounds: list[dict[str, Any]] = []
    try:
        exact: dict[str, Any] = {}
        if args.private_redis:
            print("exact Redis counts on a private redis-server ...")
            exact = exact_redis_counts(configs, args, run_id)
        for index in range(args.rounds):
            order = configs if index % 2 == 0 else configs[::-1]
            record: dict[str, Any] = {"round": index + 1, "order": [c.name for c in order], "results": {}}
            print(f"round {index + 1}/{args.rounds}")
            for config in order:
                begun = time.monotonic()
                result = run_config(config, args, run_id, shared, cpus)
                record["results"][config.name] = result
                rps = _get(result, "server", "rps")
                seq = _get(result, "inprocess", "sequential", "rps")
                print(
                    f"  {config.name:22} uvicorn {report.fmt(rps):>8} req/s   in process {report.fmt(seq):>8} req/s"
                    f"   ({time.monotonic() - begun:.1f} s)"
                )
            rounds.append(record)
    finally:
        removed = redisstats.delete_keys(shared, f"*{KEY_TOKEN}-{run_id}-*")
        shared.close()
        print(f"removed {removed} benchmark keys from {args.redis_url}")

    summary = summarise(configs, rounds, exact)
    meta["finished"] = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta["environment"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    text = render(summary, skipped, meta)
    print()
    print(text)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"http-{stamp}{'-quick' if args.quick else ''}.json"
    document = {
        "meta": meta,
        "configs": {
            config.name: {
                "label": config.label,
                "framework": config.framework,
                "kind": config.kind,
                "redis": config.redis,
                "expect": config.expect,
                "compared_with": config.bare,
            }
            for config in configs
        },
        "skipped": skipped,
        "exact_redis": exact,
        "rounds": rounds,
        "summary": summary,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    path.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.md').name}")
    return 1 if any(summary[name]["errors"] for name in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
