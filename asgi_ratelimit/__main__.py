"""The ``asgi-ratelimit`` command: ``asgi-ratelimit serve [--redis-url URL] [--host H] [--port P]``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asgi-ratelimit", description="Rate limiting for ASGI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the decision service (POST /check) with uvicorn")
    serve.add_argument("--redis-url", default=None, help="Redis URL; in-memory counts when absent")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    serve.add_argument("--timeout", type=float, default=0.05, help="backend time budget in seconds (default 0.05)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command line."""
    args = build_parser().parse_args(argv)
    import uvicorn

    from .backends import MemoryBackend, RedisBackend
    from .service import create_app

    backend = MemoryBackend() if args.redis_url is None else RedisBackend.from_url(args.redis_url)
    uvicorn.run(create_app(backend, timeout=args.timeout), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
