"""Every storage key is built here, and nowhere else.

A key is ``<prefix>{<digest>}:<policy>``.  The identity (an IP, an API key, a user id) is
hashed, so a raw identity never reaches Redis, a user-supplied value cannot inject braces
or grow keys without bound, and all the keys of one identity share one Redis Cluster hash slot.
"""

from __future__ import annotations

from hashlib import blake2b

from .policies import Policy

__all__ = ["digest", "ledger_key", "slots_key", "state_key"]


def digest(identity: str) -> str:
    """A short, stable, non-reversible fingerprint of an identity (96 bits, hex)."""
    return blake2b(identity.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()


def state_key(prefix: str, identity_digest: str, policy: Policy) -> str:
    """The key holding one policy's state for one (already hashed) identity."""
    return f"{prefix}{{{identity_digest}}}:{policy.key_suffix}"


def slots_key(prefix: str, identity_digest: str) -> str:
    """The key holding one identity's concurrency slots."""
    return f"{prefix}{{{identity_digest}}}:slots"


def ledger_key(prefix: str, identity_digest: str) -> str:
    """The key remembering which charges one identity has taken already (by request token)."""
    return f"{prefix}{{{identity_digest}}}:charged"
