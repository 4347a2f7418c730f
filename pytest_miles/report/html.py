"""The determinism report as one self-contained HTML file: the fingerprint, the checks table,
the precision heatmap and the negative-control plots, images embedded as data URIs so the file
can be attached to a CI run, mailed or opened offline. Plots need matplotlib; without it the
page says so instead of showing them."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path
from typing import Any

from pytest_miles.report.collector import write_atomic
from pytest_miles.report.plot import pyplot

COLOURS = {"passed": "#2e7d32", "failed": "#c62828", "error": "#c62828", "skipped": "#9e9e9e",
           "xfailed": "#ef6c00", "xpassed": "#6a1b9a", "caught": "#1565c0",
           "inconclusive": "#8d6e00", "unbudgeted": "#5d4037"}
_CELL = re.compile(r"precision rollout=(?P<r>[\w]+)-train=(?P<t>[\w]+)")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def precision_heatmap(checks: list[dict[str, Any]], hardware=None) -> bytes | None:
    """PNG: rollout x train cells coloured by train_rollout_logprob_abs_diff where measured,
    labelled with the outcome (rejected, skipped, ...) elsewhere. None without matplotlib."""
    from pytest_miles.facts.precision import FORMATS, cell_status, unsupported_on

    plt = pyplot()
    if plt is None:
        return None
    names = list(FORMATS)
    found = {}
    for c in checks:
        m = _CELL.search(c["check"]) or _CELL.search(c["nodeid"].replace("[", " precision ").rstrip("]"))
        if m:
            found[(m["r"], m["t"])] = c
    values = [[float("nan")] * len(names) for _ in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 1.0 * len(names) + 1.5))
    for i, r in enumerate(names):
        for j, t in enumerate(names):
            c, cell = found.get((r, t)), cell_status(r, t)
            drift = (c or {}).get("figures", {}).get("train_rollout_logprob_abs_diff")
            if drift is not None:
                values[i][j] = float(drift)
                label = f"{float(drift):.3g}"
            elif c is not None:
                label = "rejected" if not cell.valid else c["outcome"]
            else:
                label = "invalid" if not cell.valid else (
                    "no hw" if hardware is not None and unsupported_on(cell.formats, hardware) else "not run")
            ax.text(j, i, label, ha="center", va="center", fontsize=8)
    im = ax.imshow(values, cmap="YlOrRd")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("train")
    ax.set_ylabel("rollout")
    ax.set_title("train_rollout_logprob_abs_diff per precision cell", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _plots(checks: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """PNG files the checks name in their figures (the negative controls' `plot`)."""
    out = []
    for c in checks:
        for k, v in c.get("figures", {}).items():
            if isinstance(v, str) and v.endswith(".png") and Path(v).is_file():
                out.append((f"{c['check']} ({k})", Path(v).read_bytes()))
    return out


def render(data: dict[str, Any], hardware=None) -> str:
    e = html.escape
    checks = data["checks"]
    totals = data["totals"]
    rows = []
    for c in checks:
        figures = ", ".join(f"{k}={v}" for k, v in c.get("figures", {}).items())
        colour = COLOURS.get(c["outcome"], "#000")
        rows.append(f"<tr><td class='check'>{e(c['check'])}</td><td style='color:{colour}'><b>{e(c['outcome'])}</b>"
                    f"</td><td>{c.get('duration_s', 0):.2f} s</td><td>{e(figures)}</td>"
                    f"<td>{e(c.get('reason', ''))}</td>"
                    f"<td class='node'>{e(c['nodeid'])}</td></tr>")
    fp = "".join(f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data["fingerprint"].items())
    images = []
    heat = precision_heatmap(checks, hardware) if any("precision" in c["check"] for c in checks) else None
    if heat:
        images.append(("precision heatmap", heat))
    images += _plots(checks)
    if pyplot() is None:
        figs = "<p>matplotlib is not installed: no plots (pip install matplotlib).</p>"
    else:
        figs = "".join(f"<figure><img alt='{e(t)}' src='{_data_uri(b)}'><figcaption>{e(t)}</figcaption></figure>"
                       for t, b in images) or "<p>No plots in this run.</p>"
    summary = data.get("summary") or f"{totals['checks']} determinism checks: " + ", ".join(
        f"{v} {k}" for k, v in totals.items() if k != "checks" and v)  # a report from before the summary line
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pytest-miles determinism report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; font-size: 13px; }}
td.node {{ color: #666; font-family: monospace; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }} img {{ max-width: 720px; }}
</style></head><body>
<h1>pytest-miles determinism report</h1>
<p id="totals">{e(summary)}; run of {data['duration_s']:.1f} s started
{e(data['started'])}{'' if data['complete'] else ' (incomplete: the run did not finish)'}</p>
<h2>Checks</h2>
<table id="checks"><tr><th>check</th><th>outcome</th><th>duration</th><th>figures</th><th>reason</th><th>test</th></tr>
{''.join(rows)}</table>
<h2>Plots</h2>
{figs}
<h2>Fingerprint (what decides bitwise results)</h2>
<table id="fingerprint">{fp}</table>
<p>Schema {e(data['schema'])} version {data['schema_version']}.</p>
</body></html>
"""


def write_html(path: str | Path, data: dict[str, Any], hardware=None) -> Path:
    write_atomic(path, render(data, hardware))
    return Path(path)
