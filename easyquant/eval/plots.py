"""One figure to a PNG file, the same size and title style for every table's plot."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path


def save_plot(path: Path, draw: Callable, title: str) -> None:
    """``draw(fig, ax)`` fills the axes; the title is wrapped to fit. Headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(fig, ax)
    ax.set_title(textwrap.fill(title, 100), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
