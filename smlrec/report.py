"""Charts for reports (matplotlib, no display needed)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    # Over many periods single-period figures are spiky lines on top of each other: draw a
    # centred rolling mean (the band still shows the seeds' range, smoothed alike).
    smooth = max(1, len(periods) // 25) if len(periods) > 40 else 1

    def rolled(values: pd.Series):
        if smooth > 1:
            values = values.rolling(smooth, center=True, min_periods=1).mean()
        return values.to_numpy()

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
        marker = {"marker": "o", "ms": 3} if smooth == 1 else {"lw": 1.2}
        line, = ax1.plot(x, rolled(mean), **marker,
                         label=f"{method} {json.dumps(info['params'], sort_keys=True)[:60]}")
        if part["seed"].nunique() > 1 if "seed" in part else False:
            ax1.fill_between(x, rolled(by["ndcg@20"].min()), rolled(by["ndcg@20"].max()),
                             color=line.get_color(), alpha=0.15, lw=0)
        if method != "pop":
            ax2.plot(x, rolled(by["train_seconds"].mean()), **marker, label=method)
    seeds = summary.get("seeds", [0])
    ax1.set_ylabel("NDCG@20 (next period)" + (f", rolling mean of {smooth}" if smooth > 1
                                               else ""))
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


# ----------------------------------------------------------------------------- the run report

KS = (5, 10, 20)
_FLOOR_STYLE = {"color": "#777777", "ls": "--"}
_INCUMBENT_STYLE = {"color": "#222222", "ls": ":"}
_PROMOTED_STYLE = {"marker": "*", "ms": 13, "color": "#d4a017", "ls": "none", "zorder": 5,
                   "markeredgecolor": "#7a5c00"}
# Challengers get these, in order (none of them grey, black or the promotion's gold).
_PALETTE = ("#1f77b4", "#d62728", "#9467bd", "#17becf", "#8c564b", "#e377c2")


def _png(fig: Any) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _models(rows: list[dict]) -> list[str]:
    """Every model the gate scored, challengers first, then the incumbent, then the floor;
    a model with no figure in any row (no incumbent yet) is left out."""
    names: list[str] = []
    for d in rows:
        names += [k for k, v in _scored(d).items() if k not in names and v.get("ndcg@20")
                  is not None]
    return sorted(names, key=lambda n: (n == "popularity", n == "incumbent", n))


def _style(name: str, i: int) -> dict:
    if name == "popularity":
        return {**_FLOOR_STYLE, "label": "popularity floor"}
    if name == "incumbent":
        return {**_INCUMBENT_STYLE, "label": "incumbent (production)"}
    return {"color": _PALETTE[i % len(_PALETTE)], "ls": "-", "label": f"challenger: {name}"}


def metrics_chart(rows: list[dict]) -> str:
    """NDCG and Recall at 5, 10 and 20 over the gated periods for every model scored, the
    promoted challenger starred; a base64 PNG."""
    names = _models(rows)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.2), sharex=True)
    x = list(range(len(rows)))
    for r, metric in enumerate(("ndcg", "recall")):
        for c, k in enumerate(KS):
            ax = axes[r][c]
            key = f"{metric}@{k}"
            for i, name in enumerate(names):
                ys = [_scored(d).get(name, {}).get(key, float("nan")) for d in rows]
                style = _style(name, i)
                ax.plot(x, ys, marker="o", ms=3, lw=1.3, color=style["color"], ls=style["ls"],
                        label=style["label"])
            px = [i for i, d in enumerate(rows) if d.get("decision") == "promote"]
            py = [_scored(rows[i]).get(rows[i].get("strategy") or "", {}).get(key,
                                                                              float("nan"))
                  for i in px]
            if px:
                ax.plot(px, py, label="promoted challenger", **_PROMOTED_STYLE)
            ax.set_title(key.replace("ndcg", "NDCG").replace("recall", "Recall"), fontsize=10)
            ax.grid(alpha=0.3)
            if r == 1:
                step = max(1, len(rows) // 8)
                ax.set_xticks(x[::step], [d["period"] for d in rows][::step], rotation=30,
                              fontsize=7, ha="right")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9,
               frameon=False)
    fig.suptitle("Every model the gate scored, on the period after it was trained",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return _png(fig)


def floor_chart(rows: list[dict]) -> str:
    """Each challenger's NDCG@20 over the floor's with its 95% bootstrap interval, and the
    users each gate scored; a base64 PNG."""
    names = [n for n in _models(rows) if n != "popularity"]
    fig, (ax, ax_users) = plt.subplots(2, 1, figsize=(13, 5.2), sharex=True,
                                       gridspec_kw={"height_ratios": (3, 1)})
    x = list(range(len(rows)))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        style = _style(name, i)
        xs, ys, lo, hi = [], [], [], []
        for j, d in enumerate(rows):
            v = (d.get("vs_floor") or {}).get(name)
            if v and v.get("ci95"):
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(v["ratio"])
                lo.append(v["ratio"] - v["ci95"][0])
                hi.append(v["ci95"][1] - v["ratio"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=3, color=style["color"],
                        label=style["label"])
    ax.axhline(1.0, **_FLOOR_STYLE, label="popularity floor (1.0)")
    ax.set_ylabel("NDCG@20 / floor")
    ax.set_title("NDCG@20 over the popularity floor's, with 95% paired-bootstrap intervals "
                 "over the users scored", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=4)
    users = [d.get("n_users") or _scored(d).get("popularity", {}).get("n_users", 0)
             for d in rows]
    ax_users.bar(x, users, color="#9ecae1")
    ax_users.set_ylabel("users scored")
    step = max(1, len(rows) // 12)
    ax_users.set_xticks(x[::step], [d["period"] for d in rows][::step], rotation=30,
                        fontsize=7, ha="right")
    fig.tight_layout()
    return _png(fig)


def steps_chart(periods: list[str], steps: list[dict[str, float]]) -> str:
    """Seconds of each pipeline step per period, stacked; a base64 PNG."""
    names: list[str] = []
    for s in steps:
        names += [n for n in s if n not in names]
    fig, ax = plt.subplots(figsize=(13, 3.4))
    bottom = [0.0] * len(periods)
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        ys = [s.get(name, 0.0) for s in steps]
        ax.bar(range(len(periods)), ys, bottom=bottom, label=name, color=cmap(i % 20))
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_ylabel("seconds")
    ax.set_title("Each daily run's steps (local runner; each includes its process start)",
                 fontsize=10)
    step = max(1, len(periods) // 12)
    ax.set_xticks(range(0, len(periods), step), periods[::step], rotation=30, fontsize=7,
                  ha="right")
    ax.legend(fontsize=7, ncol=6, loc="upper left")
    fig.tight_layout()
    return _png(fig)


@dataclass
class RunFiles:
    """What a local run kept beside the state store (``runs/``): per period, its reports
    (``reports/<period>/<step>.html|md``) and its summary (``run.json``)."""

    root: Path
    """The folder holding ``reports/``."""
    link_base: Path
    """The report's folder: links are relative to it."""

    def period_files(self, period: str) -> dict[str, str]:
        folder = self.root / "reports" / period
        if not folder.is_dir():
            return {}
        out = {}
        for suffix in (".md", ".html"):  # the HTML rendering wins over the Markdown source
            for f in sorted(folder.glob(f"*{suffix}")):
                out[f.stem] = os.path.relpath(f, self.link_base)
        return out

    def summary(self, period: str) -> dict:
        path = self.root / "reports" / period / "run.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}


