"""Side features (user demographics, item metadata) encoded as tensors aligned to vocab rows.

The feature models (MeLU, the two-tower model, MetaSelector) read users and items through
their side tables (``<data root>/side/users.parquet`` and ``items.parquet``, see
:mod:`smlrec.data.store`). Any table works, not only MovieLens's; each column but the id
becomes features by its content:

- a text column whose values hold ``|`` (e.g. ``genres = "Action|Comedy"``): multi-hot over
  its :data:`MAX_TOKENS` most frequent tokens (item side; on the user side such a column
  is read as categorical);
- a numeric column: :data:`NUMERIC_BINS` quantile bins (e.g. ``age``, ``year``);
- a text column with at most :data:`MAX_CATEGORIES` distinct values, or with more values
  but repeated (fewer distinct values than half the rows): categorical, its
  ``MAX_CATEGORIES - 1`` most frequent values kept, the rest sharing one "other" code;
- anything else (free text such as a title, one value per row) is left out.

Every categorical field has code 0 for "unknown or missing": a row whose id is not in the
table (a user who arrived without a profile) is all zeros, and so is a missing value.
Encoding is fitted on the whole table once (static side information is known when a user
signs up; no interaction data is used), so it never leaks the future.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from smlrec.schema import ITEM, USER
from smlrec.vocab import Vocab

MAX_CATEGORIES = 256
MAX_TOKENS = 64
NUMERIC_BINS = 8
MULTI_SEPARATOR = "|"


@dataclass
class FieldCodes:
    """How one side-table column was encoded (kept so serving encodes the same way)."""

    column: str
    kind: str  # "categorical", "numeric" or "multi"
    values: list = field(default_factory=list)  # categories, bin edges or tokens

    @property
    def cardinality(self) -> int:
        """Codes of a categorical or numeric field, 0 (unknown) included; tokens of a multi."""
        if self.kind == "multi":
            return len(self.values)
        if self.kind == "numeric":
            return len(self.values) + 2  # unknown, below the first edge, ..., above the last
        return len(self.values) + 2      # unknown, the kept values, "other"

    def to_dict(self) -> dict:
        return {"column": self.column, "kind": self.kind,
                "values": [v.item() if hasattr(v, "item") else v for v in self.values]}


@dataclass
class TableCodes:
    """The encoding of one side table: categorical-like fields and multi-hot fields."""

    fields: list[FieldCodes]

    @property
    def categorical(self) -> list[FieldCodes]:
        return [f for f in self.fields if f.kind != "multi"]

    @property
    def multi(self) -> list[FieldCodes]:
        return [f for f in self.fields if f.kind == "multi"]

    def to_dict(self) -> dict:
        return {"fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> TableCodes:
        return cls([FieldCodes(f["column"], f["kind"], list(f["values"])) for f in d["fields"]])


@dataclass
class SideFeatures:
    """Encoded side features, one row per vocab row.

    ``user``: (n_users, n_user_fields) int64 codes, 0 = unknown. ``item``: (n_items,
    n_item_fields) int64 codes. ``item_multi``: (n_items, n_tokens) float32 multi-hot (all
    multi-valued item columns side by side; zero columns when there are none).
    ``user_cards`` / ``item_cards``: codes per field, 0 included, for embedding tables.
    """

    user: Tensor
    user_cards: tuple[int, ...]
    item: Tensor
    item_cards: tuple[int, ...]
    item_multi: Tensor
    user_codes: TableCodes | None = None
    item_codes: TableCodes | None = None

    @property
    def n_users(self) -> int:
        return self.user.shape[0]

    @property
    def n_items(self) -> int:
        return self.item.shape[0]

    def to(self, device: torch.device | str) -> SideFeatures:
        return SideFeatures(self.user.to(device), self.user_cards, self.item.to(device),
                            self.item_cards, self.item_multi.to(device), self.user_codes,
                            self.item_codes)

    def grow(self, n_users: int, n_items: int) -> SideFeatures:
        """At least ``n_users`` / ``n_items`` rows: new rows are unknown (all zeros)."""
        def pad(t: Tensor, n: int) -> Tensor:
            extra = n - t.shape[0]
            return t if extra <= 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])
        return SideFeatures(pad(self.user, n_users), self.user_cards, pad(self.item, n_items),
                            self.item_cards, pad(self.item_multi, n_items), self.user_codes,
                            self.item_codes)


def _is_multi(values: pd.Series) -> bool:
    text = values.dropna().astype(str)
    return len(text) > 0 and bool(text.str.contains(MULTI_SEPARATOR, regex=False).any())


def fit_codes(table: pd.DataFrame, key: str, allow_multi: bool = True) -> TableCodes:
    """Decide how each column of ``table`` (but ``key``) is encoded (see the module doc)."""
    fields = []
    for col in table.columns:
        if col == key:
            continue
        values = table[col]
        if pd.api.types.is_bool_dtype(values):
            values = values.astype("string")
        if pd.api.types.is_numeric_dtype(values):
            x = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
            if len(x) == 0:
                continue
            edges = np.unique(np.quantile(x, np.linspace(0, 1, NUMERIC_BINS + 1)[1:-1]))
            fields.append(FieldCodes(col, "numeric", edges.tolist()))
        elif allow_multi and _is_multi(values):
            tokens = values.dropna().astype(str).str.split(MULTI_SEPARATOR).explode()
            tokens = tokens[tokens != ""].value_counts()
            fields.append(FieldCodes(col, "multi", tokens.index[:MAX_TOKENS].tolist()))
        else:
            counts = values.dropna().astype(str).value_counts()
            if len(counts) == 0 or (len(counts) > MAX_CATEGORIES
                                    and len(counts) > 0.5 * values.notna().sum()):
                continue  # free text: one value per row
            fields.append(FieldCodes(col, "categorical",
                                     counts.index[:MAX_CATEGORIES - 1].tolist()))
    return TableCodes(fields)


def _encode_field(values: pd.Series, f: FieldCodes) -> np.ndarray:
    if f.kind == "numeric":
        x = pd.to_numeric(values, errors="coerce").to_numpy(float)
        codes = np.searchsorted(np.asarray(f.values, float), x, side="right") + 1
        return np.where(np.isnan(x), 0, codes).astype(np.int64)
    index = pd.Index(f.values, dtype=object)
    text = values.astype(object).where(values.notna(), None)
    pos = index.get_indexer(text.map(lambda v: None if v is None else str(v)))
    other = len(f.values) + 1
    codes = np.where(pos >= 0, pos + 1, other)
    return np.where(text.isna().to_numpy(), 0, codes).astype(np.int64)


def _multi_hot(values: pd.Series, f: FieldCodes) -> np.ndarray:
    out = np.zeros((len(values), len(f.values)), np.float32)
    col = {tok: j for j, tok in enumerate(f.values)}
    for i, v in enumerate(values.to_numpy(object)):
        if isinstance(v, str):
            for tok in v.split(MULTI_SEPARATOR):
                j = col.get(tok)
                if j is not None:
                    out[i, j] = 1.0
    return out


def encode_table(table: pd.DataFrame | None, key: str, vocab: Vocab,
                 codes: TableCodes) -> tuple[np.ndarray, np.ndarray]:
    """Codes (n, n_categorical) and multi-hot (n, n_tokens) for every row of ``vocab``;
    rows whose id is not in ``table`` are zeros."""
    n = len(vocab)
    cat = np.zeros((n, len(codes.categorical)), np.int64)
    n_tokens = sum(len(f.values) for f in codes.multi)
    multi = np.zeros((n, n_tokens), np.float32)
    if table is None or table.empty or n == 0:
        return cat, multi
    table = table.drop_duplicates(key, keep="last")
    rows = vocab.lookup(table[key].astype(str))
    ok = rows >= 0
    part, rows = table[ok], rows[ok]
    for j, f in enumerate(codes.categorical):
        cat[rows, j] = _encode_field(part[f.column], f)
    start = 0
    for f in codes.multi:
        multi[rows, start:start + len(f.values)] = _multi_hot(part[f.column], f)
        start += len(f.values)
    return cat, multi


def encode(users: pd.DataFrame | None, items: pd.DataFrame | None, user_vocab: Vocab,
           item_vocab: Vocab, user_codes: TableCodes | None = None,
           item_codes: TableCodes | None = None) -> SideFeatures:
    """Encode both side tables for the rows of the vocabularies (fitting the encodings on
    the tables unless given, e.g. by a saved model)."""
    if user_codes is None:
        user_codes = fit_codes(users, USER, allow_multi=False) if users is not None \
            else TableCodes([])
    if item_codes is None:
        item_codes = fit_codes(items, ITEM) if items is not None else TableCodes([])
    u, _ = encode_table(users, USER, user_vocab, user_codes)
    i, m = encode_table(items, ITEM, item_vocab, item_codes)
    return SideFeatures(torch.from_numpy(u), tuple(f.cardinality for f in user_codes.categorical),
                        torch.from_numpy(i), tuple(f.cardinality for f in item_codes.categorical),
                        torch.from_numpy(m), user_codes, item_codes)


def load_side_tables(root: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """The ``users`` and ``items`` side tables of a data store (None where absent)."""
    from smlrec.data.store import read_side_table
    from smlrec.errors import DataError

    out = []
    for name in ("users", "items"):
        try:
            out.append(read_side_table(root, name))
        except (DataError, FileNotFoundError):
            out.append(None)
    return out[0], out[1]
