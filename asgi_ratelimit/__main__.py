"""The ``asgi-ratelimit`` command: ``asgi-ratelimit serve [--redis-url URL] [--workers N] [--token-file PATH] ...``.

Every option also comes from an environment variable (``ASGI_RATELIMIT_REDIS_URL``, ``_HOST``, ``_PORT``,
``_WORKERS``, ``_TOKEN``...), as a container expects; an option on the command line wins.  The command
checks the settings, writes them to the environment, and has uvicorn run
``asgi_ratelimit.service:from_environment`` in each worker, which builds the app from them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

__all__ = ["main"]

logger = logging.getLogger("asgi_ratelimit")

T = TypeVar("T")
ENV = "ASGI_RATELIMIT_"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


class _EnvError(Exception):
    """An environment variable the command cannot use."""


def _env(environ: Mapping[str, str], name: str, convert: Callable[[str], T], fallback: T, what: str) -> T:
    raw = environ.get(ENV + name)
    if not raw:
        return fallback
    try:
        return convert(raw)
    except ValueError:
        raise _EnvError(f"{ENV}{name} must be {what}, got {raw!r}") from None


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _level(raw: str) -> str:
    if raw.lower() not in LOG_LEVELS:
        raise ValueError(raw)
    return raw.lower()


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line's parser, its defaults taken from ``environ`` (the process's environment by default)."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="asgi-ratelimit", description="Rate limiting for ASGI apps.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the decision service (POST /check) with uvicorn",
        epilog=f"Each option also reads {ENV}<OPTION> (e.g. {ENV}REDIS_URL); the token alone also "
        f"comes as {ENV}TOKEN. An option given here wins.",
    )
    serve.add_argument(
        "--redis-url",
        default=_env(env, "REDIS_URL", str, None, "a URL"),
        help="Redis URL; in-memory counts when absent",
    )
    serve.add_argument(
        "--prefix", default=env.get(ENV + "PREFIX", "rl:"), help="prefix of the Redis keys (default rl:)"
    )
    serve.add_argument(
        "--host",
        default=_env(env, "HOST", str, "127.0.0.1", "an address"),
        help="interface to listen on (default 127.0.0.1)",
    )
    serve.add_argument(
        "--port", type=int, default=_env(env, "PORT", int, 8080, "a whole number"), help="port (default 8080)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=_env(env, "WORKERS", int, 1, "a whole number"),
        help="worker processes sharing the port (default 1); more than 1 needs --redis-url",
    )
    serve.add_argument(
        "--timeout",
        type=float,
        default=_env(env, "TIMEOUT", float, 0.05, "a number of seconds"),
        help="backend time budget in seconds (default 0.05)",
    )
    serve.add_argument(
        "--token-file",
        default=_env(env, "TOKEN_FILE", str, None, "a path"),
        help="file holding the bearer token /check and /reset require (or set ASGI_RATELIMIT_TOKEN)",
    )
    serve.add_argument(
        "--protect-metrics",
        action="store_true",
        default=_env(env, "PROTECT_METRICS", _flag, False, "one of 1, true, yes, on, 0, false, no, off"),
        help="put /metrics behind the token too",
    )
    serve.add_argument(
        "--log-level",
        default=_env(env, "LOG_LEVEL", _level, "info", f"one of {', '.join(LOG_LEVELS)}"),
        choices=LOG_LEVELS,
    )
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the command line."""
    try:
        parser = build_parser()
    except _EnvError as exc:
        print(f"asgi-ratelimit: error: {exc}", file=sys.stderr)
        sys.exit(2)
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be from 0 to 65535, got {args.port}")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    from .errors import ConfigurationError
    from .service import ServiceSettings

    # The token has no option of its own: a command line is visible to every user of the machine.
    env_token = os.environ.get(ENV + "TOKEN") or None
    try:
        if env_token is not None and args.token_file is not None:
            raise ConfigurationError(f"Set {ENV}TOKEN or --token-file ({ENV}TOKEN_FILE), not both.")
        settings = ServiceSettings(
            redis_url=args.redis_url,
            prefix=args.prefix,
            timeout=args.timeout,
            token=env_token,
            protect_metrics=args.protect_metrics,
        )
        if args.token_file is not None:
            settings = settings.with_token_file(args.token_file)
        settings.check()
    except ConfigurationError as exc:
        parser.error(str(exc))
    if args.workers > 1 and settings.redis_url is None:
        # One line, no usage: the fix is a missing option, not a misspelt one.
        parser.exit(
            2,
            f"asgi-ratelimit: error: --workers {args.workers} needs --redis-url (or {ENV}REDIS_URL): "
            "in memory, each worker would keep counts of its own.\n",
        )
    if settings.token is None and not _is_loopback(args.host):
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(levelname)s:  %(message)s")
        logger.warning(
            "asgi_ratelimit: serving on %s without a token: anyone who reaches this port can spend or reset "
            "any key's allowance. Set --token-file or %sTOKEN.",
            args.host,
            ENV,
        )

    try:
        import uvicorn
    except ImportError:
        # One line, no traceback: the fix is an install, named here.
        parser.exit(2, 'asgi-ratelimit: error: serve needs uvicorn: pip install "asgi-ratelimit-middleware[server]"\n')

    # Each worker (or this process, with one) builds the app from the environment: uvicorn needs an
    # import string to start workers, and the settings travel to them this way.
    for name, value in settings.environment().items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    uvicorn.run(
        "asgi_ratelimit.service:from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
