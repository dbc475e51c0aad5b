"""The smlrec prediction API: a BentoML 1.4 service over the accepted MF models.

Start it with ``make serve`` (``bentoml serve serving.service:Recommender``, 127.0.0.1:3000).
Endpoints (all POST with a JSON body; the OpenAPI page is at ``/docs``, its document at
``/docs.json``; ``serving/http.py`` says what they add to BentoML's):

- ``/recommend`` {user_id, k, exclude_seen, recent_items?}: top-k items;
- ``/score`` {user_id, item_ids, recent_items?}: scores of given items;
- ``/similar_items`` {item_id, k}: nearest items by cosine similarity of embeddings;
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
``SMLREC_WORKERS``         worker processes (default 1)
``SMLREC_DEVICE``          ``auto`` (default: CUDA when present), ``cpu``, ``cuda``
``SMLREC_THREADS``         torch CPU threads per worker (default 1)
=========================  ===========================================================
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import bentoml
import torch
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from serving.batching import MicroBatcher, describe
from serving.http import ApiFront, install_log_filter
from serving.limits import BodyLimit
from serving.model import ServedModel, TopK, canary_bucket, iso_time
from serving.schemas import (
    MAX_ID_LENGTH,
    MAX_K,
    MAX_LIST,
    Empty,
    Metadata,
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
from smlrec.device import configure_threads, pick_device

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
    batch_thread: bool = False
    access_log: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServingConfig:
        env = dict(os.environ if env is None else env)
        names = {"model_source": "SMLREC_MODEL_SOURCE", "canary_share": "SMLREC_CANARY_SHARE",
                 "reload_seconds": "SMLREC_RELOAD_SECONDS",
                 "feature_repo": "SMLREC_FEATURE_REPO", "feature_data": "SMLREC_FEATURE_DATA",
                 "max_batch": "SMLREC_MAX_BATCH", "batch_wait_ms": "SMLREC_BATCH_WAIT_MS",
                 "workers": "SMLREC_WORKERS", "batch_thread": "SMLREC_BATCH_THREAD",
                 "access_log": "SMLREC_ACCESS_LOG", "max_body_bytes": "SMLREC_MAX_BODY_BYTES"}
        return cls(**{field: env[var] for field, var in names.items() if env.get(var)})


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


def _served_by(model: ServedModel) -> ServedBy:
    return ServedBy(stage=model.info.stage, version=model.info.version, period=model.info.period,
                    strategy=model.info.strategy)


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
    """Reads the user's recent items and the popular items from the Feast online store."""

    RECENT = "recent_items:recent_items"
    POPULAR = "top_items:top_items"  # read by FeatureStoreAdapter.popular_items

    def __init__(self, repo: str, data: str):
        from adapters.feast_store import FeatureStoreAdapter

        self.repo, self.data = repo, data
        self.adapter = FeatureStoreAdapter(repo, data)

    def recent_items(self, user_id: str) -> list[str]:
        from smlrec.features import split_ids

        frame = self.adapter.online_features(
            user_ids=[user_id], features=[self.RECENT])["user_id"]
        return split_ids(frame[self.RECENT.replace(":", "__")].iloc[0])

    def popular_items(self, k: int) -> list[str]:
        return self.adapter.popular_items(k)


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
                self.features = OnlineFeatures(self.config.feature_repo, self.config.feature_data)
            except Exception as exc:  # noqa: BLE001 - serve without Feast, say so in /metadata
                self.features_error = f"{type(exc).__name__}: {exc}"
                log.error("Feast online store unavailable: %s", self.features_error)
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
                     feast_recent: list[str] | None) -> tuple[torch.Tensor | None, str, list[str]]:
        """The user's vector and the path: the model's row, else the mean of recent items."""
        recent_rows, ignored = model.item_rows(recent) if recent else ([], [])
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
    async def recommend(self, **request: Any) -> RecommendResponse | JSONResponse:
        """Top-k items for a user. Users the model does not know get an embedding from their
        recent items (request, else Feast), else the most popular items."""
        try:
            return await self._recommend(RecommendRequest.model_construct(**request))
        except RequestError as exc:
            return exc.response()

    async def _recommend(self, req: RecommendRequest) -> RecommendResponse:
        model = self._model_for(req.user_id)
        known = model is not None and model.user_row(req.user_id) is not None
        feast_recent = None
        if (req.exclude_seen or (not known and not req.recent_items)) and self.features:
            feast_recent = await self._feast("recent_items", req.user_id)
        query, path, ignored = (
            (None, "popular", list(req.recent_items or [])) if model is None
            else await self._query(model, req.user_id, req.recent_items, feast_recent))
        seen = set(req.recent_items or []) | set(feast_recent or []) if req.exclude_seen else set()
        if query is None or model is None:
            popular = await self._feast("popular_items", req.k + len(seen)) or next(
                (m.popular for m in (model, self.models.candidate) if m and m.popular), [])
            items = [v for v in popular if v not in seen][: req.k]
            served = _served_by(model) if model else ServedBy(stage="popularity",
                                                               version="popularity", period="")
            return RecommendResponse(
                user_id=req.user_id, items=items, scores=[1.0 / (r + 1) for r in
                                                          range(len(items))],
                model=served, path="popular", fallback=True, ignored_items=ignored)
        exclude, _ = model.item_rows(sorted(seen))
        if path == "melu":  # the query is already every item's score
            top = model.top_of(query, req.k, exclude)
        else:
            top = await self.batcher.submit((model, query, req.k, exclude))
        return RecommendResponse(
            user_id=req.user_id, items=[model.item_ids[r] for r in top.rows], scores=top.scores,
            model=_served_by(model), path=path, fallback=path != "user", ignored_items=ignored)

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
            feast_recent = None
            if model.user_row(req.user_id) is None and not req.recent_items:
                feast_recent = await self._feast("recent_items", req.user_id)
            query, path, _ = await self._query(model, req.user_id, req.recent_items,
                                               feast_recent)
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

    @bentoml.api(route="/metadata", input_spec=Empty, output_spec=Metadata)
    def metadata(self) -> Metadata:
        """The models served (version, period, gate metrics), canary share, features used."""
        production, candidate = self.models.production, self.models.candidate
        features: dict[str, Any] = {
            "online_store": bool(self.features), "error": self.features_error,
            "used": [OnlineFeatures.RECENT, OnlineFeatures.POPULAR] if self.features else [],
            "repo": self.config.feature_repo, "data": self.config.feature_data}
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
            limits={"max_k": MAX_K, "max_list": MAX_LIST, "max_id_length": MAX_ID_LENGTH,
                    "max_body_bytes": self.config.max_body_bytes})

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


def _by_model(jobs: Sequence[tuple], run: Callable[[Any, list[tuple]], Sequence[Any]]
              ) -> list[Any]:
    """``run(model, its jobs)`` once per model among the jobs (production and candidate
    may mix in a batch); the answers in the jobs' order."""
    out: list[Any] = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job[0]), []).append(i)
    for idx in groups.values():
        answers = run(jobs[idx[0]][0], [jobs[i] for i in idx])
        for i, answer in zip(idx, answers, strict=True):
            out[i] = answer
    return out


def _melu_batch(jobs: list[tuple[ServedModel, str, list[int]]]) -> list[torch.Tensor]:
    """MeLU's adaptation for the batch's new users, one call per model."""
    return _by_model(jobs, lambda model, js: model.melu_scores([j[1] for j in js],
                                                               [j[2] for j in js]))


def _rank_batch(jobs: list[tuple[ServedModel, torch.Tensor, int, list[int]]]) -> list[TopK]:
    """One batched top-k per model among the jobs (production and candidate may mix)."""
    return _by_model(jobs, lambda model, js: model.topk(torch.stack([j[1] for j in js]),
                                                        [j[2] for j in js], [j[3] for j in js]))
