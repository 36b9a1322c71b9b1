"""``python -m example_app [--fastapi] [--host H] [--port P]``: serve the example API with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m example_app", description="Serve the example API.")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (default 8000)")
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.add_argument(
        "--fastapi", action="store_true", help="serve the FastAPI variant (per-user limits as a dependency)"
    )
    args = parser.parse_args(argv)
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from X-Forwarded-For sent
    # by 127.0.0.1, before ClientIP (which trusts only TRUSTED_PROXIES) ever sees the request.
    target = "example_app.fastapi_app:app" if args.fastapi else "example_app.app:app"
    uvicorn.run(target, host=args.host, port=args.port, log_level=args.log_level, proxy_headers=False)


if __name__ == "__main__":
    main()
