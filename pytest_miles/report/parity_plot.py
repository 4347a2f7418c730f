"""PNGs for train-rollout parity (matplotlib, when installed): the |delta| histogram with the
delta by response position, and the divergence locator's growth by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_miles.report.plot import pyplot, save


def plot_parity(pairs: dict[str, Any], path: str | Path, title: str) -> Path | None:
    """Left: histogram of |delta| per pair (log x); right: mean |delta| by response position.
    `pairs`: name -> PairFigures (or its to_json()). None when matplotlib is missing."""
    from pytest_miles.validation import writable_file

    path = writable_file("plot_parity(path)", path)
    plt = pyplot()
    if plt is None:
        return None
    fig, (hist, pos) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, f in pairs.items():
        f = f if isinstance(f, dict) else f.to_json()
        vals = [abs(d) for row in f["deltas"] for d in row]
        nonzero = [v for v in vals if v > 0]
        if nonzero:
            lo = min(nonzero)
            bins = [lo * (max(nonzero) / lo) ** (i / 30) for i in range(31)] if max(nonzero) > lo else 10
            hist.hist(nonzero, bins=bins, alpha=0.5, label=f"{name} ({len(vals) - len(nonzero)} exact)")
        pos.plot(range(len(f["by_position"])), f["by_position"], marker=".", label=name)
    if hist.get_legend_handles_labels()[0]:
        hist.set_xscale("log")
        hist.legend(fontsize=7)
    hist.set_xlabel("|delta logprob| per token")
    hist.set_ylabel("tokens")
    pos.set_xlabel("response position (0 = first generated token)")
    pos.set_ylabel("mean |delta|")
    pos.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(plt, fig, path)


def plot_layers(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """Max |a - b| per layer point (log y), in forward order; the first differing point marked."""
    from pytest_miles.validation import writable_file

    path = writable_file("plot_layers(path)", path)
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.35), 3.8))
    ys = [max(r["max_abs"], 1e-12) for r in rows]
    ax.plot(range(len(rows)), ys, marker="o")
    first = next((i for i, r in enumerate(rows) if r["max_abs"] > r.get("tolerance", 0.0)), None)
    if first is not None:
        ax.axvline(first, color="#c62828", linestyle="--", label=f"first: {rows[first]['name']}")
        ax.legend(fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=70, fontsize=6)
    ax.set_ylabel("max |a - b|")
    ax.set_title(title, fontsize=10)
    return save(plt, fig, path)
