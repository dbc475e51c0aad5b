"""The smlrec prediction API: a BentoML 1.4 service over the accepted MF models.

Start it with ``make serve`` (``bentoml serve serving.service:Recommender``, 127.0.0.1:3000).
Endpoints (all POST with a JSON body; the OpenAPI page is at ``/docs``, its document at
``/docs.json``; ``serving/http.py`` says what they add to BentoML's):

- ``/recommend`` {user_id, k, exclude_seen, recent_items?}: top-k items; or {users: [{user_id,
  recent_items?}, ...], k, exclude_seen}: up to 1,000 users ranked together (one matrix product
  per served model), answered as {results: [...]};
- ``/score`` {user_id, item_ids, recent_items?}: scores of given items;
- ``/similar_items`` {item_id, k}: nearest items by cosine similarity of embeddings;
- ``/feedback`` {user_id, item_id, timestamp?, rating?} or {events: [...]}: events written
  durably to the feedback log (the next daily run's input) before the answer, then applied to
  their users' embeddings (``serving/fresh.py``), visible in ``/recommend`` within a second;
- ``/metadata``: the models served, their periods and gate metrics, features, batching;
- ``/reload``: check the model source for new versions now (it is also polled).

BentoML adds ``GET /livez`` (health), ``GET /readyz`` (ready once a production model is
loaded) and ``GET /metrics`` (Prometheus).

Configuration, from the environment (read once at start):

=========================  ===========================================================
``SMLREC_MODEL_SOURCE``    ``bentoml`` (default: the BentoML model store) or a state-store
                           URI to follow its production/candidate pointers
``SMLREC_CANARY_SHARE``    share of users (stable hash of the id) served by the
                           candidate, 0 to 1 (default 0.1; 0 turns the canary off)
``SMLREC_RELOAD_SECONDS``  how often to look for new versions (default 5; 0: only /reload)
``SMLREC_FEATURE_REPO``    Feast repo for online features (default: none, no Feast)
``SMLREC_FEATURE_DATA``    Feast data folder of that repo (default ``features``)
``SMLREC_MAX_BATCH``       largest micro-batch of /recommend requests (default 64)
``SMLREC_BATCH_WAIT_MS``   extra wait to fill a batch (default 0: adaptive, no wait)
``SMLREC_BATCH_THREAD``    1: compute batches in a thread beside the event loop (default
                           0: on the loop, which measured the same throughput with
                           far shorter latency tails on 2 cores)
``SMLREC_ACCESS_LOG``      1: log every request (default 0; it costs throughput)
``SMLREC_MAX_BODY_BYTES``  largest request body accepted (default 1 MiB; larger: 413)
``SMLREC_WORKERS``         worker processes (default 1; ``auto``: one per CPU core, at
                           most 8; ``make serve`` uses ``auto``)
``SMLREC_FEAST_TTL``       seconds a worker keeps the popular items and a user's daily
                           recent items read from Feast (default 30; 0: read every time).
                           Both change once per daily run; per-event states are never
                           cached (a new event shows within the update lag)
``SMLREC_DEVICE``          ``auto`` (default: CUDA when present), ``cpu``, ``cuda``
``SMLREC_THREADS``         torch CPU threads per worker (default 1)
``SMLREC_DATA_URI``        the data store (a local folder): the feedback log goes under
                           it, and its period spec names the log's periods
``SMLREC_FEEDBACK_LOG``    the feedback log's folder (default ``<data store>/feedback``,
                           else ``feedback``); format in ``smlrec/feedback.py``
``SMLREC_PERIOD_SPEC``     period spec of the log without a data store (default 1D)
``SMLREC_USER_UPDATE``     the per-event user update rule as JSON (fields of
                           ``smlrec.online.UserUpdate``), or ``none`` to turn it off
                           (default: the packaged run configuration's, else the
                           built-in default)
``SMLREC_MIN_RATING``      a rated event updates its user only from this rating (default 4,
                           the importer's positive threshold)
``SMLREC_RATING_RANGE``    ratings accepted, ``low,high`` (default ``0,5``, the validation
                           suite's): others are refused so that a logged day validates
``SMLREC_MAX_CLOCK_SKEW``  seconds an event's timestamp may be ahead of the clock (default
                           300)
``SMLREC_FRESH_MAX_ITEMS`` most recent items a user's per-event state keeps (default 200;
                           the rule's ``history`` when smaller): each state is one online
                           store row read and written per event. The replay measured
                           history 100 within 0.001 NDCG@20 of 1000 on validation weeks
=========================  ===========================================================
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bentoml
import torch
from pydantic import BaseModel, Field, field_validator
from starlette.responses import JSONResponse

from serving.batching import MicroBatcher, TTLCache, by_model, describe
from serving.fresh import FIELDS, PUSH_SOURCE, FreshUpdater, UserState, UserStates, merge_recent
from serving.http import ApiFront, install_log_filter
from serving.limits import BodyLimit
from serving.model import ServedModel, TopK, canary_bucket, iso_time
from serving.schemas import (
    MAX_ID_LENGTH,
    MAX_K,
    MAX_LIST,
    MAX_USERS,
    BatchUser,
    Empty,
    FeedbackRequest,
    FeedbackResponse,
    Metadata,
    RecommendBatchResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
    ServedBy,
    SimilarRequest,
    SimilarResponse,
)
from serving.sources import PRODUCTION_MODEL, LiveModels, make_source
from smlrec.data.store import has_dataset, read_dataset_info
from smlrec.device import configure_threads, pick_device
from smlrec.errors import StorageError
from smlrec.feedback import LOG_DIR, Event, FeedbackLog
from smlrec.online import UserUpdate

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
log = logging.getLogger("smlrec.serving")


class ServingConfig(BaseModel):
    """The service's settings (see the module docstring for the variables)."""

    model_source: str = "bentoml"
    canary_share: float = Field(0.1, ge=0.0, le=1.0)
    reload_seconds: float = Field(5.0, ge=0.0)
    feature_repo: str = ""
    feature_data: str = "features"
    max_batch: int = Field(64, ge=1, le=4096)
    batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    workers: int = Field(1, ge=1, le=64)
    feast_ttl: float = Field(30.0, ge=0.0)
    batch_thread: bool = False
    access_log: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    data_uri: str = ""
    feedback_log: str = ""
    period_spec: str = ""
    user_update: str = ""
    min_rating: float = 4.0
    rating_range: tuple[float, float] = (0.0, 5.0)
    max_clock_skew: float = Field(300.0, ge=0.0)
    fresh_max_items: int = Field(200, ge=1, le=100_000)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServingConfig:
        env = dict(os.environ if env is None else env)
        names = {"model_source": "SMLREC_MODEL_SOURCE", "canary_share": "SMLREC_CANARY_SHARE",
                 "reload_seconds": "SMLREC_RELOAD_SECONDS",
                 "feature_repo": "SMLREC_FEATURE_REPO", "feature_data": "SMLREC_FEATURE_DATA",
                 "max_batch": "SMLREC_MAX_BATCH", "batch_wait_ms": "SMLREC_BATCH_WAIT_MS",
                 "workers": "SMLREC_WORKERS", "batch_thread": "SMLREC_BATCH_THREAD",
                 "access_log": "SMLREC_ACCESS_LOG", "max_body_bytes": "SMLREC_MAX_BODY_BYTES",
                 "data_uri": "SMLREC_DATA_URI", "feedback_log": "SMLREC_FEEDBACK_LOG",
                 "period_spec": "SMLREC_PERIOD_SPEC", "user_update": "SMLREC_USER_UPDATE",
                 "min_rating": "SMLREC_MIN_RATING", "rating_range": "SMLREC_RATING_RANGE",
                 "max_clock_skew": "SMLREC_MAX_CLOCK_SKEW",
                 "fresh_max_items": "SMLREC_FRESH_MAX_ITEMS", "feast_ttl": "SMLREC_FEAST_TTL"}
        return cls(**{field: env[var] for field, var in names.items() if env.get(var)})

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return max(1, min(8, len(os.sched_getaffinity(0))))
        return value

    @field_validator("rating_range", mode="before")
    @classmethod
    def _range(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        problem = f"SMLREC_RATING_RANGE must be 'low,high' numbers, not {value!r}"
        low, _, high = value.partition(",")
        try:
            bounds = float(low), float(high)
        except ValueError:
            raise ValueError(problem) from None
        if bounds[0] > bounds[1]:
            raise ValueError(problem)
        return bounds

    def log_root(self) -> str:
        if self.feedback_log:
            return self.feedback_log
        return f"{self.data_uri.rstrip('/')}/{LOG_DIR}" if self.data_uri else LOG_DIR

    def log_period_spec(self) -> str:
        """The period spec of the log: as configured, else the data store's, else 1D."""
        if self.period_spec:
            return self.period_spec
        if self.data_uri and has_dataset(self.data_uri):
            return str(read_dataset_info(self.data_uri)["period"])
        return "1D"

    def update_rule(self, packaged: dict[str, Any] | None = None) -> UserUpdate:
        """The per-event user update rule: the variable's, else the packaged run
        configuration's, else the default."""
        if self.user_update.strip().lower() == "none":
            return UserUpdate(method="none")
        if self.user_update:
            return UserUpdate.model_validate_json(self.user_update)
        return UserUpdate.model_validate(packaged or {})


CONFIG = ServingConfig.from_env()


class RequestError(Exception):
    """A request the API refuses: HTTP ``status`` with a message (never a 5xx)."""

    def __init__(self, status: int, message: str, **detail: Any):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, **self.detail}, status_code=self.status)


