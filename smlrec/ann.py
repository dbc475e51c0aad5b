"""Approximate top-k for large catalogues: a FAISS inner-product index over the served items.

The service ranks items by the dot product of a query row with every item row (the whole
row, the blend column included: users carry 1 there, items λ·log1p(popularity)). Below
``min_items`` items that exact product is cheap and no index is built. Above it,
:func:`build` measures a small grid of index kinds and settings on a sample of the model's
own user rows, against exact search, and keeps the fastest setting whose recall reaches the
threshold at k (10) and at a larger k (100) and whose per-query p99 latency at batch 1 stays
within the budget; when none does, the report says why and :func:`gate` refuses it.

Kinds: ``ivf_flat`` (``IndexIVFFlat``, nlist ≈ 4·√n, trained on a sample of the items,
``nprobe`` searched over powers of two) at every size; ``hnsw_flat`` (``IndexHNSWFlat``,
``M`` = 32, ``efSearch`` over powers of two) up to ``hnsw_max_items`` only, as its build is
slow (at 100,000 items x d = 64, 11-13 s on one core, against about 1.5 s for IVF; at
1,000,000 items minutes, against about 20 s for IVF). On inner products HNSW needed
``efSearch`` 512-1024 for recall@100 0.95 where IVF needed ``nprobe`` 64 of 1,264 lists, so
IVF is what the measurement has chosen so far.

Pure torch, numpy and faiss (no BentoML, Feast or KFP): packaging builds the index and ships
it as bytes in the model bundle (:meth:`AnnIndex.to_bytes`); serving loads it back
(:meth:`AnnIndex.from_bytes`) and searches it with exclusions, falling back to exact search
for a query that has fewer than k items left. FAISS's OpenMP threads follow the service's
setting (``SMLREC_THREADS``, default 1 per worker).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from smlrec.errors import SmlrecError

INDEX_FILE = "ann.faiss"
REPORT_FILE = "ann.json"
KINDS = ("ivf_flat", "hnsw_flat")
OFF = ("off", "0", "false", "no", "exact")


class AnnGateError(SmlrecError):
    """The approximate index of a model failed its gate (recall or latency); not packaged."""

    def __init__(self, report: AnnReport):
        self.report = report
        super().__init__(f"approximate top-k index refused: {report.reason}")


def enabled() -> bool:
    """False when ``SMLREC_ANN`` turns approximate search off (``off``, ``0``, ``false``)."""
    return os.environ.get("SMLREC_ANN", "on").strip().lower() not in OFF


def set_threads(n: int | None = None) -> int:
    """FAISS's OpenMP threads: ``n``, else ``$SMLREC_THREADS``, else 1 (as the service's
    torch threads, ``smlrec.device.configure_threads``)."""
    n = n or int(os.environ.get("SMLREC_THREADS", "1"))
    faiss.omp_set_num_threads(max(1, n))
    return max(1, n)


@dataclass(frozen=True)
class AnnSettings:
    """What to build and what it must reach. ``from_env`` reads the ``SMLREC_ANN_*``
    variables (see ``components/packaging.py``)."""

    min_items: int = 50_000
    recall: float = 0.95
    budget_ms: float = 10.0
    k: int = 10
    k_large: int = 100
    users: int = 500
    latency_queries: int = 200
    kinds: tuple[str, ...] = KINDS
    hnsw_max_items: int = 200_000
    hnsw_m: tuple[int, ...] = (32,)
    ef_construction: int = 40
    train_per_list: int = 40
    seed: int = 0

    @classmethod
    def from_env(cls) -> AnnSettings:
        env = os.environ
        kinds = tuple(v.strip() for v in env.get("SMLREC_ANN_KINDS", ",".join(KINDS)).split(",")
                      if v.strip())
        unknown = [v for v in kinds if v not in KINDS]
        if unknown or not kinds:
            raise SmlrecError(f"SMLREC_ANN_KINDS: {','.join(unknown) or 'empty'} not among "
                              f"{', '.join(KINDS)}")
        try:
            return cls(min_items=int(env.get("SMLREC_ANN_MIN_ITEMS", cls.min_items)),
                       recall=float(env.get("SMLREC_ANN_RECALL", cls.recall)),
                       budget_ms=float(env.get("SMLREC_ANN_BUDGET_MS", cls.budget_ms)),
                       users=int(env.get("SMLREC_ANN_USERS", cls.users)), kinds=kinds)
        except ValueError as exc:
            raise SmlrecError(f"SMLREC_ANN_* settings: {exc}") from exc


@dataclass
class AnnReport:
    """What was built (or why not), how it was measured, and the gate's verdict."""

    method: str  # "ann": an index answers; "exact": the full product does
    kind: str = ""
    params: dict[str, int] = field(default_factory=dict)
    n_items: int = 0
    dim: int = 0
    k: int = 10
    k_large: int = 100
    recall_at_k: float | None = None
    recall_at_k_large: float | None = None
    users: int = 0  # sampled user rows the recall and latency were measured on
    index_p50_ms: float | None = None
    index_p99_ms: float | None = None
    exact_p50_ms: float | None = None
    exact_p99_ms: float | None = None
    build_s: float = 0.0  # building the chosen index
    measure_s: float = 0.0  # building and measuring every index tried
    threads: int = 1
    recall_threshold: float = 0.95
    budget_ms: float = 10.0
    passed: bool = True
    reason: str = ""
    tried: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AnnReport:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def summary(self) -> str:
        if self.method != "ann":
            return f"exact search ({self.reason})"
        return (f"{self.kind} {self.params}: recall@{self.k} {_f(self.recall_at_k)}, "
                f"recall@{self.k_large} {_f(self.recall_at_k_large)} on {self.users} users; "
                f"p50 {_f(self.index_p50_ms)} ms, p99 {_f(self.index_p99_ms)} ms per query "
                f"(exact {_f(self.exact_p50_ms)} / {_f(self.exact_p99_ms)} ms); built in "
                f"{self.build_s:.1f} s, {self.measure_s:.1f} s with the measurements")


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------- building


