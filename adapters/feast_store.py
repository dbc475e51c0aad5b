"""The Feast adapter: per-period features in, training frames and online lookups out.

``FeatureStoreAdapter`` is the only place the project touches Feast. It

- computes a period's aggregates with :mod:`smlrec.features` and writes them as Parquet
  (:meth:`~FeatureStoreAdapter.write_period`), one file per period per view,
  ``<data_dir>/<view>/period=<id>.parquet``, compacted into the file Feast reads,
  ``<data_dir>/<view>.parquet`` (side tables: ``<data_dir>/user_side.parquet``, ...);
- registers ``feature_repo/definitions.py`` with the registry (:meth:`~FeatureStoreAdapter.apply`,
  the Python-SDK equivalent of ``feast apply``);
- loads the online store (:meth:`~FeatureStoreAdapter.materialize`);
- builds point-in-time correct training frames (:meth:`~FeatureStoreAdapter.training_frame`)
  and reads online features (:meth:`~FeatureStoreAdapter.online_features`,
  :meth:`~FeatureStoreAdapter.popular_items`).

Configuration (see ``feature_repo/README.md``). Feast 0.67 expands ``$VAR`` / ``${VAR}`` in
``feature_store.yaml`` (``os.path.expandvars``) but has no defaults (an unset variable stays
as the literal text), so the adapter does not read the committed ``feature_store.yaml``: it
renders the configuration from :data:`CONFIG_TEMPLATE` with these variables, defaulting to
files under ``data_dir``:

=============================  ====================================================
``SMLREC_FEATURE_STORE_YAML``  a complete feature_store.yaml to use instead (Feast
                               expands ``${VAR}`` in it); overrides everything below
``FEAST_PROJECT``              project name (default ``smlrec``)
``FEAST_REGISTRY``             registry file path/URL, or an SQLAlchemy URL
                               (default ``<data_dir>/registry.db``)
``FEAST_REGISTRY_TYPE``        ``file`` or ``sql`` (default: ``sql`` when
                               ``FEAST_REGISTRY`` is a database URL, else ``file``)
``FEAST_ONLINE_STORE_TYPE``    ``sqlite`` (default) or ``redis``
``FEAST_ONLINE_STORE_PATH``    SQLite file (default ``<data_dir>/online_store.db``)
``FEAST_REDIS``                Redis connection string (default ``localhost:6379``)
=============================  ====================================================

The Parquet sources always live under ``data_dir``: the adapter sets ``SMLREC_FEATURE_DATA``
(read by ``definitions.py``) to it while loading the definitions.

Popular items for unknown users come from the ``top_items`` view: one row keyed by the
constant segment ``"all"`` holding the latest period's top item ids in rank order, so serving
needs a single online lookup and no list of candidate item ids.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sqlite3
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from feast import (
    Entity,
    FeatureService,
    FeatureStore,
    FeatureView,
    OnDemandFeatureView,
    Project,
    RepoConfig,
)
from feast.data_source import DataSource, PushMode
from feast.feature_view import DUMMY_ENTITY
from feast.repo_config import load_repo_config
from feast.repo_contents import RepoContents
from feast.repo_operations import extract_objects_for_apply_delete, get_repo_files
from fsspec.spec import AbstractFileSystem

from smlrec import features as F
from smlrec.faults import failpoint
from smlrec.io import atomic_write, url_fs
from smlrec.schema import ITEM, USER

PROJECT = "smlrec"
DATA_ENV = "SMLREC_FEATURE_DATA"
YAML_ENV = "SMLREC_FEATURE_STORE_YAML"
REGISTRY_FILE = "registry.db"
ONLINE_FILE = "online_store.db"
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
"""Start of the first materialization of a view (side information is stamped at it)."""

_PERIOD_ID = re.compile(r"\d{4}-\d{2}-\d{2}")
_PERIOD_FILE = re.compile(r"period=\d{4}-\d{2}-\d{2}\.parquet")
_SQL_SCHEMES = ("postgresql", "mysql", "sqlite:", "mssql", "oracle", "snowflake")

CONFIG_TEMPLATE = """\
project: {project}
provider: local
registry:
  registry_type: {registry_type}
  path: {registry}
  cache_ttl_seconds: 60
online_store:
{online_store}
offline_store:
  type: file
