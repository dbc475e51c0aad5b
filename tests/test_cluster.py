"""The cluster configuration on real servers: S3, Redis, PostgreSQL, and the API over them.

moto's S3 server, Debian's redis-server and a throw-away PostgreSQL cluster run on
127.0.0.1 (``tests/services.py``). With the AWS_* variables pointing at the S3 server, a
small synthetic dataset goes to ``s3://<bucket>/data``; the bootstrap and one daily run go
through KFP's local runner (the code path of ``tests/test_pipeline.py``) with the state
store at ``s3://<bucket>/state``, Feast's Parquet sources at ``s3://<bucket>/state/features``,
the online store on Redis and the SQL registry on PostgreSQL. The checks read each server
with its own client (boto3, redis, psycopg), then a real ``bentoml serve`` follows the
state store on S3 and reads online features from Redis.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
from services import (  # noqa: F401 - session fixtures used by name
    S3,
    Postgres,
    Redis,
    postgres_server,
    redis_server,
    s3_server,
)

from benchmarks.serving import Server as BentoServer
from pipelines.local import run_bootstrap, run_daily
from smlrec.data.store import list_periods, read_period
from smlrec.data.synthetic import write_synthetic
from smlrec.registry import StateStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "smlrec-cluster"
DATA = f"s3://{BUCKET}/data"
STATE = f"s3://{BUCKET}/state"
FEATURES = f"{STATE}/features"
# The pipeline tests' run configuration with SML alone, against last period's popularity;
# on this stream its first candidate beats that floor clearly (NDCG@20 0.16 against 0.12).
CONFIG = """\
challengers:
- {method: sml, params: {outer_steps: 3, blend: 0.5}}
floor: {method: pop, params: {window: 1}}
sml: {theta_init: identity}
pretrain_periods: 3
pretrain_epochs: 10
"""
CLUSTER_VARIABLES = ("FEAST_", "AWS_", "SMLREC_FEATURE_STORE_YAML", "FSSPEC_S3_")


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` (dropping other cluster variables), then restore it:
    KFP's local runner hands the process environment to every task."""
    old = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(CLUSTER_VARIABLES)]:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


@dataclass
class Cluster:
    s3: S3
    redis: Redis
    postgres: Postgres
    env: dict[str, str]
    periods: list[str]
    result: dict
    bentoml_home: Path
    tmp: Path


