"""Feast definitions of smlrec: entities, sources, feature views, feature services.

This is the only Python file Feast executes in this repo (``feast apply`` imports every
``.py`` here not listed in ``.feastignore``). Each object is declared once, with a
description. The tables behind the sources are computed by :mod:`smlrec.features` and written
by ``adapters/feast_store.py`` (``FeatureStoreAdapter.write_period``): one Parquet file per
view, ``<feature data>/<view name>.parquet``, compacted from one file per period.

Where the data lives comes from the environment, so the same definitions serve the embedded
mode and a cluster:

- ``SMLREC_FEATURE_DATA``: the folder (or ``s3://`` / ``gs://`` URL) holding one Parquet
  file per source. Default ``data``, which Feast resolves against this folder
  (``feature_repo/data``).
- ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: an S3-compatible endpoint (MinIO, Ceph...)
  for ``s3://`` sources, given to each source as its ``s3_endpoint_override``. boto3 and s3fs
  read these variables themselves, but Feast's file offline store builds its
  ``pyarrow.fs.S3FileSystem`` from the source's override alone and would go to AWS. The
  override is kept with the sources in the registry.

Feature service versions: a model version is trained on ``model_vN`` and served with
``serving_vN``. To add a version, declare new ``FeatureService`` objects at the end of this
file (keep the old ones while any model trained on them is in use), then apply.
"""

from __future__ import annotations

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String, UnixTimestamp

FEATURE_DATA = os.environ.get("SMLREC_FEATURE_DATA", "data").rstrip("/")
"""Folder or URL of the Parquet sources (``$SMLREC_FEATURE_DATA``, default ``data``)."""

S3_ENDPOINT = (
    os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if FEATURE_DATA.startswith("s3://")
    else None
)
"""The S3 endpoint of ``s3://`` sources (``$AWS_ENDPOINT_URL_S3``, ``$AWS_ENDPOINT_URL``);
None: AWS's own."""

PERIOD_TTL = timedelta(days=400)
"""How long a period's aggregates stay valid in point-in-time joins. Longer than the
MovieLens-100k replay (32 weeks) so that every period's history is reachable; never 0 (with
ttl 0 the first ``materialize_incremental`` loads nothing)."""

STATIC_TTL = timedelta(days=36525)
"""TTL of side information, stamped 1970-01-01: 100 years, i.e. valid for every period."""

TIMESTAMP = "event_timestamp"


def _source(name: str, description: str) -> FileSource:
    """Return the Parquet source of one view: the file ``<FEATURE_DATA>/<name>.parquet``."""
    return FileSource(
        name=name,
        path=f"{FEATURE_DATA}/{name}.parquet",
        timestamp_field=TIMESTAMP,
        description=description,
        s3_endpoint_override=S3_ENDPOINT,
    )


# Entities -----------------------------------------------------------------------------------

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A user, by the raw user id of the interaction data (a string).",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="An item, by the raw item id of the interaction data (a string).",
)

segment = Entity(
    name="segment",
    join_keys=["segment_id"],
    value_type=ValueType.STRING,
    description=(
        "A population of users for population-level features; 'all' is every user. "
        "Lets serving read the global top items with one online lookup."
    ),
)

# Sources ------------------------------------------------------------------------------------

user_activity_source = _source(
    "user_activity", "Per-period user activity counts (all periods, one file)."
)
recent_items_source = _source(
    "recent_items", "Per-period list of each active user's most recent items."
)
item_popularity_source = _source(
    "item_popularity", "Per-period item interaction counts, shares and ranks."
)
top_items_source = _source("top_items", "Per-period list of the most popular items.")
user_side_source = _source("user_side", "User demographics (MovieLens users side table).")
item_side_source = _source("item_side", "Item metadata (MovieLens items side table).")
user_fresh_push = PushSource(
    name="user_fresh_push",
    batch_source=_source("user_fresh", "Per-event user states (not written offline: the "
                         "events themselves become the next period's data)."),
    description="The API pushes a user's state here after each feedback event "
    "(FeatureStore.push, to the online store).",
)

# Feature views ------------------------------------------------------------------------------

