"""Draw what each algorithm allows under the same bursty traffic: ``python scripts/plots.py`` (or ``nox -s plots``).

The real engine decides every request: ``MemoryBackend`` with an injected clock, so each picture is exact and
the same on every run. One client sends a request every 3 seconds for 60 seconds, plus three bursts of
25 requests in one second; the second burst straddles a fixed-window boundary (t = 30 s). Every policy is "10 per 10
seconds" in its own terms. Writes ``docs/plots/<algorithm>.png``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt

from asgi_ratelimit import GCRA, FixedWindow, MemoryBackend, Policy, SlidingWindow, SlidingWindowCounter, TokenBucket

OUT = Path(__file__).resolve().parent.parent / "docs" / "plots"
MICROS = 1_000_000
START_US = 1_700_000_000 * MICROS  # a multiple of 10 s: fixed windows start at t = 0, 10, 20, ...
DURATION = 60.0
LIMIT, WINDOW = 10, 10.0

POLICIES: dict[str, tuple[Policy, str]] = {
    "token_bucket": (
        TokenBucket(capacity=LIMIT, refill_rate=LIMIT / WINDOW),
        "TokenBucket(capacity=10, refill_rate=1)",
    ),
    "sliding_window": (SlidingWindow(limit=LIMIT, window=WINDOW), "SlidingWindow(limit=10, window=10)"),
    "gcra": (GCRA(limit=LIMIT, period=WINDOW), "GCRA(limit=10, period=10)"),
    "fixed_window": (FixedWindow(limit=LIMIT, window=WINDOW), "FixedWindow(limit=10, window=10)"),
    "sliding_window_counter": (
        SlidingWindowCounter(limit=LIMIT, window=WINDOW),
        "SlidingWindowCounter(limit=10, window=10)",
    ),
}


def traffic() -> list[float]:
    """Request times in seconds: one every 3 s, plus bursts of 25 at 10 s, 29.5 s (across a boundary) and 45 s."""
    times = [float(second) + 0.5 for second in range(0, int(DURATION), 3)]
    for start in (10.0, 29.5, 45.0):
        times += [start + index * 0.04 for index in range(25)]
    return sorted(times)


async def decide(policy: Policy, times: list[float]) -> list[bool]:
    """Whether the engine allows each request, in order."""
    now = [START_US]
    backend = MemoryBackend(clock=lambda: now[0])
    allowed = []
    for moment in times:
        now[0] = START_US + round(moment * MICROS)
        (decision,) = await backend.hit("client", [policy])
        allowed.append(decision.allowed)
    return allowed


def trailing_admitted(times: list[float], allowed: list[bool], step: float = 0.1) -> tuple[list[float], list[int]]:
    """How many requests were admitted in the WINDOW seconds up to each instant."""
    admitted = [moment for moment, ok in zip(times, allowed, strict=True) if ok]
    xs, ys = [], []
    for index in range(int(DURATION / step) + 1):
        instant = index * step
        xs.append(instant)
        ys.append(sum(instant - WINDOW < moment <= instant for moment in admitted))
    return xs, ys


def draw(name: str, title: str, times: list[float], allowed: list[bool], out: Path) -> Path:
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.2), sharex=True, height_ratios=[1, 1.3])
    ok = [moment for moment, verdict in zip(times, allowed, strict=True) if verdict]
    denied = [moment for moment, verdict in zip(times, allowed, strict=True) if not verdict]
    bins = [index * 0.5 for index in range(int(DURATION * 2) + 1)]
    top.hist([ok, denied], bins=bins, stacked=True, color=["#2e7d32", "#c62828"], label=["allowed", "denied (429)"])
    top.set_ylabel("requests\nper 0.5 s")
    top.legend(loc="upper right", fontsize=9)
    top.set_title(f"{title}: {len(ok)} allowed, {len(denied)} denied of {len(times)}", fontsize=11)

    xs, ys = trailing_admitted(times, allowed)
    bottom.plot(xs, ys, color="#1565c0", label=f"allowed in the last {WINDOW:g} s")
    bottom.axhline(LIMIT, color="black", linestyle="--", linewidth=1, label=f"limit: {LIMIT} per {WINDOW:g} s")
    for boundary in range(0, int(DURATION) + 1, int(WINDOW)):
        bottom.axvline(boundary, color="#9e9e9e", linewidth=0.5, zorder=0)
    bottom.set_ylim(0, LIMIT * 2.2)
    bottom.set_ylabel(f"allowed in the\nlast {WINDOW:g} s")
    bottom.set_xlabel("time (s); grey lines: fixed-window boundaries")
    bottom.set_xlim(0, DURATION)
    bottom.legend(loc="upper right", fontsize=9)
    figure.tight_layout()
    path = out / f"{name}.png"
    figure.savefig(path, dpi=100, metadata={"Software": None})  # no version stamp: reruns give the same bytes
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"the directory to write to (default {OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    times = traffic()
    for name, (policy, title) in POLICIES.items():
        allowed = asyncio.run(decide(policy, times))
        path = draw(name, title, times, allowed, args.out)
        print(f"{path}: {sum(allowed)} allowed, {len(allowed) - sum(allowed)} denied")


if __name__ == "__main__":
    main()
