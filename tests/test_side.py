"""Side features: how a side table's columns become codes (known answers)."""

from __future__ import annotations

import pandas as pd
import torch

from smlrec.side import encode
from smlrec.vocab import Vocab


def test_columns_are_encoded_by_content_and_unknown_rows_are_zero():
    users = pd.DataFrame({"user_id": ["a", "b", "c"], "age": [20, 40, None],
                          "gender": ["F", "M", None]})
    others = pd.DataFrame({"user_id": [f"o{k}" for k in range(300)], "age": 30,
                           "gender": "F"})
    users = pd.concat([users, others], ignore_index=True)
    users["note"] = [f"text {k}" for k in range(len(users))]  # one value per row
    items = pd.DataFrame({"item_id": ["i", "j"], "genres": ["Drama|Comedy", "Drama"],
                          "year": [1990, 2000]})
    uv, iv = Vocab(["c", "a", "zz"]), Vocab(["j", "i", "new"])
    f = encode(users, items, uv, iv)
    kinds = {x.column: x.kind for x in f.user_codes.fields + f.item_codes.fields}
    # free text with one value per row ("note") is left out
    assert kinds == {"age": "numeric", "gender": "categorical", "genres": "multi",
                     "year": "numeric"}
    assert f.user.shape == (3, 2) and f.item.shape == (3, 1) and f.item_multi.shape == (3, 2)
    assert f.user[0].tolist() == [0, 0]          # "c": missing age and gender -> unknown
    assert f.user[2].tolist() == [0, 0]          # "zz" has no profile
    assert f.user[1, 1] == 1 + f.user_codes.fields[1].values.index("F")
    drama = f.item_codes.fields[0].values.index("Drama")
    assert f.item_multi[0, drama] == 1 and f.item_multi[0].sum() == 1   # "j": Drama only
    assert f.item_multi[1].sum() == 2 and f.item_multi[2].sum() == 0
    assert f.item[0] > f.item[1] > 0 and f.item[2] == 0   # 2000 bins above 1990; new: 0
    assert all(c >= 2 for c in f.user_cards + f.item_cards)
    grown = f.grow(5, 4)
    assert grown.user.shape == (5, 2) and torch.equal(grown.user[3:], torch.zeros(2, 2,
                                                                                dtype=torch.long))
