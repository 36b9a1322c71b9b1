"""Storage backends: MemoryBackend (embedded) and RedisBackend."""

from .base import Backend
from .memory import MemoryBackend
from .redis import RedisBackend

__all__ = ["Backend", "MemoryBackend", "RedisBackend"]
