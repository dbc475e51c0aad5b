"""Where the served models come from, and the hot swap that follows new versions.

Two sources, chosen by ``SMLREC_MODEL_SOURCE``:

- ``bentoml`` (default): the BentoML model store the pipeline's package step writes to.
  Production is the newest ``smlrec-mf`` model, the canary candidate the newest
  ``smlrec-mf-candidate`` model.
- a state-store URI (a folder, ``file://``, ``s3://``, ``gs://``): the pipeline's state store
  itself; production and candidate are what its pointers name. A Bento deployed on a cluster
  uses this to follow promotions without being rebuilt.

:class:`LiveModels` polls the source every few seconds in a background thread. A new
version is loaded (checksums verified) off the request path and swapped in with one
reference assignment; requests in flight finish on the model they started with, so a swap
never fails a request. A version that fails to load is logged and retried at the next
poll while the current model keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from serving.model import STAGES, ModelInfo, ServedModel
from smlrec.registry import StateStore

log = logging.getLogger("smlrec.serving")

PRODUCTION_MODEL = "smlrec-mf"
"""BentoML model name of production models (written by ``components/packaging.py``)."""
CANDIDATE_MODEL = "smlrec-mf-candidate"
"""BentoML model name of candidates, served to the canary share."""
MODEL_NAMES = {"production": PRODUCTION_MODEL, "candidate": CANDIDATE_MODEL}


@dataclass(frozen=True)
class ModelRef:
    """A loadable model version: its version string, period, and a loader."""

    version: str
    period: str
    load: Callable[[torch.device], ServedModel]


class ModelSource(Protocol):
    name: str

    def latest(self) -> dict[str, ModelRef]:
        """The newest version per stage (stages with none are left out)."""
        ...


class BentoStoreSource:
    """Models in the BentoML model store (``$BENTOML_HOME``), newest per name."""

    name = "bentoml"

    def latest(self) -> dict[str, ModelRef]:
        import bentoml

        out = {}
        for stage, model_name in MODEL_NAMES.items():
            try:
                models = bentoml.models.list(model_name)
            except bentoml.exceptions.NotFound:
                continue
            if not models:
                continue
            model = max(models, key=lambda m: m.info.creation_time)
            period = str(model.info.labels.get("period", ""))
            gate = _gate(model.info.metadata.get("gate"))
            info = ModelInfo(stage=stage, version=str(model.tag), period=period, gate=gate,
                             source=self.name,
                             strategy=str(model.info.labels.get("strategy", "")),
                             decision=_gate(model.info.metadata.get("last_decision")))
            path = model.path_of("bundle")
            out[stage] = ModelRef(str(model.tag), period,
                                  lambda device, p=path, i=info: ServedModel.from_bundle(
                                      p, i, device))
        return out


class StateStoreSource:
    """The pipeline's state store: the periods its ``production`` / ``candidate`` pointers name."""

    name = "state"

    def __init__(self, uri: str):
        self.store = StateStore(uri)
        self.name = f"state:{self.store.uri}"

    def latest(self) -> dict[str, ModelRef]:
        from smlrec.daily import serving_choice

        out = {}
        for stage in STAGES:
            period, strategy = serving_choice(self.store, stage)
            if period is None:
                continue
            version = f"state:{period}" + (f":{strategy}" if strategy else "")
            info = ModelInfo(stage=stage, version=version, period=period,
                             source=self.name, strategy=strategy or "")
            out[stage] = ModelRef(info.version, period,
                                  lambda device, i=info: self._load(i, device))
        return out

    def _load(self, info: ModelInfo, device: torch.device) -> ServedModel:
        """Load a pointed-to bundle with its gate scores (the log is read only here, when a
        new version is loaded, not at every poll)."""
        from smlrec.io import read_json
        from smlrec.registry import served_keys

        info = replace(info, gate=self.store.promotion_scores(info.period),
                       decision=self.store.last_decision())
        url = self.store.period_uri(info.period)
        ukey, ikey = served_keys(read_json(f"{url}/metadata.json"), info.strategy or None)
        return ServedModel.from_bundle(url, info, device, user_key=ukey, item_key=ikey)


def _gate(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value) if value else {}
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def make_source(spec: str) -> ModelSource:
    """``"bentoml"`` or a state-store URI."""
    if not spec or spec == "bentoml":
        return BentoStoreSource()
    return StateStoreSource(spec)


class LiveModels:
    """The production and candidate models being served, kept current by a poller.

    ``production`` and ``candidate`` are plain attributes holding immutable
    :class:`ServedModel` objects; a swap is one assignment (atomic under the GIL).
    """

    def __init__(self, source: ModelSource, device: torch.device, reload_seconds: float = 5.0):
        self.source = source
        self.device = device
        self.reload_seconds = reload_seconds
        self.production: ServedModel | None = None
        self.candidate: ServedModel | None = None
        self.swaps = 0
        self.last_check: float = 0.0
        self.last_error: str = ""
        self._lock = threading.Lock()  # one refresh at a time (poller or /reload)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> dict[str, str]:
        """Load any stage whose newest version differs from the one served; return
        ``{stage: version}`` of what was swapped in. Errors are recorded, not raised."""
        swapped: dict[str, str] = {}
        errors: list[str] = []
        with self._lock:
            self.last_check = time.time()
            try:
                refs = self.source.latest()
            except Exception as exc:  # noqa: BLE001 - keep serving what is loaded
                self._fail(f"listing models from {self.source.name}: {exc}")
                return swapped
            for stage in STAGES:
                ref = refs.get(stage)
                current = getattr(self, stage)
                if ref is None:
                    if stage == "candidate" and current is not None:
                        self.candidate = None  # the candidate was withdrawn
                    continue
                if current is not None and current.info.version == ref.version:
                    continue
                try:
                    model = ref.load(self.device)
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"loading {stage} {ref.version}: {exc}")
                    log.error("%s; still serving the loaded models", errors[-1])
                    continue
                setattr(self, stage, model)
                self.swaps += 1
                swapped[stage] = ref.version
                log.info("serving %s model %s (period %s)", stage, ref.version, ref.period)
            self.last_error = "; ".join(errors)
        return swapped

    def _fail(self, message: str) -> None:
        self.last_error = message
        log.error("%s; still serving the loaded models", message)

    def start(self) -> None:
        """Start the background poller (a daemon thread)."""
        if self._thread is not None or self.reload_seconds <= 0:
            return
        self._thread = threading.Thread(target=self._poll, name="smlrec-model-poller",
                                        daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
