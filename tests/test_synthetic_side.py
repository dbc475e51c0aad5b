"""Tests of the synthetic stream's side tables (users' segment/age/region, items' genres/year)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from smlrec.data.store import read_dataset_info, read_periods, read_side_table
from smlrec.data.synthetic import (
    _initial_draws,
    generate_side_tables,
    generate_stream,
    write_synthetic,
)
from smlrec.errors import DataError
from smlrec.schema import ITEM, PERIOD, TS, USER
from smlrec.side import fit_codes

TINY = {"n_users": 120, "n_items": 60, "n_periods": 3, "interactions_per_period": 400, "seed": 3}
SMALL = {"n_users": 300, "n_items": 200, "n_periods": 6, "interactions_per_period": 3000,
         "seed": 7}
# Computed with the generator as it was before the side tables were added: the stream must
# not change (other tests and committed benchmark figures depend on it).
TINY_HEAD_SHA256 = "a5d8a4cab63e206eca01f8680e3be1a5412eeb1010af1c38fe8606a19e76ed89"
SMALL_SHA256 = "9037b201d3b5ac2392e1ca9305ffcf465ad3aa4061a785f5dd925bf2a498b0aa"

# One stream and its side tables for the informativeness tests.
INFO = {"n_users": 400, "n_items": 200, "n_periods": 4, "interactions_per_period": 4000,
        "seed": 5}


def _head_sha256(df: pd.DataFrame, n: int = 200) -> str:
    rows = df[USER].head(n) + "," + df[ITEM].head(n)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


def _full_sha256(df: pd.DataFrame) -> str:
    micros = df[TS].astype("int64").astype(str)
    rows = df[USER] + "," + df[ITEM] + "," + micros + "," + df[PERIOD]
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@pytest.fixture(scope="module")
def info_stream() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    df = generate_stream(**INFO)
    users, items = generate_side_tables(n_users=INFO["n_users"], n_items=INFO["n_items"],
                                        seed=INFO["seed"])
    return df, users, items


# --- 1. the stream is unchanged ---------------------------------------------------------------


def test_stream_is_unchanged_by_the_side_tables() -> None:
    assert _head_sha256(generate_stream(**TINY)) == TINY_HEAD_SHA256
    assert _full_sha256(generate_stream(**SMALL)) == SMALL_SHA256


# --- 2. shape, types, determinism -------------------------------------------------------------


def test_side_tables_cover_the_stream_with_typed_columns() -> None:
    df = generate_stream(**SMALL)
    users, items = generate_side_tables(n_users=300, n_items=200, seed=7)
    assert list(users.columns) == [USER, "segment", "age", "region"]
    assert list(items.columns) == [ITEM, "genres", "year"]
    assert users[USER].is_unique and items[ITEM].is_unique
    assert len(users) == 300 and len(items) == 200
    assert set(df[USER]) <= set(users[USER]) and set(df[ITEM]) <= set(items[ITEM])
    for col in (USER, "segment", "region", ITEM, "genres"):
        table = users if col in users.columns else items
        assert table[col].dtype == object and table[col].map(type).eq(str).all(), col
    assert users["age"].dtype == np.int64 and items["year"].dtype == np.int64
    assert users["age"].between(18, 70).all() and items["year"].between(1980, 2024).all()
    assert set(users["segment"]) == {f"s{k}" for k in range(8)}
    assert set(users["region"]) == {f"r{k}" for k in range(5)}
    genres = items["genres"].str.split("|")
    assert genres.map(len).between(1, 3).all() and genres.map(len).gt(1).any()
    assert genres.map(lambda g: g == sorted(set(g))).all()
    assert set(genres.explode()) <= {f"g{k:02d}" for k in range(12)}
    # the encoder reads them as intended
    kinds = {f.column: f.kind for f in fit_codes(users, USER, allow_multi=False).fields}
    assert kinds == {"segment": "categorical", "age": "numeric", "region": "categorical"}
    kinds = {f.column: f.kind for f in fit_codes(items, ITEM).fields}
    assert kinds == {"genres": "multi", "year": "numeric"}


def test_side_tables_are_deterministic_per_seed() -> None:
    a = generate_side_tables(n_users=150, n_items=90, seed=4)
    b = generate_side_tables(n_users=150, n_items=90, seed=4)
    c = generate_side_tables(n_users=150, n_items=90, seed=5)
    for x, y, z in zip(a, b, c, strict=True):
        pd.testing.assert_frame_equal(x, y)
        assert not x.equals(z)
    users, items = generate_side_tables(n_users=150, n_items=90, seed=4, n_segments=3,
                                        n_genres=4)
    assert users["segment"].nunique() == 3
    assert set(items["genres"].str.split("|").explode()) <= {"g00", "g01", "g02", "g03"}
    with pytest.raises(ValueError):
        generate_side_tables(n_segments=0)


# --- 3. informative (but partly) --------------------------------------------------------------


def _jaccard_ratio(df: pd.DataFrame, users: pd.DataFrame, col: str) -> float:
    """Mean Jaccard of two users' item sets when they share ``col``, over when they do not."""
    sets = df.groupby(USER)[ITEM].agg(set)
    labels = users.set_index(USER)[col].reindex(sets.index).to_numpy()
    item_pos = {item: k for k, item in enumerate(sorted(set(df[ITEM])))}
    m = np.zeros((len(sets), len(item_pos)))
    for row, items in enumerate(sets):
        m[row, [item_pos[i] for i in items]] = 1.0
    inter = m @ m.T
    size = m.sum(axis=1)
    jac = inter / (size[:, None] + size[None, :] - inter)
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(sets), dtype=bool)
    return float(jac[same & off_diag].mean() / jac[~same].mean())


