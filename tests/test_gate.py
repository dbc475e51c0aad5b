"""The promotion rule, case by case."""

import math

import pytest

from smlrec.gate import decide


def m(ndcg, recall=0.1):
    return {"ndcg@20": ndcg, "recall@20": recall}


def test_first_candidate_must_beat_popularity():
    assert decide(m(0.2), None, m(0.1)).accept
    d = decide(m(0.1), None, m(0.1))
    assert not d.accept and "does not beat popularity" in d.reasons[0]


def test_candidate_within_tolerance_of_incumbent_is_promoted():
    assert decide(m(0.19), m(0.2), m(0.1), tolerance=0.05).accept
    d = decide(m(0.18), m(0.2), m(0.1), tolerance=0.05)
    assert not d.accept and d.decision == "reject" and "below the incumbent" in d.reasons[0]
    assert decide(m(0.18), m(0.2), m(0.1), tolerance=0.2).accept


@pytest.mark.parametrize("bad", [math.nan, math.inf, None])
def test_non_finite_numbers_are_rejected(bad):
    d = decide({"ndcg@20": bad, "recall@20": 0.1}, m(0.1), m(0.05))
    assert not d.accept and "not all finite" in d.reasons[0]


def test_tolerance_is_checked_and_decision_serialises():
    with pytest.raises(ValueError, match="tolerance"):
        decide(m(0.2), None, m(0.1), tolerance=1.5)
    d = decide(m(0.2), m(0.2), m(0.1)).to_dict()
    assert d["decision"] == "promote" and d["incumbent"] == m(0.2)
