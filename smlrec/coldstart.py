"""The cold-start model in the daily run: MeLU trained beside the challengers, gated on the
period's new users, and packaged with the model it serves beside.

With a ``cold`` section in the run configuration (:class:`ColdConfig`, written by the
cold-start benchmark into ``configs/<dataset>.yaml``):

- the bootstrap meta-trains MeLU on the pretraining periods' users (tasks, see
  :func:`smlrec.coldtrack.training_tasks`) and then on each later period's, as the cold
  track does;
- every daily run meta-updates it on the new period's users (and the ``replay`` periods
  before it), continuing the chain of the newest candidate like every challenger;
- the gate scores yesterday's MeLU on the period's new users (support = their first
  ``support`` items, query = the rest) beside the mean-embedding path (today's serving
  path for users the model does not know) and the popularity floor, and logs the result
  with the decision; the cold path is ``melu`` when MeLU beat both on that period, else
  ``recent_items``;
- the package carries MeLU (``melu.*`` tensors), the encoded side features and the cold
  path, so the service can answer a new user with MeLU's adaptation to their recent items.

The side features are encoded once at the bootstrap (:func:`smlrec.side.encode`) and the
encoding (``TableCodes``) is kept in the bundle's metadata, so every later period and the
service encode the same way. Nothing here imports KFP, Feast or BentoML.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd
import torch

from smlrec import coldtrack as ct
from smlrec.config import ColdConfig
from smlrec.side import SideFeatures, TableCodes, encode, load_side_tables
from smlrec.strategies import PeriodData
from smlrec.vocab import Vocab

PREFIX = "melu."
META_KEY = "melu"


def features(data_root: str, users: Vocab, items: Vocab, codes: dict | None = None
             ) -> SideFeatures:
    """The side features of the data store for the vocabularies' rows (with the saved
    encoding ``codes``, else fitted on the side tables)."""
    u, i = load_side_tables(data_root)
    uc = TableCodes.from_dict(codes["user"]) if codes else None
    ic = TableCodes.from_dict(codes["item"]) if codes else None
    return encode(u, i, users, items, uc, ic)


def _codes(f: SideFeatures) -> dict:
    return {"user": f.user_codes.to_dict(), "item": f.item_codes.to_dict()}


def _melu_config(cfg: ColdConfig) -> Any:
    from smlrec.melu import MeLUConfig

    return MeLUConfig(**cfg.melu)


def history_by_user(periods: list[PeriodData]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for d in periods:
        ct.add_history(out, d.users, d.items)
    return out


def period_tasks(periods: list[PeriodData], before: dict[int, np.ndarray], seed: int,
                 max_support: int, recent: int) -> list[list[ct.UserTask]]:
    """Each period's meta-training tasks, given the users' history before the first of
    ``periods`` (``before`` is extended in place)."""
    out = []
    for k, d in enumerate(periods):
        rng = np.random.default_rng([seed, 11, k, len(d)])
        out.append(ct.training_tasks(d.users, d.items, before, rng, max_support, recent))
        ct.add_history(before, d.users, d.items)
    return out


def bootstrap_melu(data_root: str, data: list[PeriodData], sizes: list[tuple[int, int]],
                   users: Vocab, items: Vocab, cfg: ColdConfig, pretrain: int, seed: int,
                   device: str) -> Any:
    """MeLU after the bootstrap periods: meta-trained ``pretrain_epochs`` times on the
    pretraining periods' tasks, then once per later period on the last ``replay``
    periods' tasks (``epochs`` passes), as the cold track runs it."""
    from smlrec.melu import MeLU

    f = features(data_root, users, items)
    melu = MeLU(f, _melu_config(cfg), seed=seed, device=device)
    tasks = period_tasks(data, {}, seed, cfg.max_support, cfg.recent)
    pre = [x for group in tasks[:pretrain] for x in group]
    melu.meta_train(pre, sizes[pretrain - 1][1], epochs=cfg.pretrain_epochs)
    for t in range(pretrain, len(data)):
        replay = [x for group in tasks[max(0, t + 1 - cfg.replay): t + 1] for x in group]
        melu.meta_train(replay, sizes[t][1], epochs=cfg.epochs)
    return melu


