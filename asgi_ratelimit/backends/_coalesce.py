"""Coalesced script calls: calls issued while one is in flight travel together as one pipeline.

With nothing in flight a call goes straight out, so a lone request waits for nothing.  While a
round trip is under way, new calls queue; when it returns, the whole queue leaves as one
non-transactional pipeline of EVALSHA.  Each call is still its own atomic script run in Redis,
so no decision changes; only the number of writes to the socket and of replies to parse does.
Redis answers a pipeline of 50 scripts several times faster than 50 separate round trips.

A pipeline cannot recover from NOSCRIPT by itself (redis-py's Script reloads a script only for a
lone call): the entries that got NOSCRIPT are sent again after the script is loaded.

How a call or a pipeline reaches Redis is redis-py's command machinery, or, on one Redis, the
leaner path of _wire.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from hashlib import sha1
from typing import Any

from redis import exceptions as redis_errors

from ._wire import WireCalls
from .base import Call

__all__ = ["ScriptCaller"]

# A bound on one pipeline, so one flush never holds the event loop for long.
MAX_BATCH = 256

Args = Sequence[Any]
Transform = Callable[[Any], Any]
# One call waiting its turn: its arguments, its future, and what turns its reply into the future's result.
Queued = tuple[Args, Call, Transform | None]


class ScriptCaller:
    """Runs one Lua script by SHA on a redis.asyncio client, coalescing concurrent calls.

    At most ``max_in_flight`` round trips are under way at once; calls beyond that queue, and leave
    together as soon as one returns.
    """

    def __init__(
        self, client: Any, source: str, *, coalesce: bool = True, max_in_flight: int = 1, wire: bool = False
    ) -> None:
        self.client = client
        self.source = source
        self.sha = sha1(source.encode("utf-8")).hexdigest()
        # On one Redis (not a cluster, which routes each command itself) calls go straight onto a
        # connection (_wire.py); with coalescing, one round trip at a time needs only one connection.
        self._wire: WireCalls | None = (
            WireCalls(client, self.sha, hold_connection=coalesce and max_in_flight == 1) if wire else None
        )
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight
        self._queue: list[Queued] = []
        self._in_flight = 0
        self._flushes: set[asyncio.Task[None]] = set()  # kept from the garbage collector while they run
        self.round_trips = 0  # observable by tests and benchmarks

    def submit(self, numkeys: int, *args: Any, transform: Transform | None = None) -> Call:
        """Start a call and return the future of its reply (passed through ``transform``), for a caller
        with a time budget.

        The round trip runs in a task of this caller's, never in the caller's own: a caller may
        stop waiting at its budget, or be cancelled, without cancelling any I/O (cancelling a redis-py
        call mid-exchange leaves its connection unusable, and waiting for it can take the socket's whole
        timeout).  A call whose future is done (abandoned) before its turn comes is never sent; either
        way the Call is ended once nothing runs for it any more.
        """
        future = Call()
        call_args: Args = (numkeys, *args)
        if self.coalesce and self._in_flight >= self.max_in_flight:
            self._queue.append((call_args, future, transform))
            return future
        self._in_flight += 1
        self._start_flush([(call_args, future, transform)])
        return future

    async def __call__(self, numkeys: int, *args: Any) -> Any:
        """Run the script with ``numkeys`` keys followed by the arguments; return its reply."""
        call_args: Args = (numkeys, *args)
        if self.coalesce and self._in_flight >= self.max_in_flight:
            queued = Call()
            self._queue.append((call_args, queued, None))
            return await queued
        self._in_flight += 1
        try:
            return await self._run_one(call_args)
        finally:
            self._in_flight -= 1
            self._send_queued()

    async def _run_one(self, call_args: Args) -> Any:
        self.round_trips += 1
        if self._wire is not None:
            [result] = await self._wire.exchange([call_args])
            if isinstance(result, redis_errors.NoScriptError):
                await self._load()
                [result] = await self._wire.exchange([call_args])
            if isinstance(result, Exception):
                raise result
            return result
        try:
            return await self.client.execute_command("EVALSHA", self.sha, *call_args)
        except redis_errors.NoScriptError:
            await self._load()
            return await self.client.execute_command("EVALSHA", self.sha, *call_args)

    async def _load(self) -> None:
        loaded = await self.client.script_load(self.source)
        if isinstance(loaded, bytes):
            loaded = loaded.decode()
        if loaded != self.sha:  # never expected; a mismatch would make every call fail
            raise redis_errors.ResponseError(f"SCRIPT LOAD returned {loaded!r}, expected {self.sha}")

    def _send_queued(self) -> None:
        """Start a pipeline for the queue while a round trip is free."""
        while self._queue and self._in_flight < self.max_in_flight:
            batch = self._queue[:MAX_BATCH]
            del self._queue[:MAX_BATCH]
            # Calls given up while they queued (their budget spent, their request gone) are not sent.
            for _, given_up, _ in batch:
                if given_up.done():
                    given_up.end(True)
            batch = [call for call in batch if not call[1].done()]
            if batch:
                self._in_flight += 1
                self._start_flush(batch)

    def _start_flush(self, batch: list[Queued]) -> None:
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[Queued]) -> None:
        try:
            await self._send_batch(batch)
        finally:
            self._in_flight -= 1
            self._send_queued()

    async def _send_batch(self, batch: list[Queued]) -> None:
        if len(batch) == 1:
            call_args, future, transform = batch[0]
            try:
                result = await self._run_one(call_args)
            except BaseException as exc:  # delivered to the caller, whatever it is
                _fail(future, exc)
                if not isinstance(exc, Exception):
                    raise
            else:
                _succeed(future, result, transform)
            return
        try:
            results = await self._pipeline([call_args for call_args, _, _ in batch])
            retry = [i for i, result in enumerate(results) if isinstance(result, redis_errors.NoScriptError)]
            if retry:
                await self._load()
                again = await self._pipeline([batch[i][0] for i in retry])
                for i, result in zip(retry, again, strict=True):
                    results[i] = result
        except Exception as exc:
            for _, future, _ in batch:
                _fail(future, exc)
            return
        for (_, future, transform), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                _fail(future, result)
            else:
                _succeed(future, result, transform)

    async def _pipeline(self, calls: list[Args]) -> list[Any]:
        self.round_trips += 1
        if self._wire is not None:
            return await self._wire.exchange(calls)
        pipe = self.client.pipeline(transaction=False)
        for call_args in calls:
            pipe.execute_command("EVALSHA", self.sha, *call_args)
        return list(await pipe.execute(raise_on_error=False))


def _succeed(future: Call, result: Any, transform: Transform | None = None) -> None:
    if future.done():  # the caller has given up (its budget, a disconnect)
        future.end(False)
        return
    if transform is None:
        future.set_result(result)
        return
    try:
        value = transform(result)
    except Exception as exc:  # a reply the transform cannot read goes to the caller as its error
        _fail(future, exc)
    else:
        future.set_result(value)


def _fail(future: Call, exc: BaseException) -> None:
    if future.done():  # the caller has given up
        future.end(True)
        return
    future.set_exception(exc)
    # Mark it retrieved: a caller that gave up must not make asyncio log "never retrieved".
    future.exception()
