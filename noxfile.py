"""Developer tasks, one session per gate.

nox -s tests | lint | typecheck | bench | bench_cluster | docs | plots | example | demo
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = ".[test,hiredis,jwt]"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite: with branch coverage, then the timing tests on their own without it.

    Coverage tracing slows every Python line several-fold, and the fault and failover tests assert
    latency and recovery bounds (e.g. timeout + 20 ms while Redis is down), so they run untraced.
    """
    session.install("-e", TEST_DEPS)
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    session.run(
        "pytest", "--cov", "--cov-report=term-missing:skip-covered", "-m", "not timing", *session.posargs, env=env
    )
    # Exit code 5 (no test selected) is fine here: posargs may name files without timing tests.
    session.run("pytest", "-m", "timing", *session.posargs, env=env, success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: style and common bugs."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", TEST_DEPS, "mypy")
    session.run("mypy", "--strict", "asgi_ratelimit")


@nox.session
def bench(session: nox.Session) -> None:
    """Every benchmarks/bench_*.py in turn; each prints its table and writes benchmarks/results/."""
    from pathlib import Path

    session.install("-e", ".[test,hiredis]")
    requirements = Path("benchmarks/requirements.txt")
    if requirements.exists():
        session.install("-r", str(requirements))
    for script in sorted(Path("benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)


@nox.session
def bench_cluster(session: nox.Session) -> None:
    """Decisions/s on a Redis Cluster of 1, 2 and 3 primaries (started on free ports); draws docs/plots/scaling.png."""
    session.install("-e", ".[test,hiredis]", "matplotlib")
    session.run("python", "benchmarks/cluster_bench.py", *session.posargs)


EXAMPLE_DEPS = (".[jwt]", "uvicorn>=0.30")


@nox.session
def example(session: nox.Session) -> None:
    """The example app on http://127.0.0.1:8000, in memory (REDIS_URL for Redis); args go to python -m example_app."""
    session.install("-e", *EXAMPLE_DEPS)
    session.run("python", "-m", "example_app", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start the example app, send it bursts, print each answer's status and rate-limit headers, stop it."""
    session.install("-e", *EXAMPLE_DEPS)
    session.run("python", "-m", "example_app.demo", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs --strict (a broken link or a page missing from nav fails)."""
    session.install("mkdocs-material")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def plots(session: nox.Session) -> None:
    """Redraw docs/plots/*.png: each algorithm under the same bursty traffic, decided by the real engine."""
    session.install("-e", ".", "matplotlib")
    session.run("python", "scripts/plots.py", *session.posargs)
