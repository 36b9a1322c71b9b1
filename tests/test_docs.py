"""The Python snippets in the middleware's docs pages run as they are, and the apps they build answer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = ["quickstart.md", "rules.md", "headers.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets() -> list[Any]:
    found = []
    for page in PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for index, match in enumerate(FENCE.finditer(text)):
            line = text.count("\n", 0, match.start()) + 2
            found.append(pytest.param(match.group(1), id=f"{page}:{line}:{index}"))
    return found


def test_every_page_has_snippets() -> None:
    pages = {param.id.split(":")[0] for param in snippets()}
    assert pages == set(PAGES)


@pytest.mark.parametrize("source", snippets())
async def test_snippet_runs(source: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    exec(compile(source, "<docs snippet>", "exec"), namespace)
    if "RedisBackend" in source:
        return  # building it is the test; a request would write to the machine's Redis
    apps = [value for name, value in namespace.items() if name in ("app", "other")]
    for app in apps:
        # Starlette builds its middleware at the first request: a configuration mistake shows here.
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            response = await client.get("/")
        assert response.status_code in (200, 404, 405), response.text
