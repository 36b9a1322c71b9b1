"""Developer tasks, one session per gate.

nox -s tests | tests_lowest | lint | typecheck | bench | bench_cluster | docs | plots | example | demo
"""

from __future__ import annotations

import glob
import os
import re

import nox
import tomllib

nox.options.sessions = ["tests", "tests_lowest", "lint", "typecheck"]
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


def _lowest_versions() -> list[str]:
    """``name==X`` for the lower bound of every runtime dependency, the optional ones the tests use
    (hiredis, PyJWT), and FastAPI: read from pyproject.toml, so the bounds it declares are the ones tested."""
    with open("pyproject.toml", "rb") as file:
        project = tomllib.load(file)["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["hiredis"], *extras["jwt"]]
    wanted += [spec for spec in extras["test"] if spec.startswith("fastapi")]
    pins = []
    for spec in wanted:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9][0-9.]*)(?:,<[0-9][0-9.]*)?", spec)
        if match is None:
            raise ValueError(f"pyproject.toml: {spec!r} has no plain >= lower bound to test")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


def _oldest_python() -> str:
    """The lowest Python the package declares (3.10), as pyenv installs it, else whatever nox finds."""
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10.*/bin/python3.10")))
    return found[-1] if found else "3.10"


@nox.session(python=_oldest_python())
def tests_lowest(session: nox.Session) -> None:
    """The suite on Python 3.10 with the lowest version of every declared dependency (pyproject's >= bounds)."""
    session.install("-e", TEST_DEPS, *_lowest_versions())
    session.run("pip", "list", "--format=freeze", silent=False)
    env = {"PYTHONDONTWRITEBYTECODE": "1"}
    session.run("pytest", "-m", "not timing", *session.posargs, env=env)
    session.run("pytest", "-m", "timing", *session.posargs, env=env, success_codes=[0, 5])


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: style and common bugs."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, and over a small typed FastAPI app that uses its public API."""
    session.install("-e", TEST_DEPS, "mypy")
    session.run("mypy", "--strict", "asgi_ratelimit")
    # The user's side: decorated endpoints keep their types, no Any leaks (see the file's docstring).
    session.run("mypy", "--strict", "tests/typing")


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


EXAMPLE_DEPS = (".[jwt,fastapi]", "uvicorn>=0.30")


@nox.session
def example(session: nox.Session) -> None:
    """The example app on http://127.0.0.1:8000, in memory (REDIS_URL for Redis); args go to python -m example_app."""
    session.install("-e", *EXAMPLE_DEPS)
    session.run("python", "-m", "example_app", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start the example app, send it bursts, print each answer's status and rate-limit headers, stop it;
    then the same for its FastAPI variant (IP limits as middleware rules, per-user limits as a dependency)."""
    session.install("-e", *EXAMPLE_DEPS)
    session.run("python", "-m", "example_app.demo", *session.posargs)
    session.run("python", "-m", "example_app.demo", "--fastapi", *session.posargs)


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