entity_key_serialization_version: 3
"""
"""The feature_store.yaml the adapter renders (``render_config``)."""

# One Arrow schema per view, so that every period's file has the same schema.
_TS = pa.timestamp("ns", tz="UTC")
SCHEMAS: dict[str, pa.Schema] = {
    "user_activity": pa.schema(
        [
            (USER, pa.string()),
            (F.EVENT_TS, _TS),
            ("n_interactions", pa.int64()),
            ("n_items", pa.int64()),
            ("last_seen", _TS),
        ]
    ),
    "recent_items": pa.schema(
        [(USER, pa.string()), (F.EVENT_TS, _TS), ("recent_items", pa.string())]
    ),
    "item_popularity": pa.schema(
        [
            (ITEM, pa.string()),
            (F.EVENT_TS, _TS),
            ("n_interactions", pa.int64()),
            ("share", pa.float64()),
            ("rank", pa.int64()),
        ]
    ),
    "top_items": pa.schema(
        [
            (F.SEGMENT, pa.string()),
            (F.EVENT_TS, _TS),
            ("top_items", pa.string()),
            ("n_items", pa.int64()),
        ]
    ),
    "user_side": pa.schema(
        [
            (USER, pa.string()),
            (F.EVENT_TS, _TS),
            ("age", pa.int64()),
            ("gender", pa.string()),
            ("occupation", pa.string()),
        ]
    ),
    "item_side": pa.schema(
        [(ITEM, pa.string()), (F.EVENT_TS, _TS), ("year", pa.int64()), ("genres", pa.string())]
    ),
}


def render_config(data_dir: str, env: Mapping[str, str] | None = None) -> str:
    """Return the feature_store.yaml text for ``data_dir`` and the variables in ``env``.

    ``env`` defaults to ``os.environ``; see the module docstring for the variables.
    """
    env = os.environ if env is None else env
    data_dir = str(data_dir).rstrip("/")
    registry = env.get("FEAST_REGISTRY") or f"{data_dir}/{REGISTRY_FILE}"
    is_sql = registry.startswith(_SQL_SCHEMES)
    registry_type = env.get("FEAST_REGISTRY_TYPE") or ("sql" if is_sql else "file")
    online_type = env.get("FEAST_ONLINE_STORE_TYPE") or "sqlite"
    if online_type == "sqlite":
        path = env.get("FEAST_ONLINE_STORE_PATH") or f"{data_dir}/{ONLINE_FILE}"
        online = {"type": "sqlite", "path": path}
    elif online_type == "redis":
        online = {"type": "redis", "connection_string": env.get("FEAST_REDIS") or "localhost:6379"}
    else:
        raise ValueError(f"FEAST_ONLINE_STORE_TYPE must be sqlite or redis, not {online_type!r}")
    online_yaml = "".join(f"  {k}: {_yaml_scalar(v)}\n" for k, v in online.items()).rstrip("\n")
    return CONFIG_TEMPLATE.format(
        project=_yaml_scalar(env.get("FEAST_PROJECT") or PROJECT),
        registry_type=_yaml_scalar(registry_type),
        registry=_yaml_scalar(registry),
        online_store=online_yaml,
    )


def _yaml_scalar(value: str) -> str:
    """Return ``value`` as a YAML scalar (quoted when needed)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _repo_config(repo_path: Path, data_dir: str, env: Mapping[str, str]) -> RepoConfig:
    """Return the RepoConfig: ``$SMLREC_FEATURE_STORE_YAML`` if set, else the rendered template."""
    override = env.get(YAML_ENV)
    if override:
        return load_repo_config(repo_path, Path(override))
    config = RepoConfig(**yaml.safe_load(render_config(data_dir, env)))
    config.repo_path = repo_path
    return config


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set ``os.environ[name]`` for the duration of the block, then restore it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_definitions(repo_path: str | Path, data_dir: str) -> list[Any]:
    """Execute the repo's definition files as ``feast apply`` would; return the Feast objects.

    Every ``.py`` file Feast would import (``.feastignore`` honoured, ``__init__.py`` skipped)
    runs as a fresh module with ``SMLREC_FEATURE_DATA=data_dir``, so the sources point at
    ``data_dir`` whatever the process environment says. Each object is returned once.
    """
    objects: list[Any] = []
    kinds = (DataSource, Entity, FeatureView, OnDemandFeatureView, FeatureService)
    no_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # as feast apply does: leave no __pycache__ in the repo
    try:
        with _environ(DATA_ENV, str(data_dir).rstrip("/")):
            files = get_repo_files(Path(repo_path).resolve())
            modules = [_exec_file(file) for file in files]
    finally:
        sys.dont_write_bytecode = no_bytecode
    for module in modules:
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, kinds) and not any(obj is seen for seen in objects):
                objects.append(obj)
    return objects


