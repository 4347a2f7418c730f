"""A PNG of per-batch-size logprob deviation in a negative control (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files, no display), or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write `path` as PNG and free the figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_deviation(deviation: dict[int, float], path: str | Path, title: str) -> Path | None:
    """Bar chart of max |logprob - reference| per batch size; None when matplotlib is missing."""
    from pytest_miles.validation import writable_file

    path = writable_file("plot_deviation(path)", path)  # parents created, or a clear error before plotting
    plt = pyplot()
    if plt is None:
        return None
    sizes = sorted(deviation)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([str(s) for s in sizes], [deviation[s] for s in sizes], color="#c44e52")
    ax.set_xlabel("batch size")
    ax.set_ylabel("max |logprob - batch-size-1 reference|")
    ax.set_title(title, fontsize=10)
    return save(plt, fig, path)
