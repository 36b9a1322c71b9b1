"""``python -m example_app.demo [--fastapi]``: start the example app, send it bursts, show what the limiter answers.

``--fastapi`` runs the FastAPI variant: middleware rules per IP, and a RateLimit dependency per signed-in user.

The app runs as a child process on a free loopback port (in-memory counts) and is stopped, by its PID,
when the demo ends, whatever happens. Every request has a timeout and the whole run a deadline, so the
demo never hangs. ``--url http://host:port`` talks to an app that is already running instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import jwt

from example_app.app import JWT_SECRET

REQUEST_TIMEOUT = 5.0
START_TIMEOUT = 20.0


@dataclass
class Step:
    """One request of the demo: what it is, and how to send it."""

    label: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None = None


@dataclass
class Answer:
    """What came back: the status and the rate-limit headers."""

    status: int
    ratelimit: str
    retry_after: str
    allowed: bool | None = None  # the decision service's verdict, from its JSON body


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def send(base_url: str, step: Step) -> Answer:
    """Send one request; a 4xx or 5xx is an answer too, not an exception."""
    request = urllib.request.Request(base_url + step.path, data=step.body, method=step.method, headers=step.headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            status, headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, body = error.code, error.headers, b""
        error.close()
    answer = Answer(status, headers.get("RateLimit", ""), headers.get("Retry-After", ""))
    if step.path == "/check" and status == 200:
        answer.allowed = bool(json.loads(body)["allowed"])
    return answer


def lowest_remaining(ratelimit: str) -> str:
    """The tightest item of a ``RateLimit`` header, e.g. ``"login" r=0`` out of several policies."""
    best: tuple[int, str] | None = None
    for item in ratelimit.split(","):
        name, _, params = item.strip().partition(";")
        fields = dict(part.split("=", 1) for part in params.split(";") if "=" in part)
        if "r" in fields and (best is None or int(fields["r"]) < best[0]):
            best = (int(fields["r"]), f"{name.strip()} r={fields['r']}")
    return "-" if best is None else best[1]


def steps() -> Iterator[Step]:
    """The demo's traffic: a login brute force, then API bursts at each tier, then the decision service."""
    for number in range(1, 13):
        yield Step(f"login attempt {number} (one IP)", "POST", "/login", {})
    free = {"X-API-Key": "demo-free-key"}
    for number in range(1, 7):
        yield Step(f"GET /api/items #{number}, free key", "GET", "/api/items", free)
    pro_token = jwt.encode({"plan": "pro"}, JWT_SECRET, algorithm="HS256")
    pro = {"X-API-Key": "demo-pro-key", "Authorization": f"Bearer {pro_token}"}
    for number in range(1, 7):
        yield Step(f"GET /api/items #{number}, pro JWT", "GET", "/api/items", pro)
    forged_token = jwt.encode({"plan": "pro"}, "not-the-server-secret-0123456789abcdef", algorithm="HS256")
    forged = {"X-API-Key": "demo-forged-key", "Authorization": f"Bearer {forged_token}"}
    for number in range(1, 5):
        yield Step(f"GET /api/items #{number}, forged 'pro'", "GET", "/api/items", forged)
    check = json.dumps({"key": "demo-user", "algorithm": "gcra", "limit": 1, "period": 60}).encode()
    for number in range(1, 3):
        yield Step(f"POST /check #{number} (1/minute)", "POST", "/check", {"Content-Type": "application/json"}, check)


def fastapi_steps() -> Iterator[Step]:
    """The FastAPI variant's traffic: a login brute force (a middleware rule per IP), then two users and an
    anonymous caller on the route limited per user by a RateLimit dependency."""
    for number in range(1, 8):
        yield Step(f"login attempt {number} (one IP)", "POST", "/login", {})
    for user, plan, count in (("ann", "free", 5), ("bob", "pro", 4), ("cat", "free", 4)):
        bearer = jwt.encode({"sub": user, "plan": plan}, JWT_SECRET, algorithm="HS256")
        for number in range(1, count + 1):
            label = f"GET /api/items #{number}, {user} ({plan})"
            yield Step(label, "GET", "/api/items", {"Authorization": f"Bearer {bearer}"})
    yield Step("GET /api/items, anonymous", "GET", "/api/items", {})


