"""The served model: MF embeddings on the device, id maps, top-k by batched matrix product.

Pure torch (no BentoML here), so the same code is timed in-process by the serving benchmark
and called by the HTTP service. A :class:`ServedModel` is immutable once built: a hot swap
replaces the whole object, and a request that took a reference keeps a consistent model to
the end.

Top-k is exact (one matrix product over every item) unless the bundle ships an approximate
index (``smlrec.ann``, built and gated at packaging for large catalogues): then
:meth:`ServedModel.topk` answers from one batched index search, and exactly for requests
larger than the k the index was measured at and for queries left short by their exclusions.
``SMLREC_ANN=off`` forces exact search. ``ServedModel.ann_info`` says which answers.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import torch

from smlrec import ann
from smlrec.coldstart import META_KEY, SERVE_PREFIX, ServedMeLU
from smlrec.io import load_bundle
from smlrec.vocab import Vocab

STAGES = ("production", "candidate")
SCORE_CELLS = 1 << 25
"""Most cells (queries x items) of one exact score matrix: 128 MiB of float32."""


def iso_time(seconds: float) -> str | None:
    """A Unix time as ISO 8601 in UTC, to the second (None for 0: never)."""
    if not seconds:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class ModelInfo:
    """What answers: stage, version (a BentoML tag or ``state:<period>``), period, gate."""

    stage: str
    version: str
    period: str
    gate: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    loaded_at: float = field(default_factory=time.time)
    strategy: str = ""
    decision: dict[str, Any] = field(default_factory=dict)
    """The newest gate decision when this version was packaged (or loaded from the store)."""


@dataclass(frozen=True)
class TopK:
    """One request's answer: item rows (best first) and their scores."""

    rows: list[int]
    scores: list[float]