user_activity = FeatureView(
    name="user_activity",
    description=(
        "What a user did in the latest period they were active in, known at the end of that "
        "period: interaction count, distinct items, last interaction time."
    ),
    entities=[user],
    ttl=PERIOD_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="n_interactions", dtype=Int64, description="Interactions in the period."),
        Field(name="n_items", dtype=Int64, description="Distinct items in the period."),
        Field(name="last_seen", dtype=UnixTimestamp, description="Latest interaction time."),
    ],
    source=user_activity_source,
    online=True,
    tags={"grain": "period"},
)

recent_items = FeatureView(
    name="recent_items",
    description=(
        "A user's most recent distinct items (up to 20, newest first) as comma-separated "
        "item ids, including earlier periods; known at the end of the period."
    ),
    entities=[user],
    ttl=PERIOD_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(
            name="recent_items",
            dtype=String,
            description="Comma-separated item ids, newest first.",
        ),
    ],
    source=recent_items_source,
    online=True,
    tags={"grain": "period"},
)

item_popularity = FeatureView(
    name="item_popularity",
    description=(
        "How popular an item was in the latest period it was interacted with: count, share "
        "of the period's interactions, rank (1 = most popular)."
    ),
    entities=[item],
    ttl=PERIOD_TTL,
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="n_interactions", dtype=Int64, description="Interactions in the period."),
        Field(name="share", dtype=Float64, description="Share of the period's interactions."),
        Field(name="rank", dtype=Int64, description="Popularity rank in the period, from 1."),
    ],
    source=item_popularity_source,
    online=True,
    tags={"grain": "period"},
)

top_items = FeatureView(
    name="top_items",
    description=(
        "The latest period's most popular items (up to 100, most popular first) for a "
        "segment; serving's fallback for users it does not know."
    ),
    entities=[segment],
    ttl=PERIOD_TTL,
    schema=[
        Field(name="segment_id", dtype=String),
        Field(
            name="top_items",
            dtype=String,
            description="Comma-separated item ids, most popular first.",
        ),
        Field(name="n_items", dtype=Int64, description="Number of ids in top_items."),
    ],
    source=top_items_source,
    online=True,
    tags={"grain": "period"},
)

user_side = FeatureView(
    name="user_side",
    description="User demographics from the MovieLens users table; static.",
    entities=[user],
    ttl=STATIC_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="age", dtype=Int64, description="Age in years."),
        Field(name="gender", dtype=String, description="'M' or 'F'."),
        Field(name="occupation", dtype=String, description="Occupation name."),
    ],
    source=user_side_source,
    online=True,
    tags={"grain": "static"},
)

item_side = FeatureView(
    name="item_side",
    description="Item metadata from the MovieLens items table; static.",
    entities=[item],
    ttl=STATIC_TTL,
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="year", dtype=Int64, description="Release year (missing if unknown)."),
        Field(name="genres", dtype=String, description="'|'-separated genre names."),
    ],
    source=item_side_source,
    online=True,
    tags={"grain": "static"},
)

user_fresh = FeatureView(
    name="user_fresh",
    description=(
        "A user's state updated per feedback event by the API, between daily runs: the "
        "embedding updated from the events (valid for one model version only) and the recent "
        "items including the events. Written by the push source, read by every API worker."
    ),
    entities=[user],
    ttl=PERIOD_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="embedding", dtype=Array(Float32),
              description="The user's vector after the events, in the model's space."),
        Field(name="model_version", dtype=String,
              description="The served model version the embedding belongs to."),
        Field(name="recent_items", dtype=String,
              description="Comma-separated item ids, newest first, the events included."),
        Field(name="events", dtype=Int64, description="Events applied since the daily row."),
    ],
    source=user_fresh_push,
    online=True,
    tags={"grain": "event"},
)

# Feature services: one pair per model version -------------------------------------------------

model_v1 = FeatureService(
    name="model_v1",
    features=[user_activity, item_popularity],
    description="Training features of model version 1 (point-in-time joined onto interactions).",
    tags={"model_version": "1", "use": "training"},
)

serving_v1 = FeatureService(
    name="serving_v1",
    features=[recent_items, item_popularity],
    description="Online features read by the serving API for model version 1.",
    tags={"model_version": "1", "use": "serving"},
)
