"""Every Python snippet in the docs and the README runs as it is, and the apps it builds answer.

No snippet can opt out. One that talks to a Redis server says so in the markdown, on the line just
before its fence:

    <!-- docs-test: redis -->   (runs where a Redis answers, skips or fails like the other ``redis``
                                 tests otherwise, with REDIS_URL exported to it)

A snippet of another project's code (the "before" side of a migration page) names the package it needs:

    <!-- docs-test: needs slowapi -->   (runs where that package is installed, e.g. with
                                         benchmarks/requirements.txt; skips, saying so, elsewhere)
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(path.name for path in DOCS.glob("*.md")), "README.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*docs-test:\s*redis\s*-->\s*\Z")
NEEDS = re.compile(r"<!--\s*docs-test:\s*needs\s+([A-Za-z_][A-Za-z0-9_.]*)\s*-->\s*\Z")


def page_path(page: str) -> Path:
    return ROOT / page if page == "README.md" else DOCS / page


def snippets() -> list[Any]:
    found = []
    for page in PAGES:
        text = page_path(page).read_text(encoding="utf-8")
        for index, match in enumerate(FENCE.finditer(text)):
            line = text.count("\n", 0, match.start()) + 2
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = MARKER.search(before)
            needs = NEEDS.search(before)
            marks = [pytest.mark.redis] if marker else []
            param_id = f"{page}:{line}:{index}"
            found.append(
                pytest.param(match.group(1), marker is not None, needs and needs.group(1), id=param_id, marks=marks)
            )
    return found


def test_the_docs_have_snippets() -> None:
    pages = {param.id.split(":")[0] for param in snippets()}
    # The middleware's pages at least; any page may add more, and every one found is run.
    assert {"quickstart.md", "rules.md", "headers.md", "algorithms.md", "extractors.md", "index.md"} <= pages


def test_markers_are_spelled_right() -> None:
    for page in PAGES:
        for line in page_path(page).read_text(encoding="utf-8").splitlines():
            if "docs-test" in line:
                known = MARKER.search(line.strip()) or NEEDS.search(line.strip())
                assert known, f"{page}: unknown docs-test marker {line.strip()!r}"


async def _request_root(app: Any) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
        return await client.get("/")


@pytest.mark.parametrize(("source", "needs_redis", "needs_package"), snippets())
def test_snippet_runs(
    source: str, needs_redis: bool, needs_package: str | None, request: pytest.FixtureRequest, monkeypatch: Any
) -> None:
    if needs_package:
        pytest.importorskip(needs_package, reason=f"another project's code: needs {needs_package} installed")
    if needs_redis:
        monkeypatch.setenv("REDIS_URL", request.getfixturevalue("redis_url"))
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    # A plain (not async) test: snippets call asyncio.run() themselves, which needs no running loop.
    exec(compile(source, "<docs snippet>", "exec"), namespace)
    if "RedisBackend" in source and not needs_redis:
        return  # building it is the test; a request would write to the machine's Redis
    for name in ("app", "other"):
        if name in namespace:
            # Starlette builds its middleware at the first request: a configuration mistake shows here.
            response = asyncio.run(_request_root(namespace[name]))
            assert response.status_code in (200, 404, 405), response.text
