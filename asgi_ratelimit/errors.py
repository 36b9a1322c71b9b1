"""The exceptions asgi_ratelimit raises."""

from __future__ import annotations

__all__ = ["BackendError", "ConfigurationError"]


class ConfigurationError(ValueError):
    """A rule, limit or setting is invalid; raised when the middleware or service is built."""


class BackendError(Exception):
    """The storage backend failed to answer (connection lost, timeout, script error)."""