def _tune_gc() -> None:
    """Keep the cyclic garbage collector from stalling requests.

    Measured on the serving benchmark (2 CPU cores, 100k items, 32 concurrent clients): with
    Python's defaults, full collections scanning torch's, pandas' and BentoML's objects put
    p99 at about 300 ms against a p50 of 60 ms; with the collector off, p99 was 68 ms. So
    everything loaded at start (it lives as long as the worker) is frozen out of the
    collector's view, and collections run less often (gen-0 threshold 50,000). Cyclic
    garbage is still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)


_SERVED_BY: weakref.WeakKeyDictionary[ServedModel, ServedBy] = weakref.WeakKeyDictionary()


def _served_by(model: ServedModel) -> ServedBy:
    """The answer's ``model`` part: made once per loaded model (a model is immutable)."""
    served = _SERVED_BY.get(model)
    if served is None:
        served = _SERVED_BY[model] = ServedBy(
            stage=model.info.stage, version=model.info.version, period=model.info.period,
            strategy=model.info.strategy)
    return served


def _cache_stats(cache: TTLCache[Any, Any]) -> dict[str, int]:
    return {"entries": len(cache), "hits": cache.hits, "misses": cache.misses}


def _preview(ids: list[str], n: int = 10) -> str:
    shown = ", ".join(repr(v) for v in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


def _has_model(name: str) -> bool:
    """Whether the BentoML model store holds a model called ``name``."""
    try:
        return bool(bentoml.models.list(name))
    except bentoml.exceptions.NotFound:
        return False


class OnlineFeatures:
    """The Feast online store: users' recent items and per-event states (read, and pushed
    through ``user_fresh_push``), the popular items."""

    RECENT = "recent_items:recent_items"
    POPULAR = "top_items:top_items"  # read by FeatureStoreAdapter.popular_items

    def __init__(self, repo: str, data: str, ttl: float = 0.0):
        from adapters.feast_store import FeatureStoreAdapter

        self.repo, self.data = repo, data
        self.adapter = FeatureStoreAdapter(repo, data)
        try:  # registries applied before per-event states existed: none until the next run
            self.adapter.store.get_feature_view("user_fresh")
            self.can_push = True
        except Exception:  # noqa: BLE001 - feast raises its own not-found errors
            self.can_push = False
            log.warning("the Feast registry has no user_fresh view yet (the next daily run "
                        "applies it): per-event user states stay in this process")
        # What the daily run writes (popular items, users' daily recent items) is kept for
        # ``ttl`` seconds; per-event states are read every time.
        self.daily: TTLCache[str, list[str]] = TTLCache(ttl, maxsize=100_000)
        self.popular: TTLCache[str, list[str]] = TTLCache(ttl, maxsize=1)

    def popular_items(self, k: int) -> list[str]:
        items = self.popular.get("all")
        if items is None:
            items = self.adapter.popular_items(1 << 30)  # the whole stored list
            self.popular.put("all", items)
        return items[:k]

    def user_states(self, user_ids: Sequence[str]) -> list[tuple[UserState | None, list[str]]]:
        """Each user's fresh state (``user_fresh`` view, pushed per event) and daily recent
        items (from the cache when read within the TTL), in at most one online read."""
        from smlrec.features import split_ids

        daily = {u: d for u in user_ids if (d := self.daily.get(u)) is not None}
        missing = [u for u in dict.fromkeys(user_ids) if u not in daily]
        fresh = [f"user_fresh:{f}" for f in FIELDS if self.can_push]
        ask = list(dict.fromkeys(user_ids)) if fresh else missing
        rows: dict[str, dict[str, Any]] = {}
        if ask:
            refs = ([self.RECENT] if missing else []) + fresh
            frame = self.adapter.online_features(user_ids=ask, features=refs)["user_id"]
            rows = dict(zip(ask, frame.to_dict("records"), strict=True))
        for u in missing:
            daily[u] = split_ids(rows[u][self.RECENT.replace(":", "__")])
            self.daily.put(u, daily[u])
        out = []
        for u in user_ids:
            row = rows.get(u, {})
            if row.get("user_fresh__model_version") is None:
                out.append((None, daily[u]))
                continue
            vector = row.get("user_fresh__embedding")
            out.append((UserState(
                version=row["user_fresh__model_version"] or "",
                vector=torch.tensor(vector, dtype=torch.float32) if vector else None,
                recent=tuple(split_ids(row["user_fresh__recent_items"])),
                events=int(row.get("user_fresh__events") or 0)), daily[u]))
        return out

    def push_states(self, frame: Any) -> None:
        self.adapter.push_online(PUSH_SOURCE, frame)


@bentoml.service(
    name="smlrec",
    # Asks for a GPU; on a machine without one BentoML still starts the worker, and
    # pick_device() chooses the CPU (SMLREC_DEVICE overrides).
    resources={"gpu": 1},
    workers=CONFIG.workers,
    traffic={"timeout": 30},
    logging={"access": {"enabled": CONFIG.access_log}},
    labels={"owner": "smlrec", "model": PRODUCTION_MODEL},
)
class Recommender:
    """Recommendations from the production model, a canary share from the candidate."""

    if CONFIG.model_source == "bentoml" and _has_model(PRODUCTION_MODEL):
        # Packaged into the Bento by `bentoml build`; at run time the service follows the
        # newest production model in the store (hot swap), starting from this one.
        model_ref = bentoml.models.BentoModel(f"{PRODUCTION_MODEL}:latest")

    def __init__(self) -> None:
        install_log_filter()
        self.config = CONFIG
        self.device = pick_device()
        configure_threads()
        self.models = LiveModels(make_source(self.config.model_source), self.device,
                                 self.config.reload_seconds)
        self.models.refresh()
        if self.models.production is None:
            log.warning("no production model in %s yet%s: serving popular items (and the "
                        "candidate to the canary share) until one is promoted",
                        self.models.source.name,
                        f" ({self.models.last_error})" if self.models.last_error else "")
        self.models.start()
        self.features: OnlineFeatures | None = None
        self.features_error = ""
        if self.config.feature_repo:
            try:
                self.features = OnlineFeatures(self.config.feature_repo, self.config.feature_data,
                                               self.config.feast_ttl)
            except Exception as exc:  # noqa: BLE001 - serve without Feast, say so in /metadata
                self.features_error = f"{type(exc).__name__}: {exc}"
                log.error("Feast online store unavailable: %s", self.features_error)
        self.states = UserStates(self.features)
        self.updater = FreshUpdater(self.config.update_rule(self._packaged_rule()), self.states,
                                    self._model_for, self.config.min_rating,
                                    max_items=self.config.fresh_max_items)
        self.log: FeedbackLog | None = None
        self.log_error = ""
        try:
            self.log = FeedbackLog(self.config.log_root(), self.config.log_period_spec())
        except (OSError, StorageError, ValueError) as exc:
            self.log_error = f"{type(exc).__name__}: {exc}"
            log.error("feedback log unavailable, /feedback answers 503: %s", self.log_error)
        _tune_gc()
        self.batcher: MicroBatcher[tuple[ServedModel, torch.Tensor, int, list[int]], TopK] = (
            MicroBatcher(_rank_batch, self.config.max_batch, self.config.batch_wait_ms,
                         threaded=self.config.batch_thread))
        # New users answered by MeLU: their adaptations batched too (one vmapped call).
        self.cold_batcher: MicroBatcher[tuple[ServedModel, str, list[int]], torch.Tensor] = (
            MicroBatcher(_melu_batch, self.config.max_batch, self.config.batch_wait_ms,
                         threaded=True))

    def __is_ready__(self) -> bool:
        """Ready when every request can be answered: a production model is loaded, or popular
        items can be (from Feast, or the candidate's packaged list)."""
        candidate = self.models.candidate
        return (self.models.production is not None or self.features is not None
                or (candidate is not None and bool(candidate.popular)))

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.log is not None:
            self.log.close()
        self.updater.close()
        self.models.stop()
        self.batcher.close()
        self.cold_batcher.close()

    # ------------------------------------------------------------------ helpers

    def _model_for(self, user_id: str) -> ServedModel | None:
        """The candidate for the canary share, production for the rest (None: no model has
        been accepted yet, popular items answer)."""
        production, candidate = self.models.production, self.models.candidate
        share = self.config.canary_share
        if candidate is not None and share > 0 and canary_bucket(user_id) < share:
            return candidate
        return production

    def _packaged_rule(self) -> dict[str, Any] | None:
        """The per-event update rule of the production model's run configuration."""
        model = self.models.production or self.models.candidate
        return model.freshness.get("user_update") if model is not None else None

    async def _state(self, user_id: str, needed: bool = True
                     ) -> tuple[UserState | None, list[str]]:
        """The user's fresh state and every recent item known of them (see :meth:`_states`);
        ``needed`` False (nothing in the answer can use them): no read, (None, [])."""
        return (await self._states([user_id], [needed]))[0]

    async def _states(self, user_ids: Sequence[str], needed: Sequence[bool]
                      ) -> list[tuple[UserState | None, list[str]]]:
        """Each user's fresh state and every recent item known of them (their feedback's
        first, then the daily view's): from Feast, in one read in a thread, else (or when
        the read fails) this worker's memory. Users not ``needed``: no read, (None, [])."""
        wanted = [u for u, n in zip(user_ids, needed, strict=True) if n]
        read: dict[str, tuple[UserState | None, list[str]]] = {
            u: (self.states.local(u), []) for u in wanted}
        if self.features is not None and wanted:
            try:
                read.update(zip(wanted, await asyncio.to_thread(self.states.read, wanted),
                                strict=True))
            except Exception as exc:  # noqa: BLE001 - a lookup failure degrades, never fails
                log.warning("Feast user state read failed: %s", exc)
        out: list[tuple[UserState | None, list[str]]] = []
        for u, n in zip(user_ids, needed, strict=True):
            if not n:
                out.append((None, []))
                continue
            state, daily = read[u]
            out.append((state, list(merge_recent(state.recent if state else (), daily,
                                                 limit=self.updater.history))))
        return out

    def _events(self, req: FeedbackRequest) -> list[Event]:
        """The request's events, checked against the clock and the rating range (400)."""
        now = time.time()
        low, high = self.config.rating_range
        out = []
        for i, e in enumerate(req.events or []):
            where = f"events[{i}]" if req.user_id is None else "event"
            ts = now if e.timestamp is None else float(e.timestamp)
            if ts > now + self.config.max_clock_skew:
                raise RequestError(400, f"{where}.timestamp is {ts - now:,.0f} s in the future "
                                   f"(at most {self.config.max_clock_skew:g} s of clock skew "
                                   "is allowed)", field=f"{where}.timestamp")
            if e.rating is not None and not low <= e.rating <= high:
                raise RequestError(400, f"{where}.rating {e.rating:g} is outside the data's "
                                   f"rating range {low:g} to {high:g}",
                                   field=f"{where}.rating")
            out.append(Event(e.user_id, e.item_id, ts, e.rating))
        return out

    def _production(self) -> ServedModel:
        model = self.models.production
        if model is None:
            raise RequestError(503, "no model has been accepted yet (the service answers "
                               "/recommend with popular items); see /metadata")
        return model

    async def _feast(self, method: str, *args: Any) -> list[str]:
        """An online-store lookup in a thread; [] when Feast is off or fails."""
        if self.features is None:
            return []
        try:
            return await asyncio.to_thread(getattr(self.features, method), *args)
        except Exception as exc:  # noqa: BLE001 - a lookup failure degrades, never fails
            log.warning("Feast %s failed: %s", method, exc)
            return []

    async def _query(self, model: ServedModel, user_id: str, recent: list[str] | None,
                     feast_recent: list[str] | None, state: UserState | None = None
                     ) -> tuple[torch.Tensor | None, str, list[str]]:
        """The user's vector and the path: the vector their feedback moved, else the model's
        row, else one built from their recent items."""
        recent_rows, ignored = model.item_rows(recent) if recent else ([], [])
        fresh = state.vector_for(model) if state is not None else None
        if fresh is not None:
            return fresh.to(model.device), "fresh", ignored
        row = model.user_row(user_id)
        if row is not None:
            return model.user_vector(row), "user", ignored
        rows, path = recent_rows, "recent_items"
        if not rows:
            rows = model.item_rows(feast_recent)[0] if feast_recent else []
            path = "feast_recent_items"
        if rows and model.melu is not None:  # MeLU adapted to the items: every item's score
            return await self.cold_batcher.submit((model, user_id, list(rows))), "melu", ignored
        if rows:
            return model.mean_item_vector(rows), path, ignored
        return None, "popular", ignored

    # ------------------------------------------------------------------ endpoints

    @bentoml.api(route="/recommend", input_spec=RecommendRequest,
                 output_spec=RecommendResponse)
    async def recommend(self, **request: Any
                        ) -> RecommendResponse | RecommendBatchResponse | JSONResponse:
        """Top-k items for a user (``user_id``), or for many (``users``: one Feast read and
        one matrix product per served model for all of them; the answer is ``{"results":
        [...]}`` in the body's order). Users the model does not know get an embedding from
        their recent items (request, else Feast), else the most popular items."""
        try:
            if request.get("users") is None:
                return await self._recommend(RecommendRequest.model_construct(**request))
            users = [u if isinstance(u, BatchUser) else BatchUser.model_validate(u)
                     for u in request["users"]]
            req = RecommendRequest.model_construct(**{**request, "users": users})
            batch = RecommendBatchResponse(results=await self._recommend_many(
                req.one_user_requests()))
            # The body's own schema (the route's output_spec is the one-user answer).
            return JSONResponse(batch.model_dump(mode="json"))
        except RequestError as exc:
            return exc.response()

    def _needs_state(self, model: ServedModel | None, req: RecommendRequest) -> bool:
        """Whether the user's online state or recent items can change the answer."""
        known = model is not None and model.user_row(req.user_id) is not None
        return self.updater.enabled or req.exclude_seen or not (known or req.recent_items)

    async def _plan(self, req: RecommendRequest, model: ServedModel | None,
                    state: UserState | None, feast_recent: list[str]) -> _Plan:
        """How one user is answered by ``model`` (``_model_for``): the query vector (None:
        popular items), path, the recent items not used and the item rows to leave out."""
        query, path, ignored = (
            (None, "popular", list(req.recent_items or [])) if model is None
            else await self._query(model, req.user_id, req.recent_items, feast_recent, state))
        seen = set(req.recent_items or []) | set(feast_recent or []) if req.exclude_seen else set()
        exclude = model.item_rows(sorted(seen))[0] if model is not None and seen else []
        return _Plan(req, model, query, path, ignored, seen, exclude)

    async def _popular(self, plan: _Plan) -> RecommendResponse:
        req, model = plan.req, plan.model
        popular = await self._feast("popular_items", req.k + len(plan.seen)) or next(
            (m.popular for m in (model, self.models.candidate) if m and m.popular), [])
        items = [v for v in popular if v not in plan.seen][: req.k]
        served = _served_by(model) if model else ServedBy(stage="popularity",
                                                           version="popularity", period="")
        return RecommendResponse(
            user_id=req.user_id, items=items, scores=[1.0 / (r + 1) for r in range(len(items))],
            model=served, path="popular", fallback=True, ignored_items=plan.ignored)

    @staticmethod
    def _answer(plan: _Plan, top: TopK) -> RecommendResponse:
        model = plan.model
        assert model is not None
        return RecommendResponse(
            user_id=plan.req.user_id, items=[model.item_ids[r] for r in top.rows],
            scores=top.scores, model=_served_by(model), path=plan.path,
            fallback=plan.path not in ("user", "fresh"), ignored_items=plan.ignored)

    async def _recommend(self, req: RecommendRequest) -> RecommendResponse:
        model = self._model_for(req.user_id)
        state, feast_recent = await self._state(req.user_id, self._needs_state(model, req))
        plan = await self._plan(req, model, state, feast_recent)
        if plan.query is None or plan.model is None:
            return await self._popular(plan)
        if plan.path == "melu":  # the query is already every item's score
            top = plan.model.top_of(plan.query, req.k, plan.exclude)
        else:
            top = await self.batcher.submit((plan.model, plan.query, req.k, plan.exclude))
        return self._answer(plan, top)

    async def _recommend_many(self, reqs: list[RecommendRequest]) -> list[RecommendResponse]:
        """Many users at once: their states in one online read, new users' MeLU adaptations
        micro-batched together, and one top-k per served model for every ranked user (in a
        thread: a large product must not hold up the event loop)."""
        models = [self._model_for(r.user_id) for r in reqs]
        states = await self._states([r.user_id for r in reqs],
                                    [self._needs_state(m, r) for m, r in zip(models, reqs,
                                                                             strict=True)])
        plans = await asyncio.gather(*(self._plan(r, m, *st) for r, m, st in
                                       zip(reqs, models, states, strict=True)))
        ranked = [i for i, p in enumerate(plans)
                  if p.query is not None and p.model is not None and p.path != "melu"]
        tops = await asyncio.to_thread(_rank_batch, [
            (plans[i].model, plans[i].query, plans[i].req.k, plans[i].exclude)
            for i in ranked]) if ranked else []
        top_of = dict(zip(ranked, tops, strict=True))
        out = []
        for i, plan in enumerate(plans):
            if plan.query is None or plan.model is None:
                out.append(await self._popular(plan))
            elif i in top_of:
                out.append(self._answer(plan, top_of[i]))
            else:  # melu: the query is every item's score
                out.append(self._answer(plan, plan.model.top_of(plan.query, plan.req.k,
                                                                plan.exclude)))
        return out

    @bentoml.api(route="/score", input_spec=ScoreRequest, output_spec=ScoreResponse)
    async def score(self, **request: Any) -> ScoreResponse | JSONResponse:
        """Scores of the given items for a user (404 for item ids the model does not know)."""
        try:
            req = ScoreRequest.model_construct(**request)
            model = self._model_for(req.user_id) or self._production()
            rows, unknown = model.item_rows(req.item_ids)
            if unknown:
                raise RequestError(404, f"unknown item ids: {_preview(unknown)}",
                                   unknown_item_ids=unknown[:100])
            state, feast_recent = await self._state(
                req.user_id, self.updater.enabled
                or not (model.user_row(req.user_id) is not None or req.recent_items))
            query, path, _ = await self._query(model, req.user_id, req.recent_items,
                                               feast_recent, state)
            if query is None:
                raise RequestError(404, f"unknown user {req.user_id!r} and none of their recent "
                                   "items is known: nothing to score with")
            scores = (query[torch.as_tensor(rows, dtype=torch.long)].tolist()
                      if path == "melu" else model.score(query, rows))
            return ScoreResponse(user_id=req.user_id, item_ids=list(req.item_ids),
                                 scores=scores, model=_served_by(model), path=path)
        except RequestError as exc:
            return exc.response()

    @bentoml.api(route="/similar_items", input_spec=SimilarRequest,
                 output_spec=SimilarResponse)
    async def similar_items(self, **request: Any) -> SimilarResponse | JSONResponse:
        """Items closest to an item by cosine similarity of the production embeddings."""
        try:
            req = SimilarRequest.model_construct(**request)
            model = self._production()
            rows, _ = model.item_rows([req.item_id])
            if not rows:
                raise RequestError(404, f"unknown item id {req.item_id!r}")
            top = model.similar(rows[0], req.k)
            return SimilarResponse(item_id=req.item_id, items=[model.item_ids[r] for r in top.rows],
                                   scores=top.scores, model=_served_by(model))
        except RequestError as exc:
            return exc.response()

    @bentoml.api(route="/feedback", input_spec=FeedbackRequest, output_spec=FeedbackResponse)
    async def feedback(self, **request: Any) -> FeedbackResponse | JSONResponse:
        """Record interactions: written durably to the feedback log (the next daily run's
        input) before the answer, then applied to the users' embeddings."""
        try:
            req = FeedbackRequest.model_construct(**request)
            events = self._events(req)
            if self.log is None:
                raise RequestError(503, f"the feedback log is unavailable ({self.log_error}); "
                                   "nothing was recorded")
            try:
                await asyncio.wrap_future(self.log.append(events))
            except StorageError as exc:
                raise RequestError(503, f"{exc}; retry later") from exc
            queued = self.updater.submit(events)
            return FeedbackResponse(accepted=len(events),
                                    periods=sorted({self.log.period(e.timestamp)
                                                    for e in events}),
                                    user_updates=queued if self.updater.enabled else 0)
        except RequestError as exc:
            return exc.response()

    @bentoml.api(route="/metadata", input_spec=Empty, output_spec=Metadata)
    def metadata(self) -> Metadata:
        """The models served (version, period, gate metrics), canary share, features used."""
        production, candidate = self.models.production, self.models.candidate
        features: dict[str, Any] = {
            "online_store": bool(self.features), "error": self.features_error,
            "used": [OnlineFeatures.RECENT, OnlineFeatures.POPULAR,
                     *([f"user_fresh:{f}" for f in FIELDS] if self.features.can_push else [])]
            if self.features else [],
            "repo": self.config.feature_repo, "data": self.config.feature_data,
            "cache": {"ttl_seconds": self.config.feast_ttl,
                      "daily_recent_items": _cache_stats(self.features.daily),
                      "popular_items": _cache_stats(self.features.popular)}
            if self.features else {}}
        decisions = [m.info.decision for m in (production, candidate) if m and m.info.decision]
        last = max(decisions, key=lambda d: str(d.get("recorded_at", "")), default={})
        why = ""
        if production is None:
            why = ("no model has been promoted yet" + (
                f"; the last gate (period {last.get('period')}) decided "
                f"{last.get('decision')}: " + "; ".join(last.get("reasons") or [])
                if last else f"; {self.models.source.name} holds no production model"))
        return Metadata(
            mode="model" if production else "popularity", last_decision=last,
            why_popularity=why,
            production=production.describe() if production else None,
            candidate=candidate.describe() if candidate else None,
            canary_share=self.config.canary_share if candidate else 0.0,
            model_source=self.models.source.name, features=features,
            batching=describe(self.batcher), swaps=self.models.swaps,
            last_check=iso_time(self.models.last_check), last_error=self.models.last_error,
            device=str(self.device),
            feedback={"log": self.log.describe() if self.log else None,
                      "error": self.log_error, "user_updates": self.updater.describe()},
            limits={"max_k": MAX_K, "max_list": MAX_LIST, "max_users": MAX_USERS,
                    "max_id_length": MAX_ID_LENGTH, "max_body_bytes": self.config.max_body_bytes})

    @bentoml.api(route="/reload", input_spec=Empty, output_spec=ReloadResponse)
    def reload(self) -> ReloadResponse:
        """Look for new model versions now (the service also polls on its own)."""
        swapped = self.models.refresh()
        production, candidate = self.models.production, self.models.candidate
        return ReloadResponse(swapped=swapped,
                              production=production.info.version if production else None,
                              candidate=candidate.info.version if candidate else None,
                              last_error=self.models.last_error)


Recommender.add_asgi_middleware(BodyLimit, max_bytes=CONFIG.max_body_bytes)
Recommender.add_asgi_middleware(ApiFront)


@dataclass(frozen=True)
class _Plan:
    """How one user of a /recommend body is answered (see ``Recommender._plan``)."""

    req: RecommendRequest
    model: ServedModel | None
    query: torch.Tensor | None
    path: str
    ignored: list[str]
    seen: set[str]
    exclude: list[int]


def _melu_batch(jobs: list[tuple[ServedModel, str, list[int]]]) -> list[torch.Tensor]:
    """MeLU's adaptation for the batch's new users, one call per model."""
    return by_model(jobs, lambda model, js: model.melu_scores([j[1] for j in js],
                                                               [j[2] for j in js]))


def _rank_batch(jobs: list[tuple[ServedModel, torch.Tensor, int, list[int]]]) -> list[TopK]:
    """One batched top-k per model among the jobs (production and candidate may mix)."""
    return by_model(jobs, lambda model, js: model.topk(torch.stack([j[1] for j in js]),
                                                        [j[2] for j in js], [j[3] for j in js]))
