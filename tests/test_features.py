"""Feature aggregates (pure pandas) and the Feast workflow end to end, on temporary folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smlrec import features as F

# dask (inside Feast's file offline store) warns about a pandas deprecation of its own.
pytestmark = pytest.mark.filterwarnings("ignore:Downcasting object dtype:FutureWarning")

REPO = Path(__file__).resolve().parents[1] / "feature_repo"
P1 = pd.Timestamp("2024-01-01", tz="UTC")  # period 1: [P1, P2)
P2 = P1 + pd.Timedelta(days=7)  # period 2: [P2, P3)
P3 = P2 + pd.Timedelta(days=7)
US = pd.Timedelta(1, "us")


def interactions(rows: list[tuple[str, str, float]], start: pd.Timestamp) -> pd.DataFrame:
    """A canonical frame from (user, item, hours after ``start``) triples."""
    return pd.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "timestamp": [start + pd.Timedelta(hours=h) for _, _, h in rows],
        }
    )


# Period 1: u1 rates i1 then i2; u2 rates i1. Period 2: u1 rates i3; u3 (new) rates i3, i2;
# u2 rates i3.
PERIOD1 = interactions([("u1", "i1", 1), ("u1", "i2", 2), ("u2", "i1", 3)], P1)
PERIOD2 = interactions([("u1", "i3", 1), ("u3", "i3", 2), ("u3", "i2", 3), ("u2", "i3", 4)], P2)
USERS = pd.DataFrame(
    {
        "user_id": ["u1", "u2", "u3"],
        "age": pd.array([24, 53, None], dtype="Int16"),
        "gender": ["M", "F", "M"],
        "occupation": ["technician", "other", "writer"],
        "zip_code": ["85711", "94043", "32067"],
    }
)
ITEMS = pd.DataFrame(
    {
        "item_id": ["i1", "i2", "i3"],
        "title": ["Toy Story", "GoldenEye", "Four Rooms"],
        "year": pd.array([1995, None, 1995], dtype="Int16"),
        "genres": ["Animation|Children's|Comedy", "Action|Adventure|Thriller", "Thriller"],
    }
)


# Pure pandas ----------------------------------------------------------------------------------


def test_feature_timestamp_is_just_before_the_period_end() -> None:
    assert F.feature_timestamp(P2) == P2 - US
    assert F.feature_timestamp("2024-01-08") == P2 - US  # naive is UTC


def test_user_activity_counts() -> None:
    frame = interactions([("1", "a", 1), ("1", "b", 2), ("1", "a", 5), ("2", "c", 3)], P1)
    out = F.user_activity(frame, P2)
    assert list(out.columns) == [
        "user_id",
        "event_timestamp",
        "n_interactions",
        "n_items",
        "last_seen",
    ]
    assert out["user_id"].tolist() == ["1", "2"]
    assert out["n_interactions"].tolist() == [3, 1]
    assert out["n_items"].tolist() == [2, 1]
    assert out["last_seen"].tolist() == [P1 + pd.Timedelta(hours=5), P1 + pd.Timedelta(hours=3)]
    assert (out["event_timestamp"] == P2 - US).all()
    assert str(out["event_timestamp"].dtype) == "datetime64[ns, UTC]"


def test_ids_stay_strings() -> None:
    frame = interactions([("1", "10", 1)], P1).astype({"user_id": int, "item_id": int})
    assert F.user_activity(frame, P2)["user_id"].tolist() == ["1"]
    assert F.item_popularity(frame, P2)["item_id"].tolist() == ["10"]


def test_recent_items_newest_first_across_history() -> None:
    history = interactions([("u1", "old1", 1), ("u1", "old2", 2), ("u9", "x", 3)], P1)
    period = interactions([("u1", "new1", 1), ("u1", "old1", 2), ("u2", "a", 1)], P2)
    out = F.recent_items(period, P3, history=history).set_index("user_id")
    # old1 was seen again in period 2, so it counts once, at its latest time
    assert out.loc["u1", "recent_items"] == "old1,new1,old2"
    assert out.loc["u2", "recent_items"] == "a"
    assert "u9" not in out.index  # not active in the period: its list did not change
    assert (out["event_timestamp"] == P3 - US).all()
    short = F.recent_items(period, P3, history=history, k=2).set_index("user_id")
    assert F.split_ids(short.loc["u1", "recent_items"]) == ["old1", "new1"]
    assert F.recent_items(period, P3).set_index("user_id").loc["u1", "recent_items"] == "old1,new1"


def test_recent_items_ties_keep_input_order() -> None:
    frame = interactions([("u", "first", 1), ("u", "second", 1)], P1)
    assert F.recent_items(frame, P2)["recent_items"].tolist() == ["second,first"]


def test_item_popularity_counts_share_rank() -> None:
    frame = interactions(
        [("1", "b", 1), ("2", "b", 1), ("3", "a", 1), ("1", "a", 2), ("2", "c", 2)], P1
    )
    out = F.item_popularity(frame, P2)
    assert out["item_id"].tolist() == ["a", "b", "c"]  # a and b tie at 2: by id
    assert out["n_interactions"].tolist() == [2, 2, 1]
    np.testing.assert_allclose(out["share"], [0.4, 0.4, 0.2])
    assert out["rank"].tolist() == [1, 2, 3]
    top = F.top_items(frame, P2, k=2)
    assert top.to_dict("records") == [
        {"segment_id": "all", "event_timestamp": P2 - US, "top_items": "a,b", "n_items": 2}
    ]


def test_rows_at_or_after_the_period_end_are_refused() -> None:
    late = interactions([("1", "a", 0)], P2)
    with pytest.raises(ValueError, match="at or after the period end"):
        F.user_activity(late, P2)
    with pytest.raises(ValueError, match="at or after"):
        F.recent_items(PERIOD2, P2 + pd.Timedelta(hours=2), history=PERIOD1)


def test_side_tables() -> None:
    users = F.user_side(USERS)
    assert list(users.columns) == ["user_id", "event_timestamp", "age", "gender", "occupation"]
    assert users["age"].tolist()[:2] == [24, 53] and users["age"].isna().tolist()[2]
    assert (users["event_timestamp"] == F.SIDE_INFO_TIMESTAMP).all()
    items = F.item_side(ITEMS)
    assert list(items.columns) == ["item_id", "event_timestamp", "year", "genres"]
    assert str(items["year"].dtype) == "Int64" and items["year"].isna().tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="duplicate"):
        F.item_side(pd.concat([ITEMS, ITEMS]))


# Feast ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feast_store():
    """The adapter module (skips when the stack extra is not installed)."""
    pytest.importorskip("feast")
    from adapters import feast_store

    return feast_store


def test_render_config_defaults_and_cluster(feast_store, tmp_path: Path) -> None:
    import yaml

    local = yaml.safe_load(feast_store.render_config(str(tmp_path), {}))
    assert local["registry"] == {
        "registry_type": "file",
        "path": f"{tmp_path}/registry.db",
        "cache_ttl_seconds": 60,
    }
    assert local["online_store"] == {"type": "sqlite", "path": f"{tmp_path}/online_store.db"}
    assert local["offline_store"] == {"type": "file"} and local["project"] == "smlrec"
    cluster = {
        "FEAST_REGISTRY": "postgresql+psycopg://feast:pw@postgres:5432/feast",
        "FEAST_ONLINE_STORE_TYPE": "redis",
        "FEAST_REDIS": "redis:6379,db=0",
    }
    remote = yaml.safe_load(feast_store.render_config("s3://bucket/features", cluster))
    assert remote["registry"]["registry_type"] == "sql"
    assert remote["registry"]["path"] == cluster["FEAST_REGISTRY"]
    assert remote["online_store"] == {"type": "redis", "connection_string": "redis:6379,db=0"}
    with pytest.raises(ValueError, match="sqlite or redis"):
        feast_store.render_config("x", {"FEAST_ONLINE_STORE_TYPE": "dynamodb"})


def test_definitions_match_the_written_schemas(feast_store, tmp_path: Path) -> None:
    from feast import FeatureService, FeatureView

    objects = feast_store.load_definitions(REPO, str(tmp_path))
    views = {o.name: o for o in objects if isinstance(o, FeatureView)}
    assert set(views) == {*feast_store.SCHEMAS, "user_fresh"}
    pushed = views.pop("user_fresh")  # written per event by the API, through a push source
    assert type(pushed.stream_source).__name__ == "PushSource"
    assert pushed.stream_source.name == "user_fresh_push"
    assert [f.name for f in pushed.features] == ["embedding", "model_version", "recent_items",
                                                 "events"]
    for name, view in views.items():
        assert view.description and view.ttl and view.ttl.total_seconds() > 0
        assert view.batch_source.path == f"{tmp_path}/{name}.parquet"  # SMLREC_FEATURE_DATA
        written = [c for c in feast_store.SCHEMAS[name].names if c != F.EVENT_TS]
        assert [view.join_keys[0], *(f.name for f in view.features)] == written
    services = {o.name for o in objects if isinstance(o, FeatureService)}
    assert {"model_v1", "serving_v1"} <= services
    assert not (tmp_path / "registry.db").exists()  # loading definitions writes nothing


def test_workflow(feast_store, tmp_path: Path) -> None:
    """Write two periods, apply, historical retrieval, materialize, online read."""
    repo_before = sorted(p.name for p in REPO.iterdir())
    store = feast_store.FeatureStoreAdapter(REPO, tmp_path / "features", env={})
    written = store.write_period("2024-01-01", PERIOD1, P2, users=USERS, items=ITEMS)
    assert written == {
        "user_activity": 2,
        "recent_items": 2,
        "item_popularity": 2,
        "top_items": 1,
        "user_side": 3,
        "item_side": 3,
    }
    store.write_period("2024-01-08", PERIOD2, P3, history=PERIOD1)
    assert (tmp_path / "features/user_activity/period=2024-01-08.parquet").is_file()
    assert len(pd.read_parquet(tmp_path / "features/user_activity.parquet")) == 2 + 3
    store.write_period("2024-01-08", PERIOD2, P3, history=PERIOD1)  # a rerun replaces
    assert len(pd.read_parquet(tmp_path / "features/user_activity.parquet")) == 2 + 3
    assert not list((tmp_path / "features").rglob(".tmp-*"))

    names = store.apply()
    assert store.apply() == names  # idempotent
    assert {"Entity:user", "FeatureService:model_v1", "FeatureView:user_activity"} <= set(names)

    # Historical retrieval, point in time. Rows: u1 inside period 2 (sees period 1), u1 after
    # period 2 (sees period 2), u3 inside period 2 although its only features are from period
    # 2 (Feast would drop the row), an unknown user, and two rows sharing (user, timestamp).
    entity_df = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u3", "zz", "u2", "u2"],
            "item_id": ["i3", "i1", "i2", "i1", "i3", "i1"],
            "timestamp": [P2 + pd.Timedelta(hours=1), P3, P2 + pd.Timedelta(hours=3), P3]
            + [P2 + pd.Timedelta(hours=4)] * 2,
            "label": [1, 0, 1, 0, 1, 0],
        }
    )
    frame = store.training_frame(entity_df, features="model_v1")
    assert len(frame) == len(entity_df)
    assert frame["label"].tolist() == entity_df["label"].tolist()  # order and columns kept
    n_user = frame["user_activity__n_interactions"]
    assert n_user[0] == 2  # period 1's count, not period 2's (1)
    assert n_user[1] == 1  # after period 2 ended: period 2's count
    assert np.isnan(n_user[2]) and np.isnan(n_user[3])  # no features yet / unknown: kept, NaN
    assert n_user[4] == n_user[5] == 1  # duplicate (user, timestamp) rows both answered
    assert frame["user_activity__last_seen"][0] == P1 + pd.Timedelta(hours=2)
    n_item = frame["item_popularity__n_interactions"]
    assert np.isnan(n_item[0]) and np.isnan(n_item[4])  # i3 is first known after period 2
    assert [n_item[1], n_item[2], n_item[3], n_item[5]] == [2, 1, 2, 2]  # period 1's counts
    filled = store.training_frame(entity_df, features=["user_activity:n_items"], fill_value=0)
    assert filled["user_activity__n_items"].tolist() == [2, 1, 0, 0, 1, 1]

    # Online store: the first run loads everything up to its end; then incrementally.
    with pytest.raises(ValueError, match="future"):
        store.materialize(pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=1))
    first = store.materialize(P2)
    assert set(first) == set(feast_store.SCHEMAS)
    assert store.popular_items(5) == ["i1", "i2"]  # period 1 only so far
    second = store.materialize(P3)
    assert all(window == (P2.to_pydatetime(), P3.to_pydatetime()) for window in second.values())
    assert store.materialize(P3) == {}  # nothing new

    online = store.online_features(user_ids=["u1", "u3", "zz"], item_ids=["i1", "i3"])
    users = online["user_id"].set_index("user_id")
    assert users.loc["u1", "recent_items__recent_items"] == "i3,i2,i1"
    assert users.loc["u3", "recent_items__recent_items"] == "i2,i3"
    assert users.loc["zz", "recent_items__recent_items"] is None
    items = online["item_id"].set_index("item_id")
    assert items.loc["i3", "item_popularity__n_interactions"] == 3  # period 2
    assert items.loc["i3", "item_popularity__rank"] == 1
    side = store.online_features(user_ids=["u1"], features=["user_side:age", "user_side:gender"])
    assert side["user_id"].iloc[0].to_dict() == {
        "user_id": "u1",
        "user_side__age": 24,
        "user_side__gender": "M",
    }
    assert store.popular_items(1) == ["i3"]
    assert store.popular_items(10) == ["i3", "i2"]

    assert sorted(p.name for p in REPO.iterdir()) == repo_before  # nothing written there


def test_sql_registry_by_configuration(feast_store, tmp_path: Path) -> None:
    env = {"FEAST_REGISTRY": f"sqlite:///{tmp_path}/registry.sqlite"}
    store = feast_store.FeatureStoreAdapter(REPO, tmp_path, env=env)
    assert store.config.registry.registry_type == "sql"
    store.apply()
    again = feast_store.FeatureStoreAdapter(REPO, tmp_path, env=env)
    assert {s.name for s in again.store.list_feature_services()} == {"model_v1", "serving_v1"}
