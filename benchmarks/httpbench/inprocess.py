"""Drive an ASGI app in process with hand-built scope/receive/send: no HTTP client, no sockets.

An HTTP client (httpx's ASGITransport, say) costs more per request than a bare Starlette app, so it would
hide the very overhead we measure. Here each request costs one dict copy and one small object.
"""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter, process_time
from typing import Any

_REQUEST = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT = {"type": "http.disconnect"}

SCOPE_TEMPLATE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


class _Exchange:
    """receive/send of one request: the body once, then (like a server) http.disconnect after the response."""

    __slots__ = ("done", "received", "status", "waiter")

    def __init__(self) -> None:
        self.status = 0
        self.received = False
        self.done = False
        self.waiter: asyncio.Future[None] | None = None

    async def receive(self) -> dict[str, Any]:
        if not self.received:
            self.received = True
            return _REQUEST
        if not self.done:
            # Middleware such as BaseHTTPMiddleware listens for a disconnect while the app runs.
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return _DISCONNECT

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
        elif kind == "http.response.body" and not message.get("more_body", False):
            self.done = True
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)


class Lifespan:
    """Run the ASGI lifespan protocol like uvicorn's ``--lifespan auto``: used if the app supports it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._replies.put)
        except Exception as exc:  # an app without lifespan support raises here; uvicorn's "auto" carries on
            await self._replies.put({"type": "lifespan.unsupported", "message": repr(exc)})

    async def startup(self, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        reply = await asyncio.wait_for(self._replies.get(), timeout)
        if reply["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"lifespan startup failed: {reply.get('message', '')}")
        if reply["type"] == "lifespan.unsupported":
            self._task = None

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._task is None:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._replies.get(), timeout)
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Run:
    """What one timed in-process run did."""

    concurrency: int
    requests: int
    seconds: float
    cpu_seconds: float
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "seconds": round(self.seconds, 6),
            "rps": round(self.rps, 1),
            # This process's CPU per request (all threads): robust to other jobs taking the CPU, unlike rps.
            "cpu_us": round(self.cpu_seconds * 1e6 / self.requests, 2) if self.requests else None,
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
        }


async def drive(app: Any, seconds: float, concurrency: int, state: dict[str, Any] | None = None) -> Run:
    """Send ``GET /`` to ``app`` for ``seconds``, with ``concurrency`` requests in flight (1 = sequential)."""
    template = dict(SCOPE_TEMPLATE)
    lifespan_state = state or {}
    statuses: Counter[int] = Counter()

    async def worker(deadline: float) -> None:
        while True:
            scope = template.copy()
            scope["state"] = lifespan_state.copy()
            exchange = _Exchange()
            await app(scope, exchange.receive, exchange.send)
            statuses[exchange.status] += 1
            if perf_counter() >= deadline:
                return

    gc.collect()
    cpu_start = process_time()
    start = perf_counter()
    deadline = start + seconds
    if concurrency == 1:
        await worker(deadline)
    else:
        await asyncio.gather(*(worker(deadline) for _ in range(concurrency)))
    elapsed = perf_counter() - start
    return Run(concurrency, sum(statuses.values()), elapsed, process_time() - cpu_start, statuses)
