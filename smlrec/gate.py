"""The canary gate: "test on the next period" decides whether a candidate is promoted.

Yesterday's candidate W_{t-1}, the incumbent (production) model and a popularity baseline
are all evaluated on the new period's data D_t. The candidate is accepted when every
number is finite, it is not worse than the incumbent by more than ``tolerance`` (relative)
on the primary metric, and it beats popularity. With no incumbent it must beat popularity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PRIMARY = "ndcg@20"
CHECKED = ("ndcg@20", "recall@20")


@dataclass
class GateDecision:
    """What the gate decided and why (JSON-able via ``to_dict``)."""

    accept: bool
    reasons: list[str]
    candidate: dict[str, float]
    incumbent: dict[str, float] | None
    popularity: dict[str, float]
    tolerance: float
    metric: str = PRIMARY
    extra: dict = field(default_factory=dict)

    @property
    def decision(self) -> str:
        return "promote" if self.accept else "reject"

    def to_dict(self) -> dict:
        return {**asdict(self), "decision": self.decision}


def _finite(values: dict[str, float] | None) -> bool:
    return values is not None and all(
        isinstance(values.get(k), int | float) and math.isfinite(values[k]) for k in CHECKED)


def decide(candidate: dict[str, float], incumbent: dict[str, float] | None,
           popularity: dict[str, float], tolerance: float = 0.05,
           metric: str = PRIMARY) -> GateDecision:
    """Apply the promotion rule. ``tolerance`` is relative: 0.05 allows 5% below the incumbent."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    reasons = []
    if not _finite(candidate):
        reasons.append(f"candidate metrics are not all finite: {candidate}")
    if not _finite(popularity):
        reasons.append(f"popularity metrics are not all finite: {popularity}")
    if incumbent is not None and not _finite(incumbent):
        reasons.append(f"incumbent metrics are not all finite: {incumbent}")
    if not reasons:
        c, p = candidate[metric], popularity[metric]
        if c <= p:
            reasons.append(f"candidate {metric} {c:.4f} does not beat popularity {p:.4f}")
        if incumbent is not None:
            floor = incumbent[metric] * (1 - tolerance)
            if c < floor:
                reasons.append(f"candidate {metric} {c:.4f} is below the incumbent's "
                               f"{incumbent[metric]:.4f} minus {tolerance:.0%} ({floor:.4f})")
    accept = not reasons
    if accept:
        reasons.append(f"candidate {metric} {candidate[metric]:.4f} beats popularity "
                       f"{popularity[metric]:.4f}" + (
                           "" if incumbent is None else
                           f" and is within {tolerance:.0%} of the incumbent "
                           f"{incumbent[metric]:.4f}"))
    return GateDecision(accept, reasons, candidate, incumbent, popularity, tolerance, metric)
