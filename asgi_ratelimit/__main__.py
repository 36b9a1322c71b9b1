"""The ``asgi-ratelimit`` command: ``asgi-ratelimit serve [--redis-url URL] [--host H] [--port P]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    parser = argparse.ArgumentParser(prog="asgi-ratelimit", description="Rate limiting for ASGI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the decision service (POST /check) with uvicorn")
    serve.add_argument("--redis-url", default=None, help="Redis URL; in-memory counts when absent")
    serve.add_argument("--prefix", default="rl:", help="prefix of the Redis keys (default rl:)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--timeout", type=float, default=0.05, help="backend time budget in seconds (default 0.05)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    import uvicorn

    from .backends import MemoryBackend, RedisBackend
    from .backends.base import Backend
    from .errors import ConfigurationError
    from .service import create_app

    try:
        backend: Backend = (
            MemoryBackend() if args.redis_url is None else RedisBackend.from_url(args.redis_url, prefix=args.prefix)
        )
        # The service closes the Redis client it was given at lifespan shutdown: it is the command's own.
        service = create_app(backend, timeout=args.timeout, close_backend=True)
    except (ConfigurationError, ValueError) as exc:  # redis-py raises ValueError for a malformed URL
        parser.error(str(exc))
    uvicorn.run(service, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
