"""Charts for reports (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PHASE_COLORS = {"meta": "#f2f2f2", "val": "#fff3d6", "test": "#e3f1e3"}


def plot_backtest(results: pd.DataFrame, summary: dict, path: Path) -> None:
    """NDCG@20 and training time per period for each method's chosen config."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    periods = sorted(results["period"].unique())
    pos = {p: i for i, p in enumerate(periods)}
    phases = results.drop_duplicates("period").set_index("period")["phase"]
    for ax in (ax1, ax2):
        for p, ph in phases.items():
            ax.axvspan(pos[p] - 0.5, pos[p] + 0.5, color=PHASE_COLORS.get(ph, "white"), lw=0)
    for method, info in summary["methods"].items():
        part = results[(results["method"] == method)
                       & (results["params"] == json.dumps(info["params"]))]
        x = [pos[p] for p in part["period"]]
        ax1.plot(x, part["ndcg@20"], marker="o", ms=3, label=f"{method} {info['params'] or ''}")
        if method != "pop":
            ax2.plot(x, part["train_seconds"], marker="o", ms=3, label=method)
    ax1.set_ylabel("NDCG@20 (next period)")
    ax1.set_title(f"{summary['dataset']}: test on the next period "
                  "(grey: meta-train, yellow: validation, green: test)")
    ax1.legend(fontsize=8, ncol=2)
    ax2.set_ylabel("training seconds per period")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8, ncol=3)
    step = max(1, len(periods) // 12)
    ax2.set_xticks(range(0, len(periods), step), periods[::step], rotation=30, ha="right",
                   fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def decisions_html(decisions: list[dict]) -> str:
    """A self-contained HTML page: the gate's history as a chart and a table."""
    import base64
    import html
    import io

    rows = [d for d in decisions if d.get("scores")]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    if rows:
        x = [d["period"] for d in rows]
        for name in ("candidate", "incumbent", "popularity"):
            ys = [d["scores"].get(name, {}).get("ndcg@20", float("nan")) for d in rows]
            ax.plot(x, ys, marker="o", ms=3, label=name)
        for i, d in enumerate(rows):
            if d["decision"] == "promote":
                ax.axvline(i, color="#9c9", lw=0.8, zorder=0)
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=30, labelsize=7)
    ax.set_ylabel("NDCG@20 on the new period")
    ax.set_title("Gate history (green lines: promotions)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    table = "".join(
        f"<tr><td>{html.escape(str(d.get('period')))}</td><td>{d.get('decision')}</td>"
        f"<td>{html.escape('; '.join(d.get('reasons', [])))}</td></tr>" for d in decisions)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>smlrec gate history"
            "</title><style>body{font-family:sans-serif;margin:1.5em}td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd;font-size:13px}</style></head><body>"
            "<h1>smlrec: gate history</h1>"
            f"<img alt='gate history chart' src='data:image/png;base64,{img}'>"
            "<table><tr><th>period</th><th>decision</th><th>why</th></tr>"
            f"{table}</table></body></html>")
