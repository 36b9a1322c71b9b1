"""Every ``curl`` example in docs/service.md runs against a real ``asgi-ratelimit serve`` and prints what the page says.

The page's console blocks run in order, each command through bash with ``localhost:8080`` pointed at
the test's server.  A block preceded by ``<!-- service-test: token -->`` runs against a second server
started with the token in ``$TOKEN``.  What the page shows must match what the command prints: the
status line, every header shown (others, such as date, may be there too), and the body, where only
times that move between runs (``retry_after``, ``reset_after``, ``latency_ms`` and a RateLimit ``t``)
may differ, as long as a number stays a number and null stays null.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_cli import serve

PAGE = Path(__file__).resolve().parent.parent / "docs" / "service.md"
BLOCK = re.compile(r"^```console\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = "<!-- service-test: token -->"
TOKEN = "docs-token-0123456789abcdef0123"
MOVING = {"retry_after", "reset_after", "latency_ms"}


@dataclass
class Example:
    command: str
    expected: str
    token: bool
    line: int


def examples() -> list[Example]:
    text = PAGE.read_text(encoding="utf-8")
    found = []
    for block in BLOCK.finditer(text):
        before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        token = before == MARKER
        lines = block.group(1).splitlines()
        first_line = text.count("\n", 0, block.start()) + 2
        index = 0
        while index < len(lines):
            if not lines[index].startswith("$ curl"):
                index += 1
                continue
            start = index
            command = [lines[index][2:]]
            index += 1
            # A command goes on over indented lines (a backslash, or a quote still open).
            while index < len(lines) and lines[index][:1] in (" ", "\t"):
                command.append(lines[index])
                index += 1
            output = []
            while index < len(lines) and not lines[index].startswith("$ "):
                output.append(lines[index])
                index += 1
            found.append(Example("\n".join(command), "\n".join(output).strip("\n"), token, first_line + start))
    return found


def _mask(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "<number>" if key in MOVING and isinstance(item, (int, float)) else _mask(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_mask(item) for item in value]
    return value


def _split(output: str) -> tuple[str | None, dict[str, str], str]:
    """(status line, headers, body) of ``curl -i`` output; (None, {}, output) of plain output."""
    if not output.startswith("HTTP/"):
        return None, {}, output
    head, _, body = output.replace("\r\n", "\n").partition("\n\n")
    status, *header_lines = head.splitlines()
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = re.sub(r";t=\d+", ";t=N", value.strip())
    return status.strip(), headers, body


def _body(text: str) -> Any:
    try:
        return _mask(json.loads(text))
    except ValueError:
        return [line.rstrip() for line in text.strip().splitlines()]


def test_the_page_has_examples_of_every_route() -> None:
    commands = " ".join(example.command for example in examples())
    for route in ("/check", "/reset", "/health", "/metrics", '"checks"'):
        assert route in commands
    assert any(example.token for example in examples())


@pytest.mark.slow
def test_every_curl_example_prints_what_the_page_shows(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the examples are curl commands")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    failures = []
    with serve() as open_server, serve("--token-file", str(token_file)) as token_server:
        for example in examples():
            base = (token_server if example.token else open_server).base
            command = example.command.replace("http://localhost:8080", base).replace("localhost:8080", base)
            result = subprocess.run(
                ["bash", "-c", command],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                env={**os.environ, "TOKEN": TOKEN},
            )
            status, headers, body = _split(result.stdout.strip("\n"))
            want_status, want_headers, want_body = _split(example.expected)
            shown = {name: headers.get(name) for name in want_headers}
            if (result.returncode, status, shown, _body(body)) != (0, want_status, want_headers, _body(want_body)):
                errors = result.stderr if result.returncode else ""
                failures.append(f"line {example.line}: {example.command}\nprinted:\n{result.stdout}{errors}")
    # Every example runs (they build on each other's counts); all the differences are reported at once.
    assert not failures, "docs/service.md shows what its commands do not print:\n\n" + "\n\n".join(failures)
