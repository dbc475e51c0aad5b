"""Persistent, growing id vocabularies: raw string id <-> row of a model table.

Rows are never reordered or reused: a vocabulary only appends, so a table trained for
an older vocabulary is a prefix of the table for a newer one. New rows are initialised
by the model (see ``smlrec.models.init_rows``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pandas as pd


class Vocab:
    """An append-only mapping from raw ids (strings) to contiguous integer rows."""

    def __init__(self, ids: Iterable[str] = ()):
        self._index = pd.Index([], dtype=object)
        self.add(ids)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, raw_id: object) -> bool:
        return raw_id in self._index

    @property
    def ids(self) -> list[str]:
        """Raw ids in row order."""
        return list(self._index)

    def add(self, ids: Iterable[str]) -> int:
        """Append ids not yet known, in order of first appearance. Returns how many were new."""
        values = pd.unique(pd.Series(list(ids) if not isinstance(ids, pd.Series) else ids,
                                     dtype=object))
        if len(values) == 0:
            return 0
        new = values[self._index.get_indexer(values) < 0] if len(self._index) else values
        if len(new):
            self._index = self._index.append(pd.Index(new, dtype=object))
        return len(new)

    def lookup(self, ids: Iterable[str]) -> np.ndarray:
        """Rows for raw ids as int64; unknown ids map to -1."""
        values = ids.to_numpy(dtype=object) if isinstance(ids, pd.Series) else list(ids)
        if len(self._index) == 0:
            return np.full(len(values), -1, dtype=np.int64)
        return self._index.get_indexer(values).astype(np.int64)

    def to_json(self) -> str:
        return json.dumps({"ids": self.ids})

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        return cls(json.loads(text)["ids"])