@pytest.fixture(scope="module")
def cluster(s3_server: S3, redis_server: Redis, postgres_server: Postgres,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    env = {**s3_server.env, "FEAST_REGISTRY": postgres_server.url,
           "FEAST_ONLINE_STORE_TYPE": "redis", "FEAST_REDIS": redis_server.connection_string}
    (tmp / "config.yaml").write_text(CONFIG)
    with environ(env):
        s3_server.client().create_bucket(Bucket=BUCKET)
        write_synthetic(DATA, n_users=300, n_items=100, n_periods=5,
                        interactions_per_period=1500, returning_share=0.8, drift=0.1, seed=3,
                        popularity_skew=0.0)
        periods = list_periods(DATA)
        run_bootstrap(DATA, STATE, periods[3], str(tmp / "kfp-bootstrap"),
                      config_uri=str(tmp / "config.yaml"))
        # Feast's data goes to the state store's features/ (FEATURES) by default.
        result = run_daily(periods[4], DATA, STATE, str(tmp / "kfp-daily"),
                           bentoml_home=str(tmp / "bento"))
    yield Cluster(s3_server, redis_server, postgres_server, env, periods, result,
                  tmp / "bento", tmp)


def _keys(cluster: Cluster, prefix: str) -> list[str]:
    pages = cluster.s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_the_daily_run_decided_and_its_state_is_on_s3(cluster: Cluster) -> None:
    p = cluster.periods
    r = cluster.result
    assert r["decision"] == "promote" and not r["skipped"], r
    keys = set(_keys(cluster, ""))
    assert f"data/interactions/period={p[4]}/part-0.parquet" in keys
    assert "data/dataset.json" in keys
    for period in (p[3], p[4]):
        assert f"state/periods/{period}/manifest.json" in keys
    assert {"state/pointers/production.json", "state/pointers/candidate.json",
            "state/decisions.jsonl", "state/config.yaml"} <= keys
    assert "state/LOCK" not in keys  # released
    assert not [k for k in keys if k.rpartition("/")[2].startswith(".tmp-")]
    for view in ("user_activity", "recent_items", "item_popularity", "top_items"):
        assert f"state/features/{view}.parquet" in keys
        assert f"state/features/{view}/period={p[4]}.parquet" in keys
    assert not [k for k in keys if k.endswith(("registry.db", "online_store.db"))]
    # The state store's own reader, through s3fs, sees what the run's tasks wrote.
    with environ(cluster.env):
        store = StateStore(STATE)
        assert store.get_pointer("production") == p[3]
        assert store.get_pointer("candidate") == p[4]
        assert [d["decision"] for d in store.decisions()] == ["promote"]
        assert store.periods() == [p[3], p[4]] and store.check() == []


def test_feast_online_store_is_redis_and_registry_is_postgres(cluster: Cluster) -> None:
    client = cluster.redis.client()
    assert client.dbsize() > 0
    keys = client.keys("*")
    assert any(b"smlrec" in k for k in keys), keys[:5]  # Feast's keys name the project
    with psycopg.connect(cluster.postgres.conninfo) as conn:
        tables = {t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema='public'")}
        assert {"feature_views", "entities", "data_sources", "feature_services"} <= tables
        views = {v for (v,) in conn.execute("SELECT feature_view_name FROM feature_views")}
        services = {s for (s,) in conn.execute(
            "SELECT feature_service_name FROM feature_services")}
    assert {"user_activity", "recent_items", "item_popularity", "top_items"} <= views
    assert {"model_v1", "serving_v1"} <= services
    # The adapter reads them back: online rows from Redis, the registry from PostgreSQL.
    from adapters.feast_store import FeatureStoreAdapter

    with environ(cluster.env):
        feast = FeatureStoreAdapter(ROOT / "feature_repo", FEATURES)
        assert feast.config.online_store.type == "redis"
        assert feast.config.registry.registry_type == "sql"
        user = str(read_period(DATA, cluster.periods[4])["user_id"].iloc[0])
        online = feast.online_features(user_ids=[user])["user_id"]
        assert online["recent_items__recent_items"].iloc[0], online
        assert len(feast.popular_items(5)) == 5
        # A source as the registry holds it, read through pyarrow's S3 filesystem (Feast's
        # schema reads and offline writes): it carries the S3 endpoint.
        source = feast.store.get_feature_view("top_items").batch_source
        assert source.s3_endpoint_override == cluster.s3.url
        assert "top_items" in dict(source.get_table_column_names_and_types(feast.config))


def test_the_api_serves_from_the_s3_state_store_with_redis_features(cluster: Cluster) -> None:
    p = cluster.periods
    with environ(cluster.env):
        _, _, users, _ = StateStore(STATE).load_period(p[3])  # the production model's
        latest = [str(u) for u in read_period(DATA, p[4], ["user_id"])["user_id"]]
    known = sorted(users.ids)[0]
    newcomer = next(u for u in latest if u not in set(users.ids))  # in Redis, not the model
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
    env.update(cluster.env, SMLREC_MODEL_SOURCE=STATE, SMLREC_CANARY_SHARE="0",
               SMLREC_RELOAD_SECONDS="0", SMLREC_FEATURE_REPO=str(ROOT / "feature_repo"),
               SMLREC_FEATURE_DATA=FEATURES, SMLREC_THREADS="1", SMLREC_DEVICE="cpu",
               PYTHONPATH=str(ROOT))
    server = BentoServer(cluster.bentoml_home, workers=1, log_path=cluster.tmp / "serve.log",
                         env=env)
    try:
        server.start(timeout=120)
        meta = httpx.post(f"{server.url}/metadata", json={}, timeout=30)
        assert meta.status_code == 200, meta.text
        production = meta.json()["production"]
        assert production["version"].startswith(f"state:{p[3]}"), production

        def recommend(user: str) -> dict:
            r = httpx.post(f"{server.url}/recommend", json={"user_id": user, "k": 5},
                           timeout=30)
            assert r.status_code == 200, f"{r.text}\n{server.log_tail()}"
            return r.json()

        got = recommend(known)
        assert got["path"] == "user" and len(got["items"]) == 5, got
        assert got["model"]["stage"] == "production" and got["model"]["period"] == p[3], got
        got = recommend(newcomer)
        assert got["path"] == "feast_recent_items" and len(got["items"]) == 5, got
        got = recommend("nobody-knows-me")
        assert got["path"] == "popular" and len(got["items"]) == 5, got
        # A promotion written to S3 by another process is followed (hot swap).
        with environ(cluster.env):
            store = StateStore(STATE)
            strategy = store.pointer_info("production")["strategy"]
            store.set_pointer("production", p[4], strategy=strategy)
        r = httpx.post(f"{server.url}/reload", json={}, timeout=60).json()
        assert r["production"] == f"state:{p[4]}:{strategy}" and not r["last_error"], r
        assert recommend(known)["model"]["period"] == p[4]
    finally:
        server.stop()
