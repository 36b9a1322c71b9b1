"""Partition keys: the opaque ``pk`` a rule with ``partition_key`` adds to its header items.

A pk is a keyed hash (HMAC-SHA-256, cut to 16 bytes) of what the backend counts under, the rule's
name and the client's key: a client acting for many users can tell their quotas apart, while no
one can recover a key from its pk, nor compute a pk without the secret.  ``partition_key=True``
uses a random secret of this process, so the values differ between processes and across restarts;
workers and replicas that share counts need one configured secret to send the same pk.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from .errors import ConfigurationError

# Drawn once per process: every rule with partition_key=True uses it.
_PROCESS_SECRET = secrets.token_bytes(32)
MIN_SECRET_BYTES = 16
# 128 bits: no two partitions a client sees share a pk, and the header stays short.
_PK_BYTES = 16


def partition_secret(owner: str, value: object) -> bytes | None:
    """The secret ``partition_key=value`` configures: None for False, this process's own for True, else ``value``."""
    if value is False:
        return None
    if value is True:
        return _PROCESS_SECRET
    secret = value.encode() if isinstance(value, str) else value
    if not isinstance(secret, bytes):
        raise ConfigurationError(
            f"{owner}: partition_key must be True, False or a secret (bytes or str), got a {type(value).__name__}."
        )
    if len(secret) < MIN_SECRET_BYTES:
        # The value is a secret: its length is quoted, never the value.
        raise ConfigurationError(
            f"{owner}: a partition_key secret must be at least {MIN_SECRET_BYTES} bytes long, got {len(secret)}."
        )
    return secret


def partition_key(secret: bytes, identity: str) -> str:
    """The pk of ``identity`` as an RFC 9651 Byte Sequence: ``:base64:``."""
    digest = hmac.new(secret, identity.encode(), hashlib.sha256).digest()[:_PK_BYTES]
    return ":" + base64.b64encode(digest).decode("ascii") + ":"
