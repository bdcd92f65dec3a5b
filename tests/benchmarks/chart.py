"""Draw ``results.png`` from ``results.json``: p50 latency at 1 connection and throughput at 16, per system.

Both panels use a log scale: the systems differ by two orders of magnitude (a direct call against LiteLLM),
and a linear axis would flatten everything but the slowest bar. Run alone:
``python -m tests.benchmarks.chart results.json results.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot's import

import matplotlib.pyplot as plt

__all__ = ["LABELS", "draw"]

LABELS = {
    "direct": "direct",
    "bare": "bare aiohttp\nASGI proxy",
    "embedgate_miss": "embedgate\ncache miss",
    "embedgate_hit": "embedgate\ncache hit",
    "litellm": "LiteLLM\nproxy",
}
_CASE_COLORS = {"single": "#4C72B0", "batch": "#DD8452"}


def _value(rows: list[dict[str, Any]], system: str, case: str, conns: int, field: str) -> float | None:
    for r in rows:
        if r["system"] == system and r["case"] == case and r["connections"] == conns and r.get(field):
            return float(r[field])
    return None


def draw(results: dict[str, Any], path: Path) -> None:
    """Two panels (latency, throughput), one bar group per measured system, one bar per case."""
    rows: list[dict[str, Any]] = results["scenarios"]
    systems = [s for s in LABELS if any(r["system"] == s for r in rows)]
    cases = [c for c in _CASE_COLORS if any(r["case"] == c for r in rows)]
    meta = results.get("meta", {})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    panels = [
        (axes[0], "p50_ms", 1, "p50 latency, 1 connection (ms, log)", "{:.2f}"),
        (axes[1], "rps", 16, "throughput, 16 connections (req/s, log)", "{:,.0f}"),
    ]
    width = 0.8 / max(1, len(cases))
    for ax, field, conns, title, fmt in panels:
        for j, case in enumerate(cases):
            xs, ys = [], []
            for i, system in enumerate(systems):
                v = _value(rows, system, case, conns, field)
                if v is not None:
                    xs.append(i + (j - (len(cases) - 1) / 2) * width)
                    ys.append(v)
            inputs = (meta.get("cases") or {}).get(case, "")
            bars = ax.bar(
                xs,
                ys,
                width,
                label=f"{case} ({inputs} input{'s' if inputs != 1 else ''})",
                color=_CASE_COLORS[case],
            )
            ax.bar_label(bars, labels=[fmt.format(y) for y in ys], fontsize=7, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(systems)), [LABELS[s] for s in systems], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.25)
        ax.margins(y=0.15)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"embedgate benchmark - {meta.get('dims', '')} dims, {meta.get('encoding_format', '')}, "
        f"{meta.get('cpus', '?')} CPUs, {meta.get('duration_s', '?')} s per cell, "
        f"engine {meta.get('engine', '?')}, "
        f"commit {meta.get('git_commit', '?')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """``chart.py RESULTS_JSON OUT_PNG``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m tests.benchmarks.chart results.json results.png")
    draw(json.loads(Path(args[0]).read_text()), Path(args[1]))


if __name__ == "__main__":
    main()
