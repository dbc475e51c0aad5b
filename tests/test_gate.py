"""The promotion rule, case by case: one challenger, several, none eligible."""

import math

import pytest

from smlrec.gate import decide


def m(ndcg, recall=0.1):
    return {"ndcg@20": ndcg, "recall@20": recall}


def one(scores):
    return {"sml": scores}


def test_first_candidate_must_beat_popularity():
    assert decide(one(m(0.2)), None, m(0.1)).accept
    d = decide(one(m(0.1)), None, m(0.1))
    assert not d.accept and any("does not beat popularity" in r for r in d.reasons)
    assert d.strategy is None and d.best == "sml"


def test_candidate_within_tolerance_of_incumbent_is_promoted():
    assert decide(one(m(0.19)), m(0.2), m(0.1), tolerance=0.05).accept
    d = decide(one(m(0.18)), m(0.2), m(0.1), tolerance=0.05)
    assert not d.accept and d.decision == "reject"
    assert any("below the incumbent" in r for r in d.reasons)
    assert decide(one(m(0.18)), m(0.2), m(0.1), tolerance=0.2).accept


def test_the_gate_picks_the_best_of_several_challengers():
    d = decide({"sml": m(0.15), "window": m(0.21), "full": m(0.18)}, m(0.19), m(0.12))
    assert d.accept and d.strategy == "window" and d.best == "window"
    assert d.candidate == m(0.21)
    assert d.reasons[0].startswith("promote window")
    # The best challenger is not eligible (below the incumbent): the next eligible one wins.
    d = decide({"sml": m(0.195), "window": m(0.30, recall=math.nan)}, m(0.2), m(0.1))
    assert d.accept and d.strategy == "sml"


def test_the_gate_refuses_every_challenger_when_none_beats_the_floor():
    d = decide({"sml": m(0.10), "window": m(0.12)}, None, m(0.13))
    assert not d.accept and d.strategy is None and d.best == "window"
    assert sum("does not beat popularity" in r for r in d.reasons) == 2
    d = decide({"sml": m(0.14), "window": m(0.15)}, m(0.2), m(0.13))
    assert not d.accept  # above the floor, but too far below the incumbent
    assert "the incumbent keeps serving" in d.reasons[0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_non_finite_numbers_are_rejected(bad):
    d = decide(one({"ndcg@20": bad, "recall@20": 0.1}), m(0.1), m(0.05))
    assert not d.accept and any("not all finite" in r for r in d.reasons)
    d = decide(one(m(0.3)), m(0.1), {"ndcg@20": bad, "recall@20": 0.1})
    assert not d.accept and any("popularity metrics are not all finite" in r for r in d.reasons)


def test_tolerance_is_checked_and_decision_serialises():
    with pytest.raises(ValueError, match="tolerance"):
        decide(one(m(0.2)), None, m(0.1), tolerance=1.5)
    with pytest.raises(ValueError, match="challenger"):
        decide({}, None, m(0.1))
    d = decide(one(m(0.2)), m(0.2), m(0.1)).to_dict()
    assert d["decision"] == "promote" and d["incumbent"] == m(0.2) and d["strategy"] == "sml"


def test_with_an_interval_only_a_challenger_shown_worse_than_the_incumbent_is_refused():
    # 0.15 vs 0.20 is 25% below, but the interval reaches 1.02: not shown worse.
    d = decide(one(m(0.15)), m(0.20), m(0.10), tolerance=0.05, vs_incumbent={"sml": [0.6, 1.02]})
    assert d.accept and "not shown worse" in d.reasons[-1]
    # The whole interval below 0.95: refused, and the reason quotes it.
    d = decide(one(m(0.19)), m(0.20), m(0.10), tolerance=0.05, vs_incumbent={"sml": [0.8, 0.94]})
    assert not d.accept and "[0.80, 0.94]" in d.reasons[-1]
    # The floor is still a point comparison; an unusable interval falls back to points.
    assert not decide(one(m(0.09)), m(0.20), m(0.10), vs_incumbent={"sml": [0.1, 2.0]}).accept
    assert not decide(one(m(0.15)), m(0.20), m(0.10),
                      vs_incumbent={"sml": [math.nan, math.nan]}).accept
