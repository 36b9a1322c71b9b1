"""Developer tasks, one session per gate: nox -s tests | lint | typecheck | bench."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TEST_DEPS = ".[test,hiredis,jwt]"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, with branch coverage."""
    session.install("-e", TEST_DEPS)
    session.run(
        "pytest", "--cov", "--cov-report=term-missing:skip-covered", *session.posargs,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )


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
