"""Charts for reports (matplotlib, no display needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PHASE_COLORS = {"meta": "#f2f2f2", "val": "#fff3d6", "test": "#e3f1e3"}


def plot_backtest(results: pd.DataFrame, summary: dict, path: Path) -> None:
    """NDCG@20 (mean over seeds, with the seeds' range as a band) and training time per
    period for each method's chosen config."""
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    periods = sorted(results["period"].unique())
    pos = {p: i for i, p in enumerate(periods)}
    phases = results.drop_duplicates("period").set_index("period")["phase"]
    for ax in (ax1, ax2):
        for p, ph in phases.items():
            ax.axvspan(pos[p] - 0.5, pos[p] + 0.5, color=PHASE_COLORS.get(ph, "white"), lw=0)
    for method, info in summary["methods"].items():
        part = results[(results["method"] == method)
                       & (results["params"] == json.dumps(info["params"], sort_keys=True))]
        by = part.groupby("period")
        x = [pos[p] for p in by.groups]
        mean = by["ndcg@20"].mean()
        line, = ax1.plot(x, mean.to_numpy(), marker="o", ms=3,
                         label=f"{method} {json.dumps(info['params'], sort_keys=True)[:60]}")
        if part["seed"].nunique() > 1 if "seed" in part else False:
            ax1.fill_between(x, by["ndcg@20"].min().to_numpy(), by["ndcg@20"].max().to_numpy(),
                             color=line.get_color(), alpha=0.15, lw=0)
        if method != "pop":
            ax2.plot(x, by["train_seconds"].mean().to_numpy(), marker="o", ms=3, label=method)
    seeds = summary.get("seeds", [0])
    ax1.set_ylabel("NDCG@20 (next period)")
    ax1.set_title(f"{summary['dataset']}: test on the next period, mean over {len(seeds)} "
                  "seed(s), band: range (grey: meta-train, yellow: validation, green: test)",
                  fontsize=9)
    ax1.legend(fontsize=7, ncol=1)
    ax2.set_ylabel("training seconds per period")
    ax2.set_yscale("log")
    ax2.legend(fontsize=8, ncol=3)
    step = max(1, len(periods) // 12)
    ax2.set_xticks(range(0, len(periods), step), periods[::step], rotation=30, ha="right",
                   fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scored(d: dict) -> dict[str, dict]:
    """A decision's scores by model: each challenger, the incumbent and the floor (older
    records name the single candidate ``candidate``)."""
    return {k: v for k, v in (d.get("scores") or {}).items() if isinstance(v, dict)}


def decisions_html(decisions: list[dict], production: dict | None = None) -> str:
    """A self-contained HTML page: the gate's history as a chart and a table, under what
    is serving now (``production``: the production pointer's record)."""
    import base64
    import html
    import io

    rows = [d for d in decisions if d.get("scores")]
    names: list[str] = []
    for d in rows:
        names += [k for k in _scored(d) if k not in names]
    order = sorted(names, key=lambda n: (n == "popularity", n == "incumbent", n))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    if rows:
        x = list(range(len(rows)))
        for name in order:
            ys = [_scored(d).get(name, {}).get("ndcg@20", float("nan")) for d in rows]
            if all(math.isnan(y) for y in ys):
                continue  # e.g. no incumbent yet: nothing to draw, nothing to list
            style = {"popularity": dict(color="#777", ls="--"),
                     "incumbent": dict(color="#222", ls=":")}.get(name, {})
            ax.plot(x, ys, marker="o", ms=3, label="popularity floor" if name == "popularity"
                    else name, **style)
        for i, d in enumerate(rows):
            if d["decision"] == "promote":
                y = _scored(d).get(d.get("strategy") or "candidate", {}).get("ndcg@20")
                if y is not None:
                    ax.plot(i, y, marker="*", ms=12, color="#d4a017", zorder=5,
                            label="promoted" if i == next(j for j, e in enumerate(rows)
                                                          if e["decision"] == "promote")
                            else None)
        ax.set_xticks(x, [d["period"] for d in rows], rotation=30, fontsize=7)
        ax.legend(fontsize=8, ncol=3)
    ax.set_ylabel("NDCG@20 on the new period")
    ax.set_title("Gate history: every model scored on the period after it was trained")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()

    def cell(d: dict, name: str) -> str:
        v = _scored(d).get(name, {}).get("ndcg@20")
        return "" if v is None else f"{v:.4f}"

    if production and production.get("period"):
        serving = html.escape(f"the {production.get('strategy') or 'sml'} model of period "
                              f"{production['period']}, promoted in "
                              f"{production.get('decided_in', '?')}")
    else:
        serving = "popular items (no challenger has been promoted yet)"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in order)
    table = "".join(
        f"<tr><td>{html.escape(str(d.get('period')))}</td><td>{d.get('decision')}</td>"
        f"<td>{html.escape(str(d.get('strategy') or ''))}</td>"
        + "".join(f"<td>{cell(d, n)}</td>" for n in order)
        + f"<td>{d.get('n_users', _scored(d).get('popularity', {}).get('n_users', ''))}</td>"
        f"<td>{html.escape('; '.join(d.get('reasons', [])))}</td></tr>" for d in decisions)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>smlrec gate history"
            "</title><style>body{font-family:sans-serif;margin:1.5em}td,th{padding:2px 8px;"
            "border-bottom:1px solid #ddd;font-size:13px}</style></head><body>"
            "<h1>smlrec: gate history</h1>"
            f"<p><b>Serving now:</b> {serving}</p>"
            f"<img alt='gate history chart' src='data:image/png;base64,{img}'>"
            "<p>NDCG@20 on each new period (stars: the promoted challenger).</p>"
            f"<table><tr><th>period</th><th>decision</th><th>promoted</th>{head}"
            f"<th>users</th><th>why</th></tr>{table}</table></body></html>")
