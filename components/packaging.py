"""Package the production model into the BentoML model store (the serving side's input)."""

from __future__ import annotations

import json
import os

from smlrec.errors import SmlrecError
from smlrec.io import save_bundle
from smlrec.registry import StateStore

MODEL_NAME = "smlrec-mf"


def package_production(state_uri: str, decided_in: str | None = None) -> str:
    """Store the production model's serving weights (W = U, V), its vocabularies and its gate
    metrics as a BentoML model labelled with stage and period. Idempotent: a period that is
    already packaged is not packaged again. Returns the model tag."""
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    store = StateStore(state_uri)
    period = store.get_pointer("production")
    if period is None:
        raise SmlrecError(f"{state_uri}: no production model to package")
    try:
        existing = bentoml.models.list(MODEL_NAME)
    except bentoml.exceptions.NotFound:  # the first model of this name
        existing = []
    for model in existing:
        if model.info.labels.get("period") == period:
            return str(model.tag)
    tensors, meta, users, items = store.load_period(period)  # checksums verified here
    decisions = [d for d in store.decisions()
                 if d.get("candidate") == period and d.get("decision") == "promote"]
    scores = decisions[-1]["scores"] if decisions else {}
    metadata = {"period": period, "decided_in": decided_in or "", "dim": int(
        tensors["w.user"].shape[1]), "n_users": len(users), "n_items": len(items),
        "gate": json.dumps(scores)}
    with bentoml.models.create(MODEL_NAME, labels={"stage": "production", "period": period},
                               metadata=metadata) as model:
        save_bundle(model.path_of("bundle"),
                    {"user": tensors["w.user"], "item": tensors["w.item"]},
                    {"period": period, "gate": scores},
                    {"vocab_users.json": users.to_json().encode(),
                     "vocab_items.json": items.to_json().encode()})
    return str(model.tag)