def documented_429s(base_url: str) -> list[str]:
    """The operations whose OpenAPI entry lists a 429, as "METHOD /path"."""
    with urllib.request.urlopen(base_url + "/openapi.json", timeout=REQUEST_TIMEOUT) as response:
        schema = json.loads(response.read())
    return [
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if "429" in operation.get("responses", {})
    ]


def run(
    base_url: str, out: Callable[[str], None] = print, deadline: float = 60.0, traffic: Iterator[Step] | None = None
) -> list[Answer]:
    """Send every step (``traffic``, by default the Starlette app's) to ``base_url``; print a row per answer."""
    stop_at = time.monotonic() + deadline
    out(f"{'request':<36} {'status':>6}  {'RateLimit (tightest)':<24} Retry-After")
    out("-" * 80)
    answers = []
    for step in steps() if traffic is None else traffic:
        if time.monotonic() > stop_at:
            out(f"(stopped: the demo's {deadline:.0f} s deadline passed)")
            break
        answer = send(base_url, step)
        answers.append(answer)
        mark = "  <- limited" if answer.status == 429 or answer.allowed is False else ""
        retry = answer.retry_after or "-"
        out(f"{step.label:<36} {answer.status:>6}  {lowest_remaining(answer.ratelimit):<24} {retry:>11}{mark}")
    return answers


def wait_until_live(base_url: str, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Poll /health/live until the app answers; raise if it exits or takes longer than ``timeout``."""
    stop_at = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the example app exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(base_url + "/health/live", timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > stop_at:
            raise RuntimeError(f"the example app did not answer on {base_url}/health/live within {timeout:.0f} s")
        time.sleep(0.1)


@contextmanager
def example_app_process(port: int, *, fastapi: bool = False) -> Iterator[str]:
    """Run ``python -m example_app`` on ``port`` (in-memory counts); yield its URL; stop it by PID."""
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    variant = ["--fastapi"] if fastapi else []
    process = subprocess.Popen(
        [sys.executable, "-m", "example_app", *variant, "--port", str(port), "--log-level", "warning"],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_live(base_url, process)
        yield base_url
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m example_app.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an example app that is already running, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--port", type=int, default=0, help="the port for the app the demo starts (default: a free one)"
    )
    parser.add_argument("--fastapi", action="store_true", help="the FastAPI variant (per-user limits as a dependency)")
    args = parser.parse_args(argv)

    def out(line: str) -> None:
        print(line, flush=True)

    traffic = fastapi_steps() if args.fastapi else steps()
    documented: list[str] = []
    if args.url:
        answers = run(args.url.rstrip("/"), out, traffic=traffic)
        documented = documented_429s(args.url.rstrip("/")) if args.fastapi else []
    else:
        port = args.port or free_port()
        variant = "FastAPI " if args.fastapi else ""
        out(f"Starting the {variant}example app on http://127.0.0.1:{port} (MemoryBackend) ...")
        with example_app_process(port, fastapi=args.fastapi) as base_url:
            answers = run(base_url, out, traffic=traffic)
            documented = documented_429s(base_url) if args.fastapi else []
        out("Stopped the example app.")
    limited = sum(answer.status == 429 for answer in answers)
    out(f"\n{len(answers)} requests, {limited} answered 429; each 429 says in Retry-After when to try again.")
    if args.fastapi:
        out("Each user is counted apart, at their plan's limits; the anonymous caller gets the route's 401.")
        out(f"The OpenAPI document (/docs) lists a 429 on: {', '.join(documented)}.")
    else:
        out('POST /check answers 200 either way: its JSON body says {"allowed": false, "retry_after": ...}.')
    return 0 if limited else 1


if __name__ == "__main__":
    sys.exit(main())
