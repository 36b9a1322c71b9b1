"""EVALSHA straight onto a redis-py connection: the RESP written here, the replies read back in order.

On one Redis, redis-py's generic command and pipeline machinery (argument encoding, command
stacks, per-call pool checkout, observability hooks) costs more than the script run itself.
WireCalls keeps what matters from it, through redis-py's public connection API only
(``get_connection``, ``send_packed_command``, ``read_response``, ``disconnect``, the connection's
``retry``): the same bytes on the wire (a test holds them to redis-py's own packing), the client's
Retry for connection errors, its socket timeouts, and a connection never reused with replies left
unread.  Clusters keep redis-py's routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool

__all__ = ["WireCalls"]

Args = Sequence[Any]


class WireCalls:
    """EVALSHA calls of one script on a redis.asyncio client's connections.

    ``hold_connection``: keep one connection for good instead of taking one from the pool per call,
    for a caller that never has two exchanges under way at once (coalescing with one round trip in
    flight).  Only from redis-py's plain pools: a Sentinel pool moves its connections to a new
    primary after a failover, which a connection held here would miss.
    """

    def __init__(self, client: Any, sha: str, *, hold_connection: bool) -> None:
        self.client = client
        self._command_head = b"$7\r\nEVALSHA\r\n$40\r\n" + sha.encode() + b"\r\n"
        pool = getattr(client, "connection_pool", None)
        self._hold = hold_connection and type(pool) in (ConnectionPool, BlockingConnectionPool)
        self._held: Any = None  # the connection held, once taken from the pool

    async def exchange(self, calls: list[Args]) -> list[Any]:
        """Write ``calls`` as one buffer and read one reply each, a Redis error as the reply's value.

        A connection error is retried as the client's own Retry says (RedisBackend.from_url retries a
        stale connection once, at once), as redis-py does for its pipelines.
        """
        pool = self.client.connection_pool
        if self._hold:
            if self._held is None:
                self._held = await pool.get_connection()
            connection = self._held
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
            # unread on the socket: the connection must not be used again as it is.
            await connection.disconnect(nowait=True)
            raise
        finally:
            if not self._hold:
                await pool.release(connection)

    async def _send_and_read(self, connection: Any, calls: list[Args]) -> list[Any]:
        # redis-py's public write: it connects first when needed, and bounds the write by the socket timeout.
        await connection.send_packed_command(self.pack(calls), check_health=False)
        replies: list[Any] = []
        for _ in calls:
            try:
                replies.append(await connection.read_response())
            except redis_errors.ResponseError as exc:  # this call's error; the others still stand
                replies.append(exc)
        return replies

    def pack(self, calls: list[Args]) -> bytes:
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
