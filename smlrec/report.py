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
