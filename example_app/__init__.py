"""A small API protected by asgi_ratelimit, written the way a real service would use it."""
