"""Coalesced script calls: calls issued while one is in flight travel together as one pipeline.

With nothing in flight a call goes straight out, so a lone request waits for nothing.  While a
round trip is under way, new calls queue; when it returns, the whole queue leaves as one
non-transactional pipeline of EVALSHA.  Each call is still its own atomic script run in Redis,
so no decision changes; only the number of writes to the socket and of replies to parse does.
Redis answers a pipeline of 50 scripts several times faster than 50 separate round trips.

A pipeline cannot recover from NOSCRIPT by itself (correctness rule 13): the entries that got
NOSCRIPT are sent again after the script is loaded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from hashlib import sha1
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool

__all__ = ["ScriptCaller"]

# A bound on one pipeline, so one flush never holds the event loop for long.
MAX_BATCH = 256

Args = Sequence[Any]
Transform = Callable[[Any], Any]
# One call waiting its turn: its arguments, its future, and what turns its reply into the future's result.
Queued = tuple[Args, "asyncio.Future[Any]", Transform | None]


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
        # On one Redis (not a cluster, which routes each command itself), calls go out as RESP written
        # here on a pooled connection: redis-py's generic command and pipeline machinery cost more
        # than the script run itself.
        self.wire = wire
        self._command_head = b"$7\r\nEVALSHA\r\n$40\r\n" + self.sha.encode() + b"\r\n"
        # Coalescing with one round trip at a time needs one connection, held for good: taking one
        # from redis-py's pool and giving it back costs a lock, a readiness check and its metrics
        # bookkeeping on every call.  Only from redis-py's plain pools: a Sentinel pool moves its
        # connections to a new primary after a failover, which a connection held here would miss.
        pool = getattr(client, "connection_pool", None)
        self._dedicated = (
            wire and coalesce and max_in_flight == 1 and type(pool) in (ConnectionPool, BlockingConnectionPool)
        )
        self._connection: Any = None  # that connection, once taken from the pool
        self.coalesce = coalesce
        self.max_in_flight = max_in_flight
        self._queue: list[Queued] = []
        self._in_flight = 0
        self._flushes: set[asyncio.Task[None]] = set()  # kept from the garbage collector while they run
        self.round_trips = 0  # observable by tests and benchmarks

    def submit(self, numkeys: int, *args: Any, transform: Transform | None = None) -> asyncio.Future[Any]:
        """Start a call and return the future of its reply (passed through ``transform``), for a caller
        with a time budget.

        The round trip runs in a task of this caller's, never in the caller's own: a caller may
        stop waiting at its budget, or be cancelled, without cancelling any I/O (correctness rule
        22).  A call whose future is done (abandoned) before its turn comes is never sent.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
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
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._queue.append((call_args, future, None))
            return await future
        self._in_flight += 1
        try:
            return await self._run_one(call_args)
        finally:
            self._in_flight -= 1
            self._send_queued()

    async def _run_one(self, call_args: Args) -> Any:
        self.round_trips += 1
        if self.wire:
            [result] = await self._exchange([call_args])
            if isinstance(result, redis_errors.NoScriptError):
                await self._load()
                [result] = await self._exchange([call_args])
            if isinstance(result, Exception):
                raise result
            return result
        try:
            return await self.client.execute_command("EVALSHA", self.sha, *call_args)
        except redis_errors.NoScriptError:
            await self._load()
            return await self.client.execute_command("EVALSHA", self.sha, *call_args)

    async def _exchange(self, calls: list[Args]) -> list[Any]:
        """Write ``calls`` as one buffer on a pooled connection and read one reply each (errors as values).

        A connection error is retried as the client's own Retry says (a stale pooled connection after
        a restart is retried once by RedisBackend.from_url's default), as redis-py does for its pipelines.
        """
        pool = self.client.connection_pool
        dedicated = self._dedicated
        if dedicated:
            if self._connection is None:
                self._connection = await pool.get_connection()
            connection = self._connection
        else:
            connection = await pool.get_connection()
        try:
            return cast(
                list[Any],
                await connection.retry.call_with_retry(
                    lambda: self._send_and_read(connection, calls),
                    lambda error: connection.disconnect(nowait=True),
                ),
            )
        except BaseException:
            # A failure (or a cancellation) between the write and the last reply leaves replies
            # unread on the socket: the connection must not go back to the pool as it is.
            await connection.disconnect(nowait=True)
            raise
        finally:
            if not dedicated:
                await pool.release(connection)

    async def _send_and_read(self, connection: Any, calls: list[Args]) -> list[Any]:
        data = self._pack(calls)
        writer = getattr(connection, "_writer", None)  # redis-py's stream writer, once connected
        if isinstance(writer, asyncio.StreamWriter) and connection.is_connected and not writer.transport.is_closing():
            # The common case is one buffered write. redis-py's send_packed_command times even that
            # out through asyncio.wait_for, which costs a task per call: only a write the socket
            # could not take at once goes through it, to drain within the socket timeout.
            writer.write(data)
            if writer.transport.get_write_buffer_size():
                try:
                    await connection.send_packed_command(b"", check_health=False)
                except BaseException:
                    # Drop what the socket never took: a closing transport would still deliver it.
                    writer.transport.abort()
                    raise
        else:
            await connection.send_packed_command(data, check_health=False)  # connects first
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await connection.read_response())
            except redis_errors.ResponseError as exc:  # this call's error; the others still stand
                replies.append(exc)
        return replies

    def _pack(self, calls: list[Args]) -> bytes:
        """RESP arrays for EVALSHA <sha> <arguments> per call, in one buffer."""
        head = self._command_head
        parts: list[bytes] = []
        for call_args in calls:
            parts.append(b"*%d\r\n" % (len(call_args) + 2))
            parts.append(head)
            for value in call_args:
                data = _encode(value)
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(parts)

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
        if self.wire:
            return await self._exchange(calls)
        pipe = self.client.pipeline(transaction=False)
        for call_args in calls:
            pipe.execute_command("EVALSHA", self.sha, *call_args)
        return list(await pipe.execute(raise_on_error=False))


def _encode(value: Any) -> bytes:
    """One argument as Redis receives it (the same bytes redis-py's encoder sends)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    raise TypeError(f"a script argument must be bytes, str, int or float, got {value!r}")


def _succeed(future: asyncio.Future[Any], result: Any, transform: Transform | None = None) -> None:
    if future.done():  # the caller has given up (its budget, a disconnect)
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


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # Mark it retrieved: a caller that gave up must not make asyncio log "never retrieved".
        future.exception()
