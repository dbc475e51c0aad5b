"""The API's per-event updater (serving/fresh.py) in process: states, versions, batching."""

from __future__ import annotations

import time

import torch

from serving.fresh import FreshUpdater, UserState, UserStates, merge_recent
from serving.model import ModelInfo, ServedModel
from smlrec.feedback import Event
from smlrec.online import UserUpdate, update_user
from smlrec.vocab import Vocab

USERS = [f"u{i}" for i in range(5)]
ITEMS = [f"i{i}" for i in range(30)]


def _model(version: str, seed: int = 0) -> ServedModel:
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(5, 6, generator=g)
    user[:, -1] = 1.0  # the blend column of a served table
    return ServedModel(user, torch.randn(30, 6, generator=g),
                       Vocab(USERS), Vocab(ITEMS), ModelInfo("production", version, "p"),
                       prior_column=True)


def _updater(model: ServedModel, rule: UserUpdate | None = None) -> FreshUpdater:
    up = FreshUpdater(rule or UserUpdate(), UserStates(None), lambda _: model)
    up.close()  # apply() is called directly here
    return up


def _event(user: str, item: str, rating: float | None = None) -> Event:
    return Event(user, item, time.time(), rating)


def test_merge_recent_keeps_order_without_repeats() -> None:
    assert merge_recent(["c", "b"], ["b", "a"], ["z"], limit=3) == ("c", "b", "a")
    assert merge_recent([], [], limit=5) == ()


def test_an_event_moves_a_known_user_as_update_user_does() -> None:
    model = _model("v1")
    up = _updater(model)
    state = up.apply([_event("u1", "i7")])["u1"]
    assert state.version == "v1" and state.recent == ("i7",) and state.events == 1
    row = model.user_vector(1)
    want = update_user(row, model.item, [7], up.rule, anchor=row, prior_column=True)
    torch.testing.assert_close(state.vector, want)
    assert state.vector[-1] == 1.0  # the blend column is never moved
    assert state.vector @ model.item[7] > row @ model.item[7]


def test_a_second_event_starts_from_the_moved_vector() -> None:
    model = _model("v1")
    up = _updater(model)
    first = up.apply([_event("u1", "i7")])["u1"]
    second = up.apply([_event("u1", "i8")])["u1"]
    row = model.user_vector(1)
    want = update_user(first.vector, model.item, [8], up.rule, anchor=row, recent=[7],
                       prior_column=True)
    torch.testing.assert_close(second.vector, want)
    assert second.recent == ("i8", "i7") and second.events == 2


def test_batched_users_get_what_one_at_a_time_gives() -> None:
    model = _model("v1")
    together = _updater(model).apply([_event("u1", "i3"), _event("u2", "i4"),
                                      _event("new", "i5"), _event("u1", "i6")])
    alone = _updater(model)
    for user, items in (("u1", ["i3", "i6"]), ("u2", ["i4"]), ("new", ["i5"])):
        state = alone.apply([_event(user, v) for v in items])[user]
        torch.testing.assert_close(together[user].vector, state.vector)


def test_a_new_user_starts_from_their_items_and_low_ratings_do_not_move_anyone() -> None:
    model = _model("v1")
    up = _updater(model, UserUpdate(method="mean"))
    state = up.apply([_event("new", "i2")])["new"]
    want = model.item[2].clone()
    want[-1] = 1.0
    torch.testing.assert_close(state.vector, want)  # mean rule: the start vector
    assert up.submit([_event("u1", "i1", rating=2.0), _event("u1", "i1", rating=4.5),
                      _event("u1", "i1")]) == 2


def test_a_vector_is_only_valid_for_its_model_version() -> None:
    model, newer = _model("v1"), _model("v2", seed=1)
    state = _updater(model).apply([_event("u1", "i7")])["u1"]
    assert state.vector_for(model) is not None and state.vector_for(newer) is None
    assert UserState().vector_for(model) is None


def test_unknown_items_are_remembered_but_move_nothing() -> None:
    model = _model("v1")
    state = _updater(model).apply([_event("u1", "brand-new")])["u1"]
    assert state.recent == ("brand-new",)
    torch.testing.assert_close(state.vector, model.user_vector(1))
    off = _updater(model, UserUpdate(method="none")).apply([_event("u1", "i7")])["u1"]
    assert off.vector is None and off.recent == ("i7",)


def test_a_full_backlog_skips_updates_not_events() -> None:
    up = FreshUpdater(UserUpdate(), UserStates(None), lambda _: None, max_queued=3)
    up.close()  # nothing drains the queue
    assert up.submit([_event("u1", "i1"), _event("u1", "i2")]) == 2
    assert up.submit([_event("u1", "i3"), _event("u1", "i4")]) == 0
    assert up.describe()["queued"] == 2 and up.describe()["skipped_backlog_full"] == 2


def test_the_service_settings_for_feedback() -> None:
    import pytest
    from pydantic import ValidationError

    from serving.service import ServingConfig

    cfg = ServingConfig.from_env({"SMLREC_DATA_URI": "/d/ml", "SMLREC_RATING_RANGE": "1,10"})
    assert cfg.log_root() == "/d/ml/feedback" and cfg.rating_range == (1.0, 10.0)
    assert cfg.log_period_spec() == "1D"  # no data store there
    assert cfg.update_rule({"method": "mean", "decay": 0.5}).decay == 0.5  # the packaged rule
    assert ServingConfig.from_env({"SMLREC_USER_UPDATE": "none"}).update_rule().method == "none"
    assert ServingConfig.from_env(
        {"SMLREC_USER_UPDATE": '{"method": "grad", "steps": 2}'}).update_rule().steps == 2
    with pytest.raises(ValidationError, match="low,high"):
        ServingConfig.from_env({"SMLREC_RATING_RANGE": "5"})
    import os

    auto = ServingConfig.from_env({"SMLREC_WORKERS": "auto", "SMLREC_FEAST_TTL": "2.5"})
    assert auto.workers == min(8, len(os.sched_getaffinity(0))) and auto.feast_ttl == 2.5
    assert ServingConfig.from_env({}).workers == 1 and ServingConfig.from_env({}).feast_ttl == 30
    with pytest.raises(ValidationError):
        ServingConfig.from_env({"SMLREC_WORKERS": "many"})