def state_report_html(decisions: list[dict], production: dict | None = None, *,
                      packages: list[dict] | None = None, config_text: str | None = None,
                      runs: RunFiles | None = None, title: str = "smlrec: daily runs",
                      state_uri: str = "") -> str:
    """One self-contained HTML page (inline CSS and images, no external URL) for a state
    store: what is serving, the gate's figures over time for every model it scored (NDCG and
    Recall at 5/10/20, each challenger over the floor with its interval, users scored), each
    period's decision with links to its validation, features and gate reports and its step
    times, the models packaged (BentoML tags), and the run configuration."""
    import html
    from datetime import UTC, datetime

    esc = html.escape
    rows = [d for d in decisions if d.get("scores")]
    names = _models(rows)
    summaries = {d["period"]: runs.summary(d["period"]) for d in decisions} if runs else {}
    promoted = sum(d.get("decision") == "promote" for d in decisions)
    if production and production.get("period"):
        serving = (f"the <b>{esc(production.get('strategy') or 'sml')}</b> model trained on "
                   f"period {esc(production['period'])}, promoted at the gate of "
                   f"{esc(str(production.get('decided_in', '?')))}")
    else:
        serving = "popular items: no challenger has been promoted yet"
    parts = [f"<h1>{esc(title)}</h1>",
             f"<p class='lead'><b>Serving now:</b> {serving}. {len(decisions)} gate decisions, "
             f"{promoted} promoted.</p>"]
    if rows:
        parts += ["<h2>Gate figures over time</h2>",
                  f"<img alt='NDCG and Recall at 5, 10 and 20 per period' "
                  f"src='data:image/png;base64,{metrics_chart(rows)}'>",
                  f"<img alt='NDCG@20 over the floor with intervals; users scored' "
                  f"src='data:image/png;base64,{floor_chart(rows)}'>"]
    steps = [(p, s.get("steps") or {}) for p, s in summaries.items() if s.get("steps")]
    if steps:
        parts += ["<h2>Step times</h2>",
                  f"<img alt='seconds per step and period' src='data:image/png;base64,"
                  f"{steps_chart([p for p, _ in steps], [s for _, s in steps])}'>"]
    head = "".join(f"<th>{esc(n)}<br><small>NDCG@20 · Recall@20 · /floor [95% CI]</small></th>"
                   for n in names)
    body = []
    for d in decisions:
        s = _scored(d)
        cells = []
        for n in names:
            v = s.get(n)
            if not v or v.get("ndcg@20") is None:
                cells.append("<td></td>")
                continue
            vf = (d.get("vs_floor") or {}).get(n)
            ci = (f"<br><small>{vf['ratio']:.2f} [{vf['ci95'][0]:.2f}, {vf['ci95'][1]:.2f}]"
                  "</small>" if vf and vf.get("ci95") else "")
            star = " ★" if d.get("decision") == "promote" and d.get("strategy") == n else ""
            cells.append(f"<td>{v['ndcg@20']:.4f} · {v.get('recall@20', float('nan')):.4f}"
                         f"{star}{ci}</td>")
        files = runs.period_files(d["period"]) if runs else {}
        links = " ".join(f"<a href='{esc(href)}'>{esc(name)}</a>"
                         for name, href in sorted(files.items()))
        summary = summaries.get(d["period"], {})
        seconds = f"{summary['seconds']:.1f}" if summary.get("seconds") else ""
        users = d.get("n_users", s.get("popularity", {}).get("n_users", ""))
        body.append(
            f"<tr><td>{esc(str(d.get('period')))}</td>"
            f"<td class='{esc(str(d.get('decision')))}'>{esc(str(d.get('decision')))}</td>"
            f"<td>{esc(str(d.get('strategy') or ''))}</td>{''.join(cells)}"
            f"<td>{users}</td><td>{seconds}</td><td>{links}</td>"
            f"<td class='why'>{esc('; '.join(d.get('reasons', [])))}</td></tr>")
    parts += ["<h2>Every gate decision</h2>",
              "<p>Each model is scored on the period after the one it was trained on (test on "
              "the next period); ★ marks the challenger promoted. Links: each period's "
              "validation (Great Expectations suite results), features and gate reports.</p>",
              f"<table><tr><th>period</th><th>decision</th><th>promoted</th>{head}"
              "<th>users</th><th>run s</th><th>reports</th><th>why</th></tr>"
              f"{''.join(body)}</table>"]
    cold = [d for d in decisions if d.get("cold")]
    if cold:
        parts += ["<h2>Cold start at the gate</h2>",
                  "<p>Yesterday's MeLU against the mean embedding of the support (the path "
                  "for users the model does not know without MeLU) and the floor, on the "
                  "period's new users (support: their first items, the rest to predict); "
                  "the cold path is what the service's packages take.</p>",
                  "<table><tr><th>period</th><th>new users</th><th>MeLU NDCG@20</th>"
                  "<th>mean embedding</th><th>floor</th><th>cold path</th><th>why</th></tr>"
                  + "".join(_cold_row(d, esc) for d in cold) + "</table>"]
    if packages:
        parts += ["<h2>Models packaged</h2>",
                  "<table><tr><th>stage</th><th>period</th><th>strategy</th>"
                  "<th>BentoML tag</th><th>decided in</th><th>packaged at</th></tr>"
                  + "".join(f"<tr><td>{esc(str(p.get('stage')))}</td>"
                            f"<td>{esc(str(p.get('period')))}</td>"
                            f"<td>{esc(str(p.get('strategy') or ''))}</td>"
                            f"<td><code>{esc(str(p.get('tag')))}</code></td>"
                            f"<td>{esc(str(p.get('decided_in') or ''))}</td>"
                            f"<td>{esc(str(p.get('recorded_at') or ''))}</td></tr>"
                            for p in packages) + "</table>"]
    if config_text:
        parts += ["<h2>Run configuration</h2>", f"<pre>{esc(config_text)}</pre>"]
    total = sum(s.get("seconds") or 0 for s in summaries.values())
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<p class='foot'>Written {now} from the state store {esc(state_uri)}"
                 + (f"; daily runs took {total:.0f} s in all" if total else "") + ".</p>")
    style = ("body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}"
             "img{max-width:100%;display:block;margin:0.5em 0}"
             "table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid "
             "#ddd;font-size:12px;vertical-align:top;text-align:left}th{background:#f5f5f5}"
             "td.promote{color:#1a7f37;font-weight:bold}td.reject{color:#b35900}"
             "td:first-child{white-space:nowrap}td.why{max-width:420px}pre{background:#f7f7f7;padding:0.8em;font-size:12px}"
             ".lead{font-size:15px}.foot{color:#777;font-size:12px}")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def _cold_row(d: dict, esc: Any) -> str:
    c = d["cold"]

    def fig(name: str) -> str:
        v = (c.get(name) or {}).get("ndcg@20")
        return "" if v is None else f"{v:.4f}"

    return (f"<tr><td>{esc(str(d.get('period')))}</td><td>{c.get('n_users', 0)}</td>"
            f"<td>{fig('melu')}</td><td>{fig('mean_emb')}</td><td>{fig('popularity')}</td>"
            f"<td>{esc(str(c.get('path', '')))}</td>"
            f"<td class='why'>{esc(str(c.get('reason', '')))}</td></tr>")


def markdown_page(markdown_text: str, title: str) -> str:
    """A kept Markdown report (validation, features, gate) as a self-contained HTML page."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>body{{font-family:system-ui,"
            "sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse}"
            "td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px;text-align:left}"
            "th{background:#f5f5f5}code{font-size:12px}</style></head>"
            f"<body>{body}</body></html>")
