"""Draw docs/plots/performance.png from one bench_http.py results file.

    python benchmarks/plot_performance.py benchmarks/results/http-<timestamp>.json

Bars: requests per second through uvicorn for each configuration of that run; the label on each bar is
its ratio to the bare app of the same framework.  Nothing is measured here: the figures are the run's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after matplotlib.use: the backend must be chosen first

OUT = Path(__file__).resolve().parent.parent / "docs" / "plots" / "performance.png"
ORDER = [
    "bare-starlette",
    "ours-memory",
    "ours-redis",
    "ours-redis-fixed",
    "asgi-ratelimit",
    "slowapi-asgi",
    "slowapi",
    "ours-flood",
    "asgi-ratelimit-flood",
    "slowapi-asgi-flood",
]


def main() -> None:
    path = Path(sys.argv[1])
    summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
    names = [name for name in ORDER if name in summary]
    rps = [summary[name]["server_rps"] for name in names]
    ratios = [summary[name]["server_rps_ratio"] for name in names]
    colors = ["#999999" if n.startswith("bare") else "#1f77b4" if n.startswith("ours") else "#ff7f0e" for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    bars = ax.barh(names[::-1], rps[::-1], color=colors[::-1])
    for bar, ratio in zip(bars, ratios[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  {ratio:.2f}x", va="center", fontsize=9)
    ax.set_xlabel("requests per second through uvicorn (1 worker, wrk -c50); label: ratio to the bare app")
    ax.set_title(f"asgi_ratelimit (blue) and its peers (orange), one run: {path.name}", fontsize=10)
    ax.set_xlim(0, max(rps) * 1.15)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
