"""Where a rule's ``charge=`` takes a request's cost from, once the response shows it.

``Rule(..., charge=ResponseHeader("x-tokens-used"))`` charges the integer the app sets in that
header; ``BodyBytes()`` the bytes of the body sent; ``FromState("tokens")`` what the app stores in
``request.state.tokens`` (``scope["state"]``) by the time its body ends, for a streamed response whose
cost is known last.  See docs/charging.md for the semantics (debt, the overshoot bound, retries).
"""

from __future__ import annotations

import re

from .errors import ConfigurationError

__all__ = ["BodyBytes", "FromState", "ResponseHeader"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP field name (RFC 9110 token)


class ResponseHeader:
    """The cost is the whole number the app sets in response header ``name``, known at the response start.

    Args:
        name: the header, e.g. ``"x-tokens-used"`` (any case).
        keep: send the header on to the client (default False: it is removed from the response).
    """

    __slots__ = ("keep", "name", "raw")

    def __init__(self, name: str, *, keep: bool = False) -> None:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ConfigurationError(f"ResponseHeader: {name!r} is not an HTTP header name.")
        if not isinstance(keep, bool):
            raise ConfigurationError(f"ResponseHeader({name!r}): keep must be True or False, got {keep!r}.")
        self.name = name.lower()
        self.raw = self.name.encode("ascii")
        self.keep = keep

    def __repr__(self) -> str:
        return f"ResponseHeader({self.name!r}, keep={self.keep!r})"


class BodyBytes:
    """The cost is the number of response body bytes sent, known when the body ends (or the response fails)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BodyBytes()"


class FromState:
    """The cost is the whole number the app stores as ``request.state.<name>``, read when the body ends.

    Args:
        name: the attribute of ``request.state`` (the key of ``scope["state"]``) the app sets.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigurationError(f"FromState: name must be an attribute name, got {name!r}.")
        self.name = name

    def __repr__(self) -> str:
        return f"FromState({self.name!r})"


#: What ``Rule(charge=...)`` accepts.
ChargeSource = ResponseHeader | BodyBytes | FromState
