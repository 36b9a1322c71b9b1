"""ClientIP behind a proxy, through a real uvicorn configured the ways deployment guides configure it.

The test client plays the proxy: it connects from 127.0.0.1 and, as nginx does with
``proxy_add_x_forwarded_for``, appends the real client's address (203.0.113.9) to whatever
X-Forwarded-For the client sent.  The client varies its own part on every request to get a fresh key.
"""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from test_uvicorn import serve

from asgi_ratelimit import ClientIP, MemoryBackend, RateLimitMiddleware, Rule

pytestmark = pytest.mark.slow

REAL_CLIENT = "203.0.113.9"
LIMIT = 5
ATTEMPTS = 8


async def whoami(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def limited_app(key: ClientIP) -> Starlette:
    app = Starlette(routes=[Route("/login", whoami, methods=["POST"])])
    app.add_middleware(RateLimitMiddleware, backend=MemoryBackend(), rules=[Rule("/login", f"{LIMIT}/minute", key=key)])
    return app


def spoofing_attempts(base: str, header: str = "x-forwarded-for") -> list[int]:
    """Each request claims a new address of the client's own choosing; the proxy appends the real one."""
    codes = []
    with httpx.Client(base_url=base) as client:
        for n in range(ATTEMPTS):
            claimed = f"198.51.100.{n + 1}"
            if header == "forwarded":
                headers = {"forwarded": f"for={claimed}", "x-forwarded-for": REAL_CLIENT}
            else:
                headers = {"x-forwarded-for": f"{claimed}, {REAL_CLIENT}"}
            codes.append(client.post("/login", headers=headers).status_code)
    return codes


EXPECTED = [200] * LIMIT + [429] * (ATTEMPTS - LIMIT)


def test_server_leaves_the_client_alone_and_clientip_trusts_the_proxy() -> None:
    """The recommended setup: uvicorn --no-proxy-headers, ClientIP(trusted_proxies=[the proxy])."""
    app = limited_app(ClientIP(trusted_proxies=["127.0.0.1"]))
    with serve(app, proxy_headers=False) as base:
        assert spoofing_attempts(base) == EXPECTED


def test_a_forwarded_header_sent_by_the_client_is_not_read_by_default() -> None:
    app = limited_app(ClientIP(trusted_proxies=["127.0.0.1"]))
    with serve(app, proxy_headers=False) as base:
        assert spoofing_attempts(base, header="forwarded") == EXPECTED


def test_server_rewrites_the_client_trusting_only_the_proxy() -> None:
    """Also safe: uvicorn --proxy-headers --forwarded-allow-ips=<the proxy> and ClientIP() without proxies."""
    app = limited_app(ClientIP())
    with serve(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as base:
        assert spoofing_attempts(base) == EXPECTED


def test_forwarded_allow_ips_star_lets_every_client_pick_its_key() -> None:
    """The trap the extractors page warns about first: --forwarded-allow-ips='*' makes the server take
    the left-most X-Forwarded-For entry, which the client wrote, before the middleware runs.  Nothing the
    middleware does can recover the real address; this test keeps the warning honest."""
    app = limited_app(ClientIP(trusted_proxies=["127.0.0.1"]))
    with serve(app, proxy_headers=True, forwarded_allow_ips="*") as base:
        assert spoofing_attempts(base) == [200] * ATTEMPTS
