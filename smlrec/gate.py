"""The canary gate: "test on the next period" decides which challenger, if any, is promoted.

Yesterday's challengers (SML and the other strategies the run configuration trains), the
incumbent (production) model and the popularity floor are all evaluated on the new
period's data D_t. A challenger is eligible when every number is finite, it beats the floor
and it is not worse than the incumbent by more than ``tolerance`` (relative) on the primary
metric; the eligible challenger with the best primary metric is promoted. With no incumbent
a challenger must only beat the floor. When none is eligible, the incumbent keeps serving.

"Worse than the incumbent" is judged in one of two ways. With a paired bootstrap interval
of the challenger's metric over the incumbent's (``vs_incumbent``, what the daily gate
passes), a challenger is refused only when the whole 95% interval lies below
``1 - tolerance``: the data say it is worse beyond the tolerance. A week scores a few dozen
returning users, so a point estimate would refuse or promote on noise; and the incumbent is
the older model, which knows none of the items and users that appeared since it was
trained (the gate cannot score those), so a challenger that is not shown to be worse
should replace it. Without an interval the point estimates are compared.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PRIMARY = "ndcg@20"
CHECKED = ("ndcg@20", "recall@20")


@dataclass
class GateDecision:
    """What the gate decided and why (JSON-able via ``to_dict``).

    ``strategy`` is the promoted challenger (None on reject); ``best`` the challenger with
    the best primary metric, promoted or not.
    """

    accept: bool
    reasons: list[str]
    challengers: dict[str, dict[str, float]]
    incumbent: dict[str, float] | None
    popularity: dict[str, float]
    tolerance: float
    strategy: str | None = None
    best: str | None = None
    metric: str = PRIMARY
    extra: dict = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return "promote" if self.accept else "reject"

    @property
    def candidate(self) -> dict[str, float] | None:
        """The scores of the promoted challenger (of the best one on reject)."""
        name = self.strategy or self.best
        return self.challengers.get(name) if name else None

    def to_dict(self) -> dict:
        return {**asdict(self), "decision": self.decision}


def _finite(values: dict[str, float] | None) -> bool:
    return values is not None and all(
        isinstance(values.get(k), int | float) and math.isfinite(values[k]) for k in CHECKED)


def decide(challengers: dict[str, dict[str, float]], incumbent: dict[str, float] | None,
           popularity: dict[str, float], tolerance: float = 0.05,
           metric: str = PRIMARY,
           vs_incumbent: dict[str, list[float]] | None = None) -> GateDecision:
    """Apply the promotion rule to every challenger and pick the best eligible one.
    ``tolerance`` is relative: 0.05 allows 5% below the incumbent. ``vs_incumbent`` maps a
    challenger to the [low, high] bootstrap interval of its metric over the incumbent's."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    if not challengers:
        raise ValueError("the gate needs at least one challenger")
    reasons, problems = [], []
    if not _finite(popularity):
        problems.append(f"popularity metrics are not all finite: {popularity}")
    if incumbent is not None and not _finite(incumbent):
        problems.append(f"incumbent metrics are not all finite: {incumbent}")
    eligible = {}
    finite = {n: s for n, s in challengers.items() if _finite(s)}
    for name, scores in challengers.items():
        if name not in finite:
            reasons.append(f"{name}: metrics are not all finite: {scores}")
            continue
        if problems:
            continue
        c, p = scores[metric], popularity[metric]
        why = []
        if c <= p:
            why.append(f"{metric} {c:.4f} does not beat popularity {p:.4f}")
        ci = (vs_incumbent or {}).get(name)
        if ci is not None and not all(isinstance(x, int | float) and math.isfinite(x)
                                      for x in ci):
            ci = None  # no usable interval (e.g. no common users): compare point estimates
        if incumbent is not None and ci is not None:
            if ci[1] < 1 - tolerance:
                why.append(f"{metric} {c:.4f} is worse than the incumbent's "
                           f"{incumbent[metric]:.4f} beyond {tolerance:.0%}: the 95% interval "
                           f"of the ratio, [{ci[0]:.2f}, {ci[1]:.2f}], lies below "
                           f"{1 - tolerance:.2f}")
        elif incumbent is not None:
            floor = incumbent[metric] * (1 - tolerance)
            if c < floor:
                why.append(f"{metric} {c:.4f} is below the incumbent's {incumbent[metric]:.4f} "
                           f"minus {tolerance:.0%} ({floor:.4f})")
        if why:
            reasons.append(f"{name}: " + "; ".join(why))
        else:
            eligible[name] = c
            reasons.append(f"{name}: {metric} {c:.4f} beats popularity {p:.4f}" + (
                "" if incumbent is None else
                f" and is not shown worse than the incumbent's {incumbent[metric]:.4f} "
                f"beyond {tolerance:.0%} (ratio 95% interval [{ci[0]:.2f}, {ci[1]:.2f}])"
                if ci is not None else
                f" and is within {tolerance:.0%} of the incumbent {incumbent[metric]:.4f}"))
    best = max(finite, key=lambda n: finite[n][metric]) if finite else None
    chosen = max(eligible, key=eligible.get) if eligible else None
    head = ([f"promote {chosen}: the best eligible challenger"] if chosen else
            ["reject: no challenger is eligible; the incumbent keeps serving"])
    return GateDecision(chosen is not None, head + problems + reasons, dict(challengers),
                        incumbent, popularity, tolerance, chosen, best, metric)