def _exec_file(file: Path) -> ModuleType:
    """Execute a Python file as a new module under a unique name (not left in sys.modules)."""
    spec = importlib.util.spec_from_file_location(f"_feast_repo_{uuid.uuid4().hex}", file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fs(url: str) -> tuple[AbstractFileSystem, str]:
    """Return the filesystem (no listings cache: ``smlrec.io.url_fs``) and the path inside it
    for a local path or fsspec URL."""
    fs, path = url_fs(url)
    return fs, path.rstrip("/")


def _to_table(view: str, frame: pd.DataFrame) -> pa.Table:
    """Convert a feature frame to an Arrow table with the view's fixed schema."""
    schema = SCHEMAS[view]
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _utc(ts: pd.Timestamp | datetime | str) -> pd.Timestamp:
    """Return ``ts`` as a tz-aware UTC Timestamp (naive values are taken to be UTC)."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _sqlite_wal(config: RepoConfig) -> None:
    """Put a local SQLite online store in write-ahead-log mode (kept in the file). In
    SQLite's default mode a write waits until no reader holds the file, so under a steady
    stream of online reads (the API's) a push can wait for seconds; with WAL, readers never
    block the writer. Measured with ``benchmarks/feedback.py``."""
    online = config.online_store
    if getattr(online, "type", "") != "sqlite" or "://" in str(online.path):
        return
    path = Path(online.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


class FeatureStoreAdapter:
    """Per-period features in a Feast store: Parquet sources, registry and online store.

    ``repo_path`` is the Feast repo holding ``definitions.py`` (``feature_repo/``); it is only
    read. ``data_dir`` (a local folder or fsspec URL) holds the Parquet sources and, unless the
    environment says otherwise (module docstring), the file registry and the SQLite online
    store. ``env`` replaces ``os.environ`` for the configuration variables (tests pass ``{}``).
    """

    def __init__(
        self, repo_path: str | Path, data_dir: str | Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.repo_path = Path(repo_path).resolve()
        if not (self.repo_path / "definitions.py").is_file():
            raise FileNotFoundError(f"{self.repo_path}: no definitions.py (not the feature repo)")
        data_dir = str(data_dir).rstrip("/")
        if "://" not in data_dir:
            data_dir = str(Path(data_dir).resolve())
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.env: Mapping[str, str] = dict(os.environ if env is None else env)
        self.config = _repo_config(self.repo_path, self.data_dir, self.env)
        self.store = FeatureStore(repo_path=str(self.repo_path), config=self.config)
        _sqlite_wal(self.config)

    @property
    def project(self) -> str:
        """The Feast project name."""
        return str(self.config.project)

    def config_yaml(self) -> str:
        """Return the feature_store.yaml this adapter uses (to inspect, or for the CLI's -f)."""
        override = self.env.get(YAML_ENV)
        if override:
            return Path(override).read_text()
        return render_config(self.data_dir, self.env)

    # Registry -------------------------------------------------------------------------------

    def apply(self) -> list[str]:
        """Register the repo's definitions (``feast apply``); idempotent.

        Returns ``"<kind>:<name>"`` of every object declared (e.g. ``"FeatureView:user_activity"``),
        sorted.

        Objects the registry holds for this project but the definitions no longer declare are
        deleted, as ``feast apply`` does.
        """
        objects = load_definitions(self.repo_path, self.data_dir)
        contents = RepoContents(
            projects=[Project(name=self.project, description="smlrec features")],
            data_sources=[o for o in objects if isinstance(o, DataSource)],
            feature_views=[o for o in objects if type(o) is FeatureView],
            on_demand_feature_views=[o for o in objects if isinstance(o, OnDemandFeatureView)],
            stream_feature_views=[],
            label_views=[],
            entities=[*(o for o in objects if isinstance(o, Entity)), DUMMY_ENTITY],
            feature_services=[o for o in objects if isinstance(o, FeatureService)],
            permissions=[],
        )
        to_apply, to_delete, _, _ = extract_objects_for_apply_delete(
            self.project, self.store.registry, contents
        )
        self.store.apply(to_apply, objects_to_delete=to_delete, partial=False)
        self.store.refresh_registry()
        return sorted(f"{type(o).__name__}:{o.name}" for o in objects)

    # Offline data ---------------------------------------------------------------------------

    def source_path(self, view: str) -> str:
        """Return the Parquet file a view's FileSource reads: ``<data_dir>/<view>.parquet``."""
        if view not in SCHEMAS:
            raise KeyError(f"unknown feature view {view!r}")
        return f"{self.data_dir}/{view}.parquet"

    def periods_dir(self, view: str) -> str:
        """Return the folder of a view's per-period files: ``<data_dir>/<view>/``."""
        if view not in SCHEMAS:
            raise KeyError(f"unknown feature view {view!r}")
        return f"{self.data_dir}/{view}"

    def _write(self, url: str, table: pa.Table) -> None:
        """Write ``table`` to ``url`` atomically: a hidden temporary file, then a rename."""
        fs, path = _fs(url)
        atomic_write(fs, path, lambda f: pq.write_table(table, f))

    def _compact(self, view: str) -> int:
        """Rewrite a view's source file from all its period files; return its row count."""
        fs, folder = _fs(self.periods_dir(view))
        files = sorted(
            p
            for p in fs.ls(folder, detail=False)
            if _PERIOD_FILE.fullmatch(p.rstrip("/").rpartition("/")[2])
        )
        tables = []
        for file in files:
            with fs.open(file, "rb") as f:
                tables.append(pq.read_table(f, schema=SCHEMAS[view]))
        table = pa.concat_tables(tables).sort_by(F.EVENT_TS)
        self._write(self.source_path(view), table)
        return table.num_rows

    def write_period(
        self,
        period_id: str,
        df: pd.DataFrame,
        period_end: pd.Timestamp,
        history: pd.DataFrame | None = None,
        users: pd.DataFrame | None = None,
        items: pd.DataFrame | None = None,
    ) -> dict[str, int]:
        """Compute one period's aggregates and write them to the offline store.

        ``df`` is the period's canonical interactions frame, ``period_end`` the period's
        exclusive end (the features are stamped one microsecond before it), ``history``
        earlier interactions for the recent-items lists. Each view's file for the period,
        ``<data_dir>/<view>/period=<id>.parquet``, is replaced whole (rerunning a period is
        safe), then the view's source file ``<data_dir>/<view>.parquet`` is rebuilt from all
        its period files. ``users`` / ``items`` (the MovieLens side tables), when given,
        replace ``<data_dir>/user_side.parquet`` / ``item_side.parquet``. Every file is
        written atomically. Returns the number of rows written per view for this period.

        Why one source file and not the folder of period files: the file offline store
        (dask) makes one partition per file, and with one file per period a historical
        retrieval took 20 times longer after 32 periods (0.2 s against 4-5 s) and grows with
        every period.
        """
        if _PERIOD_ID.fullmatch(str(period_id)) is None:
            raise ValueError(f"invalid period id {period_id!r}: expected YYYY-MM-DD")
        if df.empty:
            raise ValueError(f"period {period_id} has no interactions")
        frames: dict[str, pd.DataFrame] = {
            "user_activity": F.user_activity(df, period_end),
            "recent_items": F.recent_items(df, period_end, history=history),
            "item_popularity": F.item_popularity(df, period_end),
            "top_items": F.top_items(df, period_end),
        }
        written = {}
        for view, frame in frames.items():
            self._write(
                f"{self.periods_dir(view)}/period={period_id}.parquet", _to_table(view, frame)
            )
            self._compact(view)
            written[view] = len(frame)
        for view, table, build in (
            ("user_side", users, F.user_side),
            ("item_side", items, F.item_side),
        ):
            if table is not None:
                frame = build(table)
                self._write(self.source_path(view), _to_table(view, frame))
                written[view] = len(frame)
        return written

    def _has_data(self, view: str) -> bool:
        """Return whether a view's source file exists."""
        fs, path = _fs(self.source_path(view))
        return bool(fs.isfile(path))

    # Online store ---------------------------------------------------------------------------

    def materialize(
        self, end: pd.Timestamp | datetime, start: pd.Timestamp | datetime | None = None
    ) -> dict[str, tuple[datetime, datetime]]:
        """Load feature rows up to ``end`` (inclusive) into the online store.

        Each view is loaded from where its last materialization ended or, the first time,
        from :data:`EARLIEST`, so the first run loads everything (Feast's own
        ``materialize_incremental`` would start at now - ttl, which skips a replayed past).
        Pass ``start`` to reload a window again (e.g. a period whose data was rewritten).
        ``end`` must not be in the future: a future end would be recorded as materialized
        and later periods' rows, stamped before it, would never be loaded. Views with no
        data yet are skipped. Returns the window loaded per view.
        """
        end_ts = _utc(end).to_pydatetime()
        now = datetime.now(UTC)
        if end_ts > now:
            raise ValueError(
                f"materialize end {end_ts.isoformat()} is in the future (now {now.isoformat()})"
            )
        windows: dict[datetime, list[str]] = {}
        for view in self.store.list_feature_views(allow_cache=False):
            if view.name not in SCHEMAS or not self._has_data(view.name) or not view.online:
                continue
            if start is not None:
                begin = _utc(start).to_pydatetime()
            else:
                begin = view.most_recent_end_time or EARLIEST
                begin = _utc(begin).to_pydatetime()
            if begin < end_ts:
                windows.setdefault(begin, []).append(view.name)
        done = {}
        for begin, names in sorted(windows.items()):
            for name in sorted(names):  # one view at a time: a crash leaves whole views
                self.store.materialize(begin, end_ts, feature_views=[name])
                done[name] = (begin, end_ts)
                failpoint("feast.materialize", name)
        return done

    # Retrieval ------------------------------------------------------------------------------

    def _refs_by_view(self, features: str | Sequence[str]) -> dict[str, tuple[str, list[str]]]:
        """Resolve a feature service name or ``view:feature`` references, grouped by view.

        Returns ``{view name: (join key, [view:feature, ...])}`` in request order.
        """
        if isinstance(features, str):
            service = self.store.get_feature_service(features, allow_cache=False)
            refs = [
                f"{p.name_to_use()}:{field.name}"
                for p in service.feature_view_projections
                for field in p.features
            ]
        else:
            refs = list(features)
        grouped: dict[str, tuple[str, list[str]]] = {}
        for ref in refs:
            name, sep, _ = ref.partition(":")
            if not sep:
                raise ValueError(f"feature reference {ref!r} is not of the form view:feature")
            if name not in grouped:
                view = self.store.get_feature_view(name, allow_registry_cache=True)
                grouped[name] = (view.join_keys[0], [])
            grouped[name][1].append(ref)
        return grouped

    def _first_seen(self, view: str, key: str) -> pd.Series:
        """Return the earliest feature timestamp of each key in a view's offline data."""
        if not self._has_data(view):
            return pd.Series(dtype="datetime64[ns, UTC]")
        fs, path = _fs(self.source_path(view))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=[key, F.EVENT_TS]).to_pandas()
        return F.utc_series(table[F.EVENT_TS]).groupby(table[key].astype(str)).min()

    def training_frame(
        self,
        entity_df: pd.DataFrame,
        features: str | Sequence[str] = "model_v1",
        fill_value: float | None = None,
    ) -> pd.DataFrame:
        """Join point-in-time correct features onto ``entity_df``; one output row per input row.

        ``entity_df`` holds the join keys the features need (``user_id`` and/or ``item_id``)
        and an ``event_timestamp`` (``timestamp`` is accepted and copied); each row gets the
        feature values known at its timestamp (stamped at or before it, within the view's
        ttl), through ``FeatureStore.get_historical_features``. ``features`` is a feature
        service name (default ``model_v1``) or a list of ``view:feature`` references;
        columns are named ``<view>__<feature>``. Row order and columns are kept, index reset.

        Feast's file (dask) offline store is asked one view at a time, for the distinct
        (key, timestamp) pairs whose key has a feature row at or before the timestamp, and
        the answers are joined back onto ``entity_df``. This side-steps three of its traps:
        it drops entity rows whose features all lie in the future, it collapses entity rows
        with the same key and timestamp, and it fails ("Divisions calculation failed") when
        a key has no feature rows at all and the source is read as several partitions. Rows
        without features get missing values (``fill_value`` in numeric columns when given).
        """
        frame = entity_df.copy()
        if F.EVENT_TS not in frame.columns:
            if "timestamp" not in frame.columns:
                raise ValueError("entity_df needs an event_timestamp (or timestamp) column")
            frame[F.EVENT_TS] = frame["timestamp"]
        frame[F.EVENT_TS] = F.utc_series(frame[F.EVENT_TS])
        out = frame.reset_index(drop=True)
        added: list[str] = []
        for view, (key, refs) in self._refs_by_view(features).items():
            if key not in out.columns:
                raise ValueError(f"entity_df needs a {key} column for the {view} features")
            columns = [r.replace(":", "__", 1) for r in refs]
            query = out[[key, F.EVENT_TS]].astype({key: str}).drop_duplicates()
            first = query[key].map(self._first_seen(view, key))
            query = query[first.notna() & (query[F.EVENT_TS] >= first)]
            if query.empty:
                found = pd.DataFrame(columns=[key, F.EVENT_TS, *columns])
            else:
                job = self.store.get_historical_features(
                    entity_df=query.reset_index(drop=True), features=refs, full_feature_names=True
                )
                found = job.to_df()
            found = found.astype({key: str})
            found[F.EVENT_TS] = F.utc_series(found[F.EVENT_TS])
            found = found.drop_duplicates([key, F.EVENT_TS])[[key, F.EVENT_TS, *columns]]
            keys = out[key].astype(str).rename("__smlrec_key")
            merged = pd.concat([out, keys], axis=1).merge(
                found.rename(columns={key: "__smlrec_key"}),
                on=["__smlrec_key", F.EVENT_TS],
                how="left",
                validate="many_to_one",
            )
            out = merged.drop(columns="__smlrec_key")
            if len(out) != len(entity_df):
                raise AssertionError(f"training frame has {len(out)} rows for {len(entity_df)}")
            added += columns
        if fill_value is not None:
            numeric = [c for c in added if pd.api.types.is_numeric_dtype(out[c])]
            out[numeric] = out[numeric].fillna(fill_value)
        return out

    def online_features(
        self,
        user_ids: Sequence[str] | None = None,
        item_ids: Sequence[str] | None = None,
        features: str | Sequence[str] = "serving_v1",
    ) -> dict[str, pd.DataFrame]:
        """Read the latest materialized features for users and/or items.

        ``features`` is a feature service name (default ``serving_v1``) or ``view:feature``
        references. Returns ``{"user_id": frame, "item_id": frame}`` (only keys whose ids
        were given and that some feature needs): one row per requested id, in order, with
        the id column and ``<view>__<feature>`` columns (missing values for ids the online
        store does not hold).
        """
        ids = {USER: user_ids, ITEM: item_ids}
        by_key: dict[str, list[str]] = {}
        for key, refs in self._refs_by_view(features).values():
            by_key.setdefault(key, []).extend(refs)
        out = {}
        for key, refs in by_key.items():
            wanted = ids.get(key)
            if wanted is None:
                continue
            rows = [{key: str(v)} for v in wanted]
            response = self.store.get_online_features(
                features=refs, entity_rows=rows, full_feature_names=True
            )
            out[key] = pd.DataFrame(response.to_dict())
        return out

    def push_online(self, push_source: str, frame: pd.DataFrame) -> None:
        """Write rows through a push source straight into the online store (per-event
        freshness: ``frame`` has the view's join key, fields and ``event_timestamp``)."""
        self.store.push(push_source, frame, to=PushMode.ONLINE)

    def popular_items(self, k: int = 20, segment: str = F.ALL_SEGMENT) -> list[str]:
        """Return the ``k`` most popular item ids of the latest materialized period.

        Read from the online store's ``top_items`` row for ``segment`` (one lookup); empty
        when nothing is materialized yet.
        """
        response = self.store.get_online_features(
            features=["top_items:top_items"], entity_rows=[{F.SEGMENT: segment}]
        ).to_dict()
        return F.split_ids(response["top_items"][0])[:k]


__all__: list[str] = [
    "CONFIG_TEMPLATE",
    "FeatureStoreAdapter",
    "load_definitions",
    "render_config",
]
