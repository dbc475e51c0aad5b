"""Package models into the BentoML model store (the serving side's input).

Two model names, one per stage: ``smlrec-mf`` holds production models (what the service's
``BentoModel("smlrec-mf:latest")`` and ``bentoml build`` pick up), ``smlrec-mf-candidate``
the newest candidates, which the service gives to its canary share of users. Each model is
a bundle (safetensors weights ``user`` / ``item``: the tables the strategy serves, U' =
[U, 1] and V' = [V, λ·log1p(pop)] where it blends; the id vocabularies, the period's most
popular items, a sha256 manifest) labelled with stage, period and strategy.

Large catalogues get an approximate top-k index (``smlrec.ann``): from
``SMLREC_ANN_MIN_ITEMS`` items on, a FAISS inner-product index is built over the served item
table, measured against exact search on a sample of the model's user rows, and gated: a
model whose index misses the recall or the latency budget is refused (``AnnGateError``)
before anything is written to the model store (and the daily gate, ``smlrec.daily.gate``,
measured the same before promoting it, so production never names such a model). The index
(``ann.faiss``) and its report (``ann.json``, also in the model's metadata as ``ann``)
travel in the bundle; below the threshold the report says search is exact. Settings, from
the environment:

==========================  ==========================================================
``SMLREC_ANN``              ``off``: build no index (exact search); default on
``SMLREC_ANN_MIN_ITEMS``    items from which an index is built (default 50000)
``SMLREC_ANN_RECALL``       recall@10 and recall@100 the index must reach, against
                            exact search on the sampled users (default 0.95)
``SMLREC_ANN_BUDGET_MS``    largest p99 latency of one query at batch 1 (default 10)
``SMLREC_ANN_USERS``        user rows sampled to measure on (default 500)
``SMLREC_ANN_KINDS``        index kinds to try, comma-separated (default
                            ``ivf_flat,hnsw_flat``; HNSW only up to 200,000 items)
``SMLREC_THREADS``          FAISS (and torch) threads while measuring (default 1, as
                            one service worker)
==========================  ==========================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

from smlrec import ann
from smlrec.errors import SmlrecError
from smlrec.faults import failpoint
from smlrec.io import save_bundle
from smlrec.registry import StateStore

MODEL_NAME = "smlrec-mf"
CANDIDATE_MODEL_NAME = "smlrec-mf-candidate"
NAMES = {"production": MODEL_NAME, "candidate": CANDIDATE_MODEL_NAME}
POPULAR_K = 100


def popular_items(data_uri: str, period: str, k: int = POPULAR_K) -> list[str]:
    """The ``k`` most interacted-with item ids of ``period`` in the data store (ties by id)."""
    from smlrec.data.store import read_period
    from smlrec.schema import ITEM

    items = read_period(data_uri, period, columns=[ITEM])[ITEM].astype(str)
    counts = items.value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [item for item, _ in ranked[:k]]


def package(state_uri: str, stage: str = "production", decided_in: str | None = None,
            data_uri: str = "") -> str:
    """Store the model the ``stage`` serves (its served tables: W = (U, V) with the blend
    column where the strategy blends, the vocabularies, the gate's scores and, with
    ``data_uri``, period ``decided_in``'s popular items) as a BentoML model labelled with
    stage, period and strategy. Idempotent: a (period, strategy) already packaged for the
    stage is not packaged again. Returns the model tag."""
    if stage not in NAMES:
        raise ValueError(f"stage must be production or candidate, not {stage!r}")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    from smlrec.daily import load_config, serving_choice
    from smlrec.registry import served_keys

    name = NAMES[stage]
    store = StateStore(state_uri)
    period, strategy = serving_choice(store, stage)
    if period is None:
        raise SmlrecError(f"{state_uri}: no {stage} model to package")
    tensors, meta, users, items = store.load_period(period)  # checksums verified here
    ukey, ikey = served_keys(meta, strategy)
    strategy = strategy or (next(iter(meta["challengers"])) if meta.get("challengers")
                            else "")
    try:
        existing = bentoml.models.list(name)
    except bentoml.exceptions.NotFound:  # the first model of this name
        existing = []
    record = {"stage": stage, "period": period, "strategy": strategy,
              "decided_in": decided_in or ""}
    for model in existing:
        if (model.info.labels.get("period") == period
                and model.info.labels.get("strategy", "") == strategy):
            store.record_package({**record, "tag": str(model.tag)})  # once per tag
            return str(model.tag)
    scores = store.promotion_scores(period)
    prior_column = bool((meta.get("challengers") or {}).get(strategy, {}).get("prior_column"))
    popular = popular_items(data_uri, decided_in) if data_uri and decided_in else []
    metadata = {"period": period, "strategy": strategy, "decided_in": decided_in or "",
                "dim": int(tensors[ukey].shape[1]), "n_users": len(users),
                "n_items": len(items), "prior_column": prior_column,
                "gate": json.dumps(scores), "last_decision": json.dumps(store.last_decision())}
    cold_t, cold_meta, cold_files = cold_parts(store, tensors, meta, data_uri, items, period,
                                               decided_in)
    metadata["cold_path"] = cold_meta.get("cold_path", "")
    # Built and gated before the model store is touched: a refusal leaves nothing behind.
    ann_files, report = ann_parts(tensors[ukey][: len(users)], tensors[ikey][: len(items)])
    metadata["ann"] = json.dumps(report)
    fresh = load_config(store).freshness
    with bentoml.models.create(name, labels={"stage": stage, "period": period,
                                             "strategy": strategy},
                               metadata=metadata) as model:
        save_bundle(model.path_of("bundle"),
                    {"user": tensors[ukey], "item": tensors[ikey], **cold_t},
                    {"period": period, "stage": stage, "strategy": strategy,
                     "prior_column": prior_column, "gate": scores, **cold_meta,
                     **({"freshness": fresh.model_dump()} if fresh else {})},
                    {"vocab_users.json": users.to_json().encode(),
                     "vocab_items.json": items.to_json().encode(),
                     "popular.json": json.dumps(popular).encode(), **cold_files,
                     **ann_files})
        failpoint("package.inside", stage)  # BentoML commits the model when the block exits
    store.record_package({**record, "tag": str(model.tag)})
    return str(model.tag)


def ann_parts(user: Any, item: Any) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The bundle files of the approximate top-k index for the served ``item`` table (the
    index, where one is built, and its report) and the report; ``AnnGateError`` when the
    index fails its gate. Settings from ``SMLREC_ANN*`` (module docstring)."""
    index, built = ann.prepare(item, user)
    report = built.to_dict()
    files = {ann.REPORT_FILE: json.dumps(report, indent=2).encode()}
    if index is not None:
        files[ann.INDEX_FILE] = index.to_bytes()
    return files, report


def cold_parts(store: StateStore, tensors: dict, meta: dict, data_uri: str, items: Any,
               period: str, decided_in: str | None) -> tuple[dict, dict, dict]:
    """The cold-start model packaged beside the served one (``smlrec.coldstart``), with the
    cold path the gate chose for it (at the gate of ``decided_in``; none before a gate, so a
    candidate answers new users by the mean embedding). Empty without a data store (the
    side tables are read from it) or without a cold-start model in the bundle."""
    from smlrec import coldstart
    from smlrec.daily import load_config

    if not data_uri or not meta.get(coldstart.META_KEY):
        return {}, {}, {}
    decision = next((d for d in reversed(store.decisions())
                     if d.get("candidate") == period and d.get("cold")), None)
    path = str(decision["cold"].get("path", "")) if decision and decided_in else ""
    return coldstart.serving_parts(tensors, meta, data_uri, items, decided_in or period, path,
                                   load_config(store))


def package_production(state_uri: str, decided_in: str | None = None, data_uri: str = "") -> str:
    """Package the production model (see :func:`package`)."""
    return package(state_uri, "production", decided_in, data_uri)
