"""MemoryBackend memory per key, for each algorithm and for concurrency slots, measured with tracemalloc.

Each case fills a fresh MemoryBackend with 100,000 identities, one hit each (so one key each), and
divides the memory Python allocated meanwhile by the number of keys.  That includes the key string,
the state, the store's entry and the eviction bookkeeping; it also includes the identity strings the
run builds and the backend's cache of state-key names (bounded by max_keys too), so it is what a
process pays per identity, not only per key.  The sliding-window log holds one entry per admitted
hit: it is measured after 1 and after 10 hits per identity.

    python benchmarks/memory_backend_per_key.py

Writes benchmarks/results/memory-backend-<timestamp>.json.
"""

from __future__ import annotations

import gc
import json
import platform
import sys
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asgi_ratelimit
from asgi_ratelimit import Concurrency, MemoryBackend, parse_limit

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = 100_000
# (label, algorithm or "concurrency", hits per identity)
CASES = [
    ("token_bucket", "token_bucket", 1),
    ("gcra", "gcra", 1),
    ("fixed_window", "fixed_window", 1),
    ("sliding_window_counter", "sliding_window_counter", 1),
    ("sliding_window, 1 entry", "sliding_window", 1),
    ("sliding_window, 10 entries", "sliding_window", 10),
    ("concurrency, 1 slot taken", "concurrency", 1),
]


def measure(algorithm: str, hits: int) -> float:
    identities = [f"client-{number}" for number in range(KEYS)]
    gc.collect()
    tracemalloc.start()
    backend = MemoryBackend(max_keys=KEYS)
    if algorithm == "concurrency":
        limit = Concurrency(10, timeout=60)
        for number, identity in enumerate(identities):
            backend.submit([], [(identity, limit)], f"token-{number}")
    else:
        policy = parse_limit("100/day", algorithm)  # nothing expires while the run fills the store
        for identity in identities:
            for _ in range(hits):
                backend.submit([(identity, policy, 1)], (), "")
    gc.collect()
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(backend) == KEYS
    return used / KEYS


def main() -> None:
    rows: list[dict[str, Any]] = []
    for label, algorithm, hits in CASES:
        per_key = measure(algorithm, hits)
        rows.append({"case": label, "bytes_per_key": round(per_key)})
        print(f"{label:32} {per_key:8.0f} bytes per key")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"memory-backend-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "what": "MemoryBackend bytes per key (tracemalloc), 100,000 identities per case",
                "asgi_ratelimit": asgi_ratelimit.__version__,
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "results": rows,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"wrote {out.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