def _f32(t: torch.Tensor | np.ndarray) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy() if isinstance(t, torch.Tensor) else t
    return np.ascontiguousarray(a, dtype=np.float32)


def _exact_top(queries: np.ndarray, items: torch.Tensor, k: int, chunk: int = 64) -> np.ndarray:
    """Exact top-``k`` rows of each query (the service's product), in chunks of queries."""
    out = []
    for s in range(0, len(queries), chunk):
        q = torch.from_numpy(queries[s:s + chunk])
        out.append(torch.topk(q @ items.T, min(k, items.shape[0]), dim=1).indices.numpy())
    return np.concatenate(out)


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    k = min(k, truth.shape[1])
    hits = [len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth,
                                                                           strict=True)]
    return float(np.mean(hits) / k)


def _pct(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _latency(search: Any, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 (ms) of ``search(q, k)`` on one query at a time (batch 1)."""
    search(queries[:1], k)  # warm
    lat = []
    for i in range(len(queries)):
        t0 = time.perf_counter()
        search(queries[i:i + 1], k)
        lat.append((time.perf_counter() - t0) * 1000)
    return _pct(lat)


def _exact_latency(items: torch.Tensor, queries: np.ndarray, k: int) -> tuple[float, float]:
    def search(q: np.ndarray, kk: int) -> None:
        torch.topk(torch.from_numpy(q) @ items.T, min(kk, items.shape[0]), dim=1)

    with torch.inference_mode():
        return _latency(search, queries, k)


def nlist_for(n: int, train_per_list: int = 40) -> int:
    """IVF lists: about 4·√n, at most one per ``train_per_list`` items (k-means needs them)."""
    return max(1, min(int(4 * math.sqrt(n)), n // max(1, train_per_list)))


def _grid(limit: int) -> list[int]:
    out, v = [], 1
    while v < limit:
        out.append(v)
        v *= 2
    return [*out, limit]


def _candidates(items: np.ndarray, s: AnnSettings, rng: np.random.Generator
                ) -> list[tuple[str, Any, str, list[int], float]]:
    """(kind, index, parameter name, parameter grid, build seconds) for each index to try."""
    n, d = items.shape
    out = []
    if "ivf_flat" in s.kinds:
        t0 = time.perf_counter()
        nlist = nlist_for(n, s.train_per_list)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = s.seed
        n_train = min(n, nlist * s.train_per_list)
        train = items if n_train == n else items[np.sort(rng.choice(n, n_train, False))]
        index.train(train)
        index.add(items)
        out.append(("ivf_flat", index, "nprobe", _grid(nlist), time.perf_counter() - t0))
    if "hnsw_flat" in s.kinds and n <= s.hnsw_max_items:
        for m in s.hnsw_m:
            t0 = time.perf_counter()
            index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = s.ef_construction
            index.add(items)
            out.append((f"hnsw_flat:{m}", index, "efSearch",
                        [v for v in _grid(1024) if v >= 16], time.perf_counter() - t0))
    return out


def set_param(index: Any, name: str, value: int) -> None:
    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = int(value)
    elif name == "efSearch":
        faiss.downcast_index(index).hnsw.efSearch = int(value)


def build(item: torch.Tensor | np.ndarray, user: torch.Tensor | np.ndarray,
          settings: AnnSettings | None = None, threads: int | None = None
          ) -> tuple[AnnIndex | None, AnnReport]:
    """The index for the served item table ``item`` (n_items, d), chosen and measured on a
    sample of the user rows ``user``; ``(None, report)`` where exact search is kept (a small
    catalogue: ``report.passed``) or where nothing in the grid passes (``not
    report.passed``; :func:`gate` turns it into a refusal)."""
    s = settings or AnnSettings()
    items = _f32(item)
    n, d = items.shape
    report = AnnReport(method="exact", n_items=n, dim=d, k=s.k, k_large=s.k_large,
                       recall_threshold=s.recall, budget_ms=s.budget_ms,
                       threads=set_threads(threads))
    previous = torch.get_num_threads()
    torch.set_num_threads(report.threads)  # exact search timed as one service worker runs it
    try:
        return _build(items, user, s, report)
    finally:
        torch.set_num_threads(previous)


def _build(items: np.ndarray, user: torch.Tensor | np.ndarray, s: AnnSettings,
           report: AnnReport) -> tuple[AnnIndex | None, AnnReport]:
    n, d = items.shape
    if n < s.min_items:
        report.reason = (f"{n:,} items, under the {s.min_items:,} from which an approximate "
                         "index is built: exact search")
        return None, report
    queries_all = _f32(user)
    if queries_all.ndim != 2 or queries_all.shape[1] != d or len(queries_all) == 0:
        report.passed = False
        report.reason = f"no user rows of dimension {d} to measure the index on"
        return None, report
    rng = np.random.default_rng(s.seed)
    pick = rng.choice(len(queries_all), min(s.users, len(queries_all)), replace=False)
    queries = queries_all[np.sort(pick)]
    report.users = len(queries)
    items_t = torch.from_numpy(items)
    k, k_large = min(s.k, n), min(s.k_large, n)
    truth = _exact_top(queries, items_t, k_large)
    timed = queries[: s.latency_queries]
    report.exact_p50_ms, report.exact_p99_ms = _exact_latency(items_t, timed[:50], k)

    t_start = time.perf_counter()
    best: tuple[float, str, Any, str, int, dict[str, Any]] | None = None
    for kind, index, pname, grid, build_s in _candidates(items, s, rng):
        row: dict[str, Any] = {"kind": kind.split(":")[0], "build_s": round(build_s, 3)}
        if ":" in kind:
            row["M"] = int(kind.split(":")[1])
        for value in grid:
            set_param(index, pname, value)
            _, found = index.search(queries, k)
            r_k = _recall(found, truth, k)
            _, found_large = index.search(queries, k_large)
            r_large = _recall(found_large, truth, k_large)
            if r_k >= s.recall and r_large >= s.recall:
                break
        row.update({pname: value, "recall_at_k": r_k, "recall_at_k_large": r_large,
                    "recall_met": r_k >= s.recall and r_large >= s.recall})
        if row["recall_met"]:
            p50, p99 = _latency(lambda q, kk, ix=index: ix.search(q, kk), timed, k)
            row.update(p50_ms=p50, p99_ms=p99, budget_met=p99 <= s.budget_ms)
            if row["budget_met"] and (best is None or p50 < best[0]):
                best = (p50, row["kind"], index, pname, value, row)
        report.tried.append(row)
    report.measure_s = time.perf_counter() - t_start
    if best is None:
        report.passed = False
        met = [r for r in report.tried if r["recall_met"]]
        if not report.tried:
            report.reason = f"no index kind to try (kinds {', '.join(s.kinds)})"
        elif not met:
            top = max(report.tried, key=lambda r: r["recall_at_k"])
            report.reason = (f"no setting reached recall@{k} and recall@{k_large} >= "
                             f"{s.recall:g} (best: {top['kind']} recall@{k} "
                             f"{top['recall_at_k']:.3f}, recall@{k_large} "
                             f"{top['recall_at_k_large']:.3f} on {report.users} users)")
        else:
            low = min(met, key=lambda r: r["p99_ms"])
            report.reason = (f"no setting reaching recall {s.recall:g} answers within the "
                             f"{s.budget_ms:g} ms p99 budget (best: {low['kind']} p99 "
                             f"{low['p99_ms']:.3f} ms)")
        return None, report
    _, kind, index, pname, value, row = best
    params = {pname: int(value), **({"M": row["M"]} if "M" in row else {})}
    if kind == "ivf_flat":
        params["nlist"] = int(faiss.extract_index_ivf(index).nlist)
    set_param(index, pname, value)
    report.method, report.kind, report.params = "ann", kind, params
    report.recall_at_k, report.recall_at_k_large = row["recall_at_k"], row["recall_at_k_large"]
    report.index_p50_ms, report.index_p99_ms = row["p50_ms"], row["p99_ms"]
    report.build_s = row["build_s"]
    report.reason = (f"recall@{k} {row['recall_at_k']:.3f} and recall@{k_large} "
                     f"{row['recall_at_k_large']:.3f} >= {s.recall:g}, p99 "
                     f"{row['p99_ms']:.3f} ms <= {s.budget_ms:g} ms")
    return AnnIndex(index, report), report


def prepare(item: torch.Tensor | np.ndarray, user: torch.Tensor | np.ndarray,
            settings: AnnSettings | None = None) -> tuple[AnnIndex | None, AnnReport]:
    """What packaging ships for the served table ``item``: the index and its report, or
    None and why search stays exact (a small catalogue, or ``SMLREC_ANN`` off); settings
    from ``SMLREC_ANN_*`` unless given. :class:`AnnGateError` when the index fails its
    gate."""
    if not enabled():
        return None, AnnReport(method="exact", n_items=int(item.shape[0]),
                               dim=int(item.shape[1]),
                               reason="SMLREC_ANN=off at packaging: exact search")
    index, report = build(item, user, settings or AnnSettings.from_env())
    return index, gate(report)


def refusal(item: torch.Tensor | np.ndarray, user: torch.Tensor | np.ndarray,
            settings: AnnSettings | None = None) -> str | None:
    """Why packaging (:func:`prepare`) would refuse the index of the served table ``item``,
    or None. The daily gate asks before it promotes, so that a model whose index would be
    refused is never recorded as production."""
    try:
        prepare(item, user, settings)
    except AnnGateError as exc:
        return str(exc)
    return None


def gate(report: AnnReport) -> AnnReport:
    """``report`` when it passed; :class:`AnnGateError` (naming why) when it did not."""
    if not report.passed:
        raise AnnGateError(report)
    return report


# ---------------------------------------------------------------------- serving


class AnnIndex:
    """A built or loaded index with its report; searches batches with exclusions.

    ``max_k``: the largest k the gate measured (``report.k_large``); larger requests are
    answered exactly by the caller. Counters: ``searches`` (queries answered by the index)
    and ``fallbacks`` (queries handed back for exact search).
    """

    def __init__(self, index: Any, report: AnnReport, device: torch.device | str = "cpu",
                 threads: int | None = None):
        self.threads = set_threads(threads)
        self.report = report
        self.index = index
        self.device = "cpu"
        self._gpu: Any = None
        if torch.device(device).type == "cuda" and torch.cuda.is_available() \
                and hasattr(faiss, "StandardGpuResources") and report.kind == "ivf_flat":
            try:  # IVF moves to the GPU; HNSW has no GPU form and stays on the CPU
                self._gpu = faiss.StandardGpuResources()
                self.index = faiss.index_cpu_to_gpu(self._gpu, torch.device(device).index or 0,
                                                    index)
                self.device = str(device)
            except RuntimeError:
                self._gpu, self.index = None, index
        self.ntotal = int(self.index.ntotal)
        self.dim = int(self.index.d)
        self.max_k = int(report.k_large)
        self.searches = 0
        self.fallbacks = 0

    @classmethod
    def from_bytes(cls, data: bytes, report: dict[str, Any] | AnnReport,
                   device: torch.device | str = "cpu", threads: int | None = None) -> AnnIndex:
        rep = report if isinstance(report, AnnReport) else AnnReport.from_dict(report)
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        for name, value in rep.params.items():
            set_param(index, name, value)
        return cls(index, rep, device, threads)

    def to_bytes(self) -> bytes:
        index = self.index if self._gpu is None else faiss.index_gpu_to_cpu(self.index)
        return faiss.serialize_index(index).tobytes()

    def describe(self) -> dict[str, Any]:
        r = self.report
        return {"method": "ann", "kind": r.kind, "params": dict(r.params), "device": self.device,
                "threads": self.threads, "max_k": self.max_k, "recall_at_k": r.recall_at_k,
                "recall_at_k_large": r.recall_at_k_large, "k": r.k, "k_large": r.k_large,
                "users": r.users, "index_p99_ms": r.index_p99_ms,
                "exact_p99_ms": r.exact_p99_ms, "build_s": r.build_s,
                "searches": self.searches, "fallbacks": self.fallbacks}

    def search(self, queries: torch.Tensor | np.ndarray, ks: Sequence[int],
               exclude: Sequence[Sequence[int]] = ()
               ) -> list[tuple[list[int], list[float]] | None]:
        """Top-``ks[i]`` (rows, scores), best first, for each query in one batched search;
        ``exclude[i]``'s rows left out. ``None`` for a query with fewer than its k items
        left after the exclusions (the caller answers it exactly)."""
        q = _f32(queries).reshape(-1, self.dim)
        ex = [set(e) for e in exclude] + [set()] * (len(q) - len(exclude))
        kk = min(self.ntotal, max(k + len(e) for k, e in zip(ks, ex, strict=True)))
        scores, rows = self.index.search(q, kk)
        out: list[tuple[list[int], list[float]] | None] = []
        for i, k in enumerate(ks):
            keep_r, keep_s = [], []
            for r, sc in zip(rows[i].tolist(), scores[i].tolist(), strict=True):
                if r >= 0 and r not in ex[i]:
                    keep_r.append(r)
                    keep_s.append(sc)
                    if len(keep_r) == k:
                        break
            needed = min(k, self.ntotal - sum(1 for r in ex[i] if 0 <= r < self.ntotal))
            if len(keep_r) < needed:
                out.append(None)
                self.fallbacks += 1
            else:
                out.append((keep_r, keep_s))
                self.searches += 1
        return out
