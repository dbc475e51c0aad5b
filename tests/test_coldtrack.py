"""The cold-start track's tasks and metrics (known answers on hand-made periods)."""

from __future__ import annotations

import numpy as np
import torch

from smlrec import coldtrack as ct


def test_cold_tasks_take_the_first_known_items_of_new_users_only():
    # rows: user 0 is returning (row < 1); users 1 and 2 are new; items >= 5 are new items
    users = np.array([1, 0, 1, 1, 2, 1, 1, 2, 1])
    items = np.array([3, 1, 3, 6, 4, 0, 2, 1, 4])
    tasks = ct.cold_tasks(users, items, n_users_before=1, n_items_before=5, n_support=1,
                          need=3)
    # user 1's distinct known items in time order: 3, 0, 2, 4 (6 is new, 3 repeated)
    assert [t.user for t in tasks] == [1]  # user 2 has only 2 known items
    assert tasks[0].support.tolist() == [3] and tasks[0].query.tolist() == [0, 2, 4]


def test_returning_tasks_predict_new_items_from_recent_history():
    history = {0: np.array([1, 2, 3, 2]), 1: np.array([4])}
    users = np.array([0, 0, 0, 1, 2])
    items = np.array([2, 0, 5, 4, 1])
    tasks = ct.returning_tasks(users, items, history, n_users_before=2, n_items_before=5,
                               recent=2)
    # user 0: 2 is seen before, 5 is a new item -> query [0]; recent distinct = 3, 2
    # user 1: only item 4 again -> no task; user 2 is new -> not returning
    assert [t.user for t in tasks] == [0]
    assert tasks[0].query.tolist() == [0] and tasks[0].support.tolist() == [3, 2]


def test_training_tasks_split_new_users_and_keep_returning_queries_new():
    history = {0: np.array([1])}
    users = np.array([0, 0, 1, 1, 1])
    items = np.array([1, 2, 5, 6, 7])
    tasks = ct.training_tasks(users, items, history, np.random.default_rng(0), max_support=5,
                              recent=20)
    by_user = {t.user: t for t in tasks}
    assert by_user[0].support.tolist() == [1] and by_user[0].query.tolist() == [2]
    t1 = by_user[1]
    assert 1 <= len(t1.support) <= 2 and len(t1.support) + len(t1.query) == 3
    assert not set(t1.support) & set(t1.query)


def test_task_metrics_rank_each_task_with_its_own_exclusions():
    tasks = [ct.UserTask(0, np.array([0]), np.array([1])),
             ct.UserTask(1, np.array([1]), np.array([2]))]
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0],    # item 0 excluded -> item 1 first: hit
                           [0.0, 9.0, 1.0, 5.0]])   # item 1 excluded -> 3 then 2: rank 1
    m = ct.task_metrics(scores, tasks, [t.support for t in tasks])
    assert m["n_users"] == 2
    np.testing.assert_allclose(m["per_user"]["ndcg@20"], [1.0, 1 / np.log2(3)], rtol=1e-6)
    assert m["recall@20"] == 1.0


def test_the_cold_track_command_scores_every_model_and_the_oracle_bounds_them(tmp_path):
    """`smlrec cold-track` end to end on a small stream with side tables (two seeds, run
    side by side in worker processes where the machine has two cores)."""
    import json

    from typer.testing import CliRunner

    from smlrec.cli import app
    from smlrec.data.synthetic import write_synthetic

    root = tmp_path / "data"
    write_synthetic(str(root), n_users=400, n_items=60, n_periods=8,
                    interactions_per_period=1200, returning_share=0.5, drift=0.1, seed=2)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["cold-track", "--data", str(root), "--out", str(out),
                                 "--seeds", "0,1", "--split", "2,3,1,2", "--no-progress",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "cold.json").read_text())
    for track in ("cold@1", "cold@3", "cold@5", "returning"):
        models = summary["tracks"][track]
        assert set(models) == {"mf", "two_tower", "melu", "pop", "selector", "oracle"}
        assert all(0 <= m["ndcg@20"] <= 1 for m in models.values())
    results = __import__("pandas").read_csv(out / "per_period.csv")
    # the oracle picks each user's best base model: never below any raw base model
    raw = results[results["variant"].isin(['{"blend": 0.0, "config": 0}', "{}"])]
    for (track, t), g in raw.groupby(["track", "t"]):
        oracle = g[g["model"] == "oracle"]["ndcg@20"].iloc[0]
        bases = g[g["model"].isin(["mf", "two_tower", "melu", "pop"])]["ndcg@20"]
        assert oracle >= bases.max() - 1e-9, (track, t)
    weights = results[results["model"] == "selector"][[f"weight_{b}" for b in
                                                       ("mf", "two_tower", "melu", "pop")]]
    assert abs(weights.sum(axis=1) - 1).max() < 1e-5