def _mutual_information(a: pd.Series, b: pd.Series) -> float:
    p = pd.crosstab(a, b).to_numpy(float)
    p /= p.sum()
    expected = p.sum(axis=1, keepdims=True) @ p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / expected[nz])).sum())


def test_segment_groups_users_of_similar_taste_and_region_does_not(info_stream) -> None:
    df, users, _ = info_stream
    first = df[df[PERIOD] == df[PERIOD].min()]
    seg_first, seg_all = _jaccard_ratio(first, users, "segment"), _jaccard_ratio(df, users,
                                                                                 "segment")
    assert seg_first > 1.2 and seg_all > 1.15  # observed: 1.32 and 1.23
    assert abs(_jaccard_ratio(df, users, "region") - 1.0) < 0.04  # observed: 1.007


def test_genres_predict_the_segment_of_the_users_who_pick_them(info_stream) -> None:
    df, users, items = info_stream
    m = df.merge(users, on=USER).merge(items, on=ITEM)
    m = m.assign(genre=m["genres"].str.split("|")).explode("genre")
    seg = _mutual_information(m["genre"], m["segment"])
    region = _mutual_information(m["genre"], m["region"])
    assert seg > 3 * region  # observed: 0.072 vs 0.016
    lift = pd.crosstab(m["genre"], m["segment"], normalize="index") / m["segment"].value_counts(
        normalize=True)
    assert lift.max(axis=1).median() > 1.4  # each genre leans to some segment (observed 1.7)


def test_age_and_year_carry_weak_signals(info_stream) -> None:
    df, users, items = info_stream
    _, user_vecs, _, pop_rank = _initial_draws(INFO["n_users"], INFO["n_items"], 16, INFO["seed"])
    assert 0.15 < np.corrcoef(users["age"], user_vecs[:, 0])[0, 1] < 0.5
    assert np.corrcoef(items["year"], -pop_rank)[0, 1] > 0.4
    counts = df[ITEM].value_counts().reindex(items[ITEM]).fillna(0).to_numpy()
    assert pd.Series(items["year"].to_numpy()).corr(pd.Series(counts), method="spearman") > 0.3
    # without popularity there is nothing for the year to follow
    _, flat = generate_side_tables(n_users=10, n_items=400, seed=5, popularity_skew=0.0)
    flat_rank = _initial_draws(10, 400, 16, 5)[3]
    assert abs(np.corrcoef(flat["year"], flat_rank)[0, 1]) < 0.15


# --- 4. write_synthetic -----------------------------------------------------------------------


def test_write_synthetic_stores_the_side_tables(tmp_path: Path) -> None:
    root = str(tmp_path / "syn")
    kw = dict(TINY)
    write_synthetic(root, **kw)
    users, items = generate_side_tables(n_users=120, n_items=60, seed=3)
    pd.testing.assert_frame_equal(read_side_table(root, "users"), users)
    pd.testing.assert_frame_equal(read_side_table(root, "items"), items)
    info = read_dataset_info(root)
    assert info["side_tables"] == {"users": list(users.columns), "items": list(items.columns)}
    stream = read_periods(root)
    assert _head_sha256(stream) == TINY_HEAD_SHA256

    write_synthetic(root, **kw, n_genres=3)  # side-table arguments pass through
    assert set(read_side_table(root, "items")["genres"].str.split("|").explode()) <= {
        "g00", "g01", "g02"}

    write_synthetic(root, **kw, side=False)  # replaces the store: stale side tables go too
    for name in ("users", "items"):
        with pytest.raises(DataError):
            read_side_table(root, name)
    assert "side_tables" not in read_dataset_info(root)
    pd.testing.assert_frame_equal(read_periods(root), stream)

    fresh = str(tmp_path / "plain")
    write_synthetic(fresh, **kw, side=False)
    assert not (tmp_path / "plain" / "side").exists()
    with pytest.raises(TypeError):
        write_synthetic(fresh, **kw, side=False, n_genres=3)
