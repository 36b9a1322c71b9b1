"""Medians, ratios and the tables bench_http.py prints (Markdown, so they paste into docs as they are)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def added_us(rps: float | None, bare_rps: float | None) -> float | None:
    """Extra time per request against the bare app, from throughputs: 1e6/rps - 1e6/bare_rps."""
    if not rps or not bare_rps:
        return None
    return 1e6 / rps - 1e6 / bare_rps


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def fmt_signed(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:+,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """A Markdown table with padded columns; ``right[i]`` right-aligns column i."""
    right = list(right) if right is not None else [index > 0 for index in range(len(headers))]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[Any]) -> str:
        padded = [
            str(cell).rjust(width) if align else str(cell).ljust(width)
            for cell, width, align in zip(cells, widths, right, strict=False)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (width + 1) + ":") if align else ("-" * (width + 2))
            for width, align in zip(widths, right, strict=False)
        )
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])
