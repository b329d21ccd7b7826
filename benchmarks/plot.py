"""One plot of a scaling run (matplotlib, from the ``bench`` extra)."""

from __future__ import annotations

import os
from typing import Sequence


def save_plot(rows: Sequence[Sequence[float]], series: Sequence[tuple[int, str]], *,
              xlabel: str, ylabel: str, title: str, out: str, logy: bool = False) -> None:
    """Plot columns of ``rows`` (``series``: (column, label)) against column 0,
    on a log x axis (and y, with ``logy``), into ``out``; say so and do
    nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [r[0] for r in rows]
    for col, label in series:
        ax.plot(xs, [r[col] for r in rows], marker="o", label=label)
    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"saved {out}")
