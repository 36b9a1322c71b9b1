"""Property-based API test of the decision service with schemathesis, from its own /openapi.json.

Schemathesis generates requests from the document (valid ones, and invalid ones for each
operation) and checks that no response is a 5xx, and that every status, content type, header
and body is one the document describes.  It runs against the ASGI app in process and against
a real uvicorn server on 127.0.0.1.

Two of schemathesis's checks are left out on purpose: ``positive_data_acceptance`` and
``negative_data_rejection`` need the schema to be exactly as strict as the server, and some
rules cannot be said in JSON Schema: the key's limit is 1 KiB of UTF-8 (``maxLength`` counts
characters), a token bucket must refill within the longest window (capacity / refill_rate),
GCRA's tolerance (burst * period / limit) is bounded, and a duration is rounded to the
microsecond before its bounds are checked.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import uvicorn
from conftest import free_port
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from asgi_ratelimit import MemoryBackend
from asgi_ratelimit.service import create_app, openapi_document

EXCLUDED = [positive_data_acceptance, negative_data_rejection]
EXAMPLES = int(os.environ.get("SERVICE_API_EXAMPLES", "60"))

in_process = schemathesis.openapi.from_asgi("/openapi.json", create_app(MemoryBackend(), registry=CollectorRegistry()))


@in_process.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_in_process(case: Any) -> None:
    case.call_and_validate(excluded_checks=EXCLUDED)


TOKEN = "schemathesis-token-0123456789"
with_token = schemathesis.openapi.from_asgi(
    "/openapi.json",
    create_app(MemoryBackend(), registry=CollectorRegistry(), token=TOKEN, protect_metrics=True),
)


@with_token.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_in_process_with_a_token(case: Any) -> None:
    # Each case twice: with the token it is decided, without it the 401 must be one the document describes.
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, excluded_checks=EXCLUDED)
    case.call_and_validate(excluded_checks=EXCLUDED)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    """A uvicorn server on 127.0.0.1 running the service, stopped (bounded) after the module."""
    port = free_port()
    config = uvicorn.Config(
        create_app(MemoryBackend(), registry=CollectorRegistry()),
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(10)
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "uvicorn did not stop"


# The document the server serves, built the same way; the cases go over HTTP to the real server.
# (schemathesis.pytest.from_fixture would load it from the server, but breaks on newer pytest.)
over_http = schemathesis.openapi.from_dict(openapi_document())


def test_the_server_serves_that_document(server_url: str) -> None:
    import httpx

    assert httpx.get(f"{server_url}/openapi.json").json() == openapi_document()


@over_http.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_over_http(case: Any, server_url: str) -> None:
    case.call_and_validate(base_url=server_url, excluded_checks=EXCLUDED)