def update_melu(melu: Any, history: list[PeriodData], d: PeriodData, n_items: int,
                cfg: ColdConfig, seed: int) -> dict:
    """Meta-update MeLU after period ``d`` closed (``history``: every stored period before
    it, indexed with the same vocabularies)."""
    keep = max(0, len(history) - (cfg.replay - 1))
    before = history_by_user(history[:keep])
    tasks = period_tasks([*history[keep:], d], before, seed, cfg.max_support, cfg.recent)
    flat = [x for group in tasks for x in group]
    out = melu.meta_train(flat, n_items, epochs=cfg.epochs)
    return {"melu_loss": float(out.get("loss", float("nan"))), "melu_tasks": len(flat)}


def save_tensors(melu: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """MeLU's state under ``melu.`` keys and its metadata (with its features' encoding)."""
    tensors, meta = melu.state()
    return ({PREFIX + k: v for k, v in tensors.items()},
            {**meta, "codes": _codes(melu.features)})


def _own(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MeLU's tensors of a bundle, ``melu.`` taken off their keys."""
    return {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}


def load(tensors: dict[str, torch.Tensor], meta: dict, data_root: str, users: Vocab,
         items: Vocab, device: str = "cpu") -> Any | None:
    """MeLU from a bundle (None when the bundle has none), with the features of the data
    store's side tables for the vocabularies, encoded as at the bootstrap."""
    from smlrec.melu import MeLU

    info = meta.get(META_KEY)
    if not info:
        return None
    f = features(data_root, users, items, info["codes"])
    return MeLU.from_state(_own(tensors), info, f, device=device)


# --------------------------------------------------------------------------- the gate


def gate_cold(tensors: dict[str, torch.Tensor], meta: dict, data_root: str,
              item_table: torch.Tensor, prior_column: bool, prior: torch.Tensor,
              test: pd.DataFrame, users: Vocab, items: Vocab, cfg: ColdConfig,
              device: str = "cpu") -> dict:
    """Score yesterday's MeLU (from the bundle's ``tensors`` and ``meta``, with the side
    features of ``users`` and of the period's new users), the mean-embedding path
    (``item_table``: the served model's item rows, its last column the blend when
    ``prior_column``) and the floor (``prior``: its item counts) on the period's new users
    (not in ``users``), support = their first ``cfg.support`` known items, ranked over the
    known items. Returns the scores and the cold path the service should take."""
    from smlrec.schema import ITEM, TS, USER

    frame = test.sort_values(TS, kind="stable")
    ids = frame[USER].astype(str)
    new = ~ids.isin(set(users.ids))
    part, ids = frame[new], ids[new]
    n_items = len(items)
    if part.empty:
        return {"n_users": 0, "path": "recent_items", "reason": "no new users this period"}
    ext = Vocab(users.ids)
    ext.add(ids)
    u_rows = ext.lookup(ids)
    i_rows = items.lookup(part[ITEM].astype(str))
    known = i_rows >= 0
    tasks = ct.cold_tasks(u_rows[known], i_rows[known], len(users), n_items, cfg.support,
                          cfg.support + 1)
    if not tasks:
        return {"n_users": 0, "path": "recent_items",
                "reason": f"no new user with more than {cfg.support} known items"}
    excl = [t.support for t in tasks]
    melu = load(tensors, meta, data_root, ext, items, device)  # with the new users' profiles
    log_prior = torch.log1p(prior[:n_items].float().cpu())
    melu_scores = melu.score([t.user for t in tasks], excl, n_items).float().cpu()
    V = item_table[:n_items].float().cpu()
    q = torch.stack([V[torch.as_tensor(t.support)].mean(0) for t in tasks])
    if prior_column:
        q[:, -1] = 1.0  # the blend applies in full, as the service does
    mean_emb = q @ V.T
    scores = {"melu": melu_scores + cfg.blend * log_prior, "mean_emb": mean_emb,
              "popularity": log_prior.expand(len(tasks), n_items)}
    out: dict[str, Any] = {"n_users": len(tasks), "support": cfg.support}
    for name, s in scores.items():
        m = ct.task_metrics(s, tasks, excl)
        m.pop("per_user")
        out[name] = {k: float(v) for k, v in m.items() if k.startswith(("ndcg", "recall"))}
    best = out["melu"]["ndcg@20"]
    beats = best > out["mean_emb"]["ndcg@20"] and best > out["popularity"]["ndcg@20"]
    out["path"] = ("melu" if beats else "recent_items") if cfg.path == "auto" else cfg.path
    out["reason"] = ("" if cfg.path == "auto" else f"path set to {cfg.path} by the run "
                     "configuration; ") + (f"MeLU NDCG@20 {best:.4f} vs mean embedding "
                     f"{out['mean_emb']['ndcg@20']:.4f} and popularity "
                     f"{out['popularity']['ndcg@20']:.4f} on {len(tasks)} new users")
    return out


# --------------------------------------------------------------------------- serving


SERVE_PREFIX = "melu_side."
USERS_FILE = "melu_users.json"


def serving_parts(tensors: dict[str, torch.Tensor], meta: dict, data_root: str, items: Vocab,
                  period: str, cold_path: str, cfg: Any) -> tuple[dict, dict, dict]:
    """What the service needs to answer new users with MeLU, for a package: MeLU's
    tensors, the encoded profiles of every user of the users side table (a new user with a
    profile gets their features; one without, the unknown row), the items' features, the
    floor's popularity after ``period`` (for the blend), and the cold path the gate chose.
    Returns (tensors, metadata, files); empty when the bundle has no MeLU."""
    from smlrec.data.store import list_periods, read_period
    from smlrec.strategies import popularity_counts, popularity_window

    info = meta.get(META_KEY)
    if not info or cfg.cold is None:
        return {}, {}, {}
    u_tab, i_tab = load_side_tables(data_root)
    profiles = Vocab(u_tab["user_id"].astype(str)) if u_tab is not None else Vocab()
    f = encode(u_tab, i_tab, profiles, items, TableCodes.from_dict(info["codes"]["user"]),
               TableCodes.from_dict(info["codes"]["item"]))
    floor = cfg.floor.params
    n = popularity_window(floor.get("window"), floor.get("half_life"))
    recent = [p for p in list_periods(data_root) if p <= period][-n:]
    data = []
    for pid in recent:
        rows = items.lookup(read_period(data_root, pid, columns=["item_id"])["item_id"]
                            .astype(str))
        rows = rows[rows >= 0]
        data.append(PeriodData(pid, np.zeros(len(rows), np.int64), rows))
    prior = popularity_counts(data, len(items), floor.get("window"), floor.get("half_life"))
    out = {k: v for k, v in tensors.items() if k.startswith(PREFIX)}
    out.update({SERVE_PREFIX + "user": f.user, SERVE_PREFIX + "item": f.item,
                SERVE_PREFIX + "item_multi": f.item_multi, SERVE_PREFIX + "prior": prior})
    return (out, {META_KEY: info, "cold_path": cold_path, "cold_blend": cfg.cold.blend},
            {USERS_FILE: profiles.to_json().encode()})


class ServedMeLU:
    """MeLU in the service: adapts to a new user's recent items and ranks every item."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, files: dict[str, bytes],
                 device: torch.device | str = "cpu"):
        from smlrec.melu import MeLU

        info = meta[META_KEY]
        uc = TableCodes.from_dict(info["codes"]["user"])
        ic = TableCodes.from_dict(info["codes"]["item"])
        side_user = tensors[SERVE_PREFIX + "user"]
        unknown = side_user.new_zeros(1, side_user.shape[1])
        f = SideFeatures(torch.cat([side_user, unknown]),
                         tuple(x.cardinality for x in uc.categorical),
                         tensors[SERVE_PREFIX + "item"],
                         tuple(x.cardinality for x in ic.categorical),
                         tensors[SERVE_PREFIX + "item_multi"], uc, ic)
        self.model = MeLU.from_state(_own(tensors), info, f, device=device)
        self.n_items = f.n_items
        self.profiles = {u: i for i, u in enumerate(Vocab.from_json(
            files[USERS_FILE].decode()).ids)}
        self.unknown_row = len(self.profiles)
        self.blend = float(meta.get("cold_blend", 0.0))
        self.log_prior = torch.log1p(tensors[SERVE_PREFIX + "prior"].float()[: self.n_items])
        self.path = str(meta.get("cold_path", ""))
        # torch.func's transforms keep interpreter state that concurrent threads corrupt
        # (measured: every request failed at concurrency 8): one adaptation at a time.
        self._lock = threading.Lock()

    def scores(self, user_id: str, support: list[int]) -> torch.Tensor:
        """Scores of every item for a user the model does not know, after adapting to
        ``support`` (their recent item rows). Safe to call from several threads."""
        return self.scores_many([user_id], [support])[0]

    def scores_many(self, user_ids: list[str], supports: list[list[int]]) -> torch.Tensor:
        """:meth:`scores` for several users at once (one vmapped adaptation), (B, n_items)."""
        rows = [self.profiles.get(u, self.unknown_row) for u in user_ids]
        with self._lock:
            s = self.model.score(rows, [np.asarray(x, dtype=np.int64) for x in supports],
                                 self.n_items)
        return s.float().cpu() + self.blend * self.log_prior
