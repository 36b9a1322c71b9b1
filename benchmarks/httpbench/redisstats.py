"""What a run cost Redis, from the server's own counters (INFO stats, commandstats, clients).

- commands: the sum of ``calls`` over INFO commandstats. Redis counts the commands a script runs with
  ``redis.call`` as well as the EVALSHA itself, so an EVALSHA running GET and SET counts 3.
- scripts: EVAL/EVALSHA/FCALL calls (and their _RO forms).
- round trips: ``total_reads_processed``, the read events on client sockets: one per request/reply
  exchange, one for a whole pipeline. The closest thing to round trips that Redis counts.
- Redis CPU: ``used_cpu_user + used_cpu_sys``, the server's own CPU time, I/O included.

The counters are server-wide: anything else using the same Redis during a run is counted too. The harness
takes medians over rounds; on a busy shared Redis treat these figures as upper bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


@dataclass(frozen=True)
class Snapshot:
    """Redis's counters at one moment."""

    commands: int
    scripts: int
    reads: int
    connections_received: int
    connected_clients: int
    cpu_seconds: float


def snapshot(client: Any) -> Snapshot:
    """Read the counters with one INFO call (which itself adds 1 command and 1 read to the next snapshot)."""
    info = client.execute_command("INFO", "stats", "commandstats", "clients", "cpu")
    commands = scripts = 0
    for key, value in info.items():
        if key.startswith("cmdstat_") and isinstance(value, dict):
            calls = int(value.get("calls", 0))
            commands += calls
            if key.removeprefix("cmdstat_") in SCRIPT_COMMANDS:
                scripts += calls
    return Snapshot(
        commands=commands,
        scripts=scripts,
        reads=int(info.get("total_reads_processed", 0)),
        connections_received=int(info.get("total_connections_received", 0)),
        connected_clients=int(info.get("connected_clients", 0)),
        cpu_seconds=float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0)),
    )


def per_request(before: Snapshot, after: Snapshot, requests: int) -> dict[str, float]:
    """Counter deltas divided by the requests made between the snapshots, less the snapshot's own INFO."""
    if requests <= 0:
        return {}
    return {
        "commands": max(after.commands - before.commands - 1, 0) / requests,
        "scripts": (after.scripts - before.scripts) / requests,
        "round_trips": max(after.reads - before.reads - 1, 0) / requests,
        "connections_opened": float(after.connections_received - before.connections_received),
        "cpu_us": (after.cpu_seconds - before.cpu_seconds) * 1e6 / requests,
    }


def delete_keys(client: Any, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (SCAN, then UNLINK in batches); return how many."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def sample_keys(client: Any, pattern: str, limit: int = 5) -> list[str]:
    """A few keys matching ``pattern``, to show in the results how a limiter keys its state."""
    keys: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        keys.append(key.decode() if isinstance(key, bytes) else str(key))
        if len(keys) >= limit:
            break
    return sorted(keys)