def canary_bucket(user_id: str) -> float:
    """A stable number in [0, 1) for ``user_id`` (sha256, so the same on every worker and
    every restart, unlike Python's salted ``hash``). Users below the canary share go to the
    candidate."""
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ServedModel:
    """User and item embeddings (W = U, V) of one model version, ready to rank on ``device``.

    ``popular`` is the packaged list of the latest period's most popular item ids, the
    fallback for users nothing is known about when no online feature store is configured.
    ``prior_column``: the last column is the blend (users' 1, items' λ·log1p(popularity));
    a user built from items gets 1 there, and item similarity leaves it out.
    """

    def __init__(self, user: torch.Tensor, item: torch.Tensor, users: Vocab, items: Vocab,
                 info: ModelInfo, popular: Sequence[str] = (), device: torch.device | str = "cpu",
                 prior_column: bool = False, melu: ServedMeLU | None = None,
                 freshness: dict[str, Any] | None = None, index: ann.AnnIndex | None = None,
                 exact_reason: str = ""):
        if user.ndim != 2 or item.ndim != 2 or user.shape[1] != item.shape[1]:
            raise ValueError(f"embedding shapes do not match: user {tuple(user.shape)}, "
                             f"item {tuple(item.shape)}")
        if user.shape[0] < len(users) or item.shape[0] < len(items):
            raise ValueError("the vocabularies are larger than the embedding tables")
        self.device = torch.device(device)
        self.user = user.detach().to(self.device, torch.float32).contiguous()
        self.item = item.detach().to(self.device, torch.float32)[: len(items)].contiguous()
        self.prior_column = prior_column
        self.latent = self.item[:, :-1] if prior_column else self.item
        self.item_norm = self.latent.norm(dim=1).clamp_min(1e-12)
        self.info = info
        self.item_ids: list[str] = items.ids
        self._user_row = {u: i for i, u in enumerate(users.ids)}
        self._item_row = {v: i for i, v in enumerate(self.item_ids)}
        self.popular = list(popular)  # real items of the latest period, known to the model or not
        # The cold-start model packaged beside this one; it answers users the model does not
        # know only when the gate found it better than the mean embedding (its cold path).
        self.melu = melu if melu is not None and melu.path == "melu" else None
        # The run configuration's per-event settings (``freshness:``), packaged with it.
        self.freshness: dict[str, Any] = dict(freshness or {})
        # The approximate index shipped with the model (None: exact search, for the reason
        # ``exact_reason`` gives); its rows are the item rows, built over the same table.
        self.index = index
        self.exact_reason = exact_reason or "no approximate index in the package"
        if index is not None and (index.ntotal != self.n_items or index.dim != self.dim):
            self.exact_reason = (f"the index ({index.ntotal} x {index.dim}) does not match "
                                 f"the item table ({self.n_items} x {self.dim})")
            self.index = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_bundle(cls, url: str, info: ModelInfo, device: torch.device | str = "cpu",
                    user_key: str = "user", item_key: str = "item") -> ServedModel:
        """Load a bundle (``smlrec.io``: safetensors, sha256 manifest verified, nothing
        unpickled) holding ``user``/``item`` tensors and the two vocabularies."""
        tensors, meta, files = load_bundle(url)
        popular = json.loads(files["popular.json"]) if "popular.json" in files else []
        strategy = info.strategy or str(meta.get("strategy", ""))
        challenger = (meta.get("challengers") or {}).get(strategy, {})
        prior_column = bool(meta.get("prior_column", challenger.get("prior_column", False)))
        info = replace(info, period=info.period or str(meta.get("period", "")),
                       gate=info.gate or dict(meta.get("gate") or {}), loaded_at=time.time(),
                       strategy=strategy)
        melu = (ServedMeLU(tensors, meta, files, device)
                if f"{SERVE_PREFIX}user" in tensors and META_KEY in meta else None)
        index, exact_reason = load_index(files, device)
        return cls(tensors[user_key], tensors[item_key],
                   Vocab.from_json(files["vocab_users.json"].decode()),
                   Vocab.from_json(files["vocab_items.json"].decode()),
                   info, popular, device, prior_column, melu, meta.get("freshness"), index,
                   exact_reason)

    # ------------------------------------------------------------------ lookups

    @property
    def dim(self) -> int:
        return int(self.item.shape[1])

    @property
    def n_users(self) -> int:
        return len(self._user_row)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_row(self, user_id: str) -> int | None:
        return self._user_row.get(user_id)

    def item_rows(self, item_ids: Sequence[str]) -> tuple[list[int], list[str]]:
        """Rows of the known ids (in order, duplicates kept) and the unknown ids."""
        rows, unknown = [], []
        for v in item_ids:
            r = self._item_row.get(v)
            if r is None:
                unknown.append(v)
            else:
                rows.append(r)
        return rows, unknown

    def user_vector(self, row: int) -> torch.Tensor:
        return self.user[row]

    def mean_item_vector(self, rows: Sequence[int]) -> torch.Tensor:
        """A user built in real time: the mean embedding of the items they interacted with."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        query = self.item.index_select(0, index).mean(dim=0)
        if self.prior_column:
            query[-1] = 1.0  # the blend applies in full, as for a known user
        return query

    def melu_scores(self, user_ids: Sequence[str], rows: Sequence[Sequence[int]]
                    ) -> torch.Tensor:
        """Every item's score (B, n_items) for users the model does not know, from MeLU
        adapted to the item rows each interacted with, in one batch (the cold path;
        ``self.melu`` must be set)."""
        assert self.melu is not None
        return self.melu.scores_many(list(user_ids), [list(r) for r in rows])[:, : self.n_items]

    # ------------------------------------------------------------------ ranking

    @staticmethod
    def top_of(scores: torch.Tensor, k: int, exclude: Sequence[int] = ()) -> TopK:
        """The ``k`` best items of one score vector, ``exclude`` left out."""
        return _top(scores.clone().unsqueeze(0), [k], [exclude])[0]

    @torch.inference_mode()
    def topk(self, queries: torch.Tensor, ks: Sequence[int],
             exclude: Sequence[Sequence[int]] = ()) -> list[TopK]:
        """Top-``ks[i]`` items for each query vector, in one matrix product on the device.

        ``queries`` is (B, d); ``exclude[i]`` lists item rows never to return for query i.
        Fewer than k items come back only when the catalogue (minus exclusions) is smaller.
        """
        queries = queries.to(self.device, torch.float32).reshape(-1, self.dim)
        exclude = list(exclude) + [[]] * (len(ks) - len(exclude))
        if self.index is None or not len(ks) or max(ks) > self.index.max_k:
            return self._exact(queries, ks, exclude)
        found = self.index.search(queries, ks, exclude)
        short = [i for i, f in enumerate(found) if f is None]
        exact = iter(self._exact(queries[short], [ks[i] for i in short],
                                 [exclude[i] for i in short]) if short else [])
        return [next(exact) if f is None else TopK(f[0], f[1]) for f in found]

    def _exact(self, queries: torch.Tensor, ks: Sequence[int],
               exclude: Sequence[Sequence[int]]) -> list[TopK]:
        """Exact top-k by matrix product, in chunks of queries whose score matrix stays
        within ``SCORE_CELLS`` (many users at 10^6 items would need gigabytes at once)."""
        step = max(1, SCORE_CELLS // max(1, self.n_items))
        out: list[TopK] = []
        for s in range(0, len(ks), step):
            out += _top(queries[s:s + step] @ self.item.T, ks[s:s + step], exclude[s:s + step])
        return out

    @property
    def ann_info(self) -> dict[str, Any]:
        """Which top-k answers: ``{"method": "ann", kind, params, recall, latency, counts}``
        from the packaged index, or ``{"method": "exact", "reason": ...}``."""
        if self.index is None:
            return {"method": "exact", "reason": self.exact_reason}
        return self.index.describe()

    @torch.inference_mode()
    def score(self, query: torch.Tensor, item_rows: Sequence[int]) -> list[float]:
        """Dot-product scores of ``item_rows`` for one query vector."""
        index = torch.as_tensor(list(item_rows), dtype=torch.long, device=self.device)
        return (self.item.index_select(0, index) @ query.to(self.device)).cpu().tolist()

    @torch.inference_mode()
    def similar(self, item_row: int, k: int) -> TopK:
        """The ``k`` items whose embeddings have the highest cosine similarity to ``item_row``
        (the item itself excluded)."""
        cos = (self.latent @ self.latent[item_row]) / (self.item_norm
                                                        * self.item_norm[item_row])
        cos[item_row] = float("-inf")
        kk = min(k, self.n_items - 1)
        if kk <= 0:
            return TopK([], [])
        values, index = torch.topk(cos, kk)
        return TopK(index.cpu().tolist(), values.cpu().tolist())

    def describe(self) -> dict[str, Any]:
        """What ``/metadata`` says about this model."""
        return {"stage": self.info.stage, "version": self.info.version,
                "period": self.info.period, "strategy": self.info.strategy,
                "gate": self.info.gate or (
                    {"note": "not gated yet: a candidate is scored on the period after the "
                     "one it was trained on, at the next daily run"}
                    if self.info.stage == "candidate" else {}),
                "source": self.info.source,
                "loaded_at": iso_time(self.info.loaded_at), "n_users": self.n_users,
                "n_items": self.n_items, "dim": self.dim, "device": str(self.device),
                "cold_path": "melu" if self.melu is not None else "mean embedding of recent "
                "items", "top_k": self.ann_info}


def load_index(files: dict[str, bytes], device: torch.device | str = "cpu"
               ) -> tuple[ann.AnnIndex | None, str]:
    """The bundle's approximate index (``ann.faiss`` with its report ``ann.json``), or None
    and why search stays exact (none packaged, or ``SMLREC_ANN=off``)."""
    report = json.loads(files[ann.REPORT_FILE]) if ann.REPORT_FILE in files else None
    if ann.INDEX_FILE not in files or report is None:
        reason = (report or {}).get("reason") or "no approximate index in the package"
        return None, str(reason)
    if not ann.enabled():
        return None, "SMLREC_ANN=off: exact search forced"
    return ann.AnnIndex.from_bytes(files[ann.INDEX_FILE], report, device), ""


def _top(scores: torch.Tensor, ks: Sequence[int], exclude: Sequence[Sequence[int]]
         ) -> list[TopK]:
    """Top-``ks[i]`` of each row of ``scores`` (B, n_items; changed in place), the items of
    ``exclude[i]`` left out; fewer than k only when the row has fewer scorable items."""
    rows_ex = [i for i, ex in enumerate(exclude) for _ in ex]
    cols_ex = [c for ex in exclude for c in ex]
    if cols_ex:
        scores[torch.as_tensor(rows_ex, device=scores.device),
               torch.as_tensor(cols_ex, device=scores.device)] = float("-inf")
    kmax = min(max(ks), scores.shape[1])
    values, index = torch.topk(scores, kmax, dim=1)
    values, index = values.cpu().tolist(), index.cpu().tolist()
    out = []
    for i, k in enumerate(ks):
        keep = [j for j in range(min(k, kmax)) if values[i][j] != float("-inf")]
        out.append(TopK([index[i][j] for j in keep], [values[i][j] for j in keep]))
    return out
