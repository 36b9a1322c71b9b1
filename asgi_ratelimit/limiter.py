"""The guarded decision that the middleware and the service share: a time budget around backend.hit_many().

A backend call that does not answer within ``timeout`` is abandoned, not awaited: awaiting a
cancelled redis-py call can take the socket's whole timeout (correctness rule 22), so the
request returns at the budget and the call finishes, or fails, in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .backends.base import Backend, Hit
from .backends.memory import MemoryBackend
from .errors import BackendError, ConfigurationError
from .policies import Decision

__all__ = ["Limiter"]

logger = logging.getLogger("asgi_ratelimit")


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _swallow(task: asyncio.Task[list[Decision]]) -> None:
    # An abandoned call's outcome has nobody to go to; retrieve it so asyncio does not warn.
    if not task.cancelled():
        task.exception()


class Limiter:
    """Decides hits on a backend within a time budget.

    Args:
        backend: the storage.
        timeout: seconds a decision may take before the backend counts as failed.
    """

    def __init__(self, backend: Backend, *, timeout: float = 0.05) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            raise ConfigurationError(f"timeout must be a number of seconds between 0 and 60, got {timeout!r}.")
        self.backend = backend
        self.timeout = float(timeout)
        # The in-memory backend never waits on I/O: no task, no timer.
        self._in_process = isinstance(backend, MemoryBackend)

    async def decide(self, hits: Sequence[Hit]) -> list[Decision]:
        """Decisions for ``hits``, or BackendError when the backend fails or is too slow."""
        if self._in_process:
            return await self.backend.hit_many(hits)
        loop = asyncio.get_running_loop()
        task = loop.create_task(self.backend.hit_many(hits))
        if not task.done():
            waiter: asyncio.Future[None] = loop.create_future()
            task.add_done_callback(lambda _: _release(waiter))
            timer = loop.call_later(self.timeout, _release, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
            if not task.done():
                task.cancel()
                task.add_done_callback(_swallow)
                raise BackendError(f"the backend did not answer within {self.timeout * 1000:.0f} ms")
        try:
            return task.result()
        except BackendError:
            raise
        except Exception as exc:  # a backend bug must fail like a backend outage, never as a 500
            raise BackendError(f"the backend failed: {type(exc).__name__}: {exc}") from exc
