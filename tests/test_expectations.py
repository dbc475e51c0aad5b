"""The period data-quality suite (components.expectations) with real Great Expectations."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.expectations import (
    SUITE_VERSION,
    ValidationReport,
    validate_frame,
    validate_period_file,
)

PERIOD = "2024-01-01"  # a UTC day (period spec "1D")
START = 1_704_067_200  # 2024-01-01T00:00:00Z in unix seconds
DAY = 86_400
NOW = pd.Timestamp("2025-01-01", tz="UTC")


def good_frame(n: int = 12) -> pd.DataFrame:
    """A clean raw period: integer ids, epoch-second timestamps inside the day, ratings 1-5."""
    return pd.DataFrame(
        {
            "user_id": np.arange(n) % 5 + 1,
            "item_id": np.arange(n) + 100,
            "timestamp": START + np.arange(n) * 600,
            "rating": np.arange(n) % 5 + 1.0,
        }
    )


def write(tmp_path: Path, df: pd.DataFrame, suffix: str = ".csv") -> str:
    """Write ``df`` as CSV or Parquet into tmp_path; return the path."""
    path = tmp_path / f"period{suffix}"
    if suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return str(path)


def write_bytes(tmp_path: Path, data: bytes, name: str) -> str:
    """Write raw bytes into tmp_path; return the path."""
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def validate(path: str, **kwargs: Any) -> ValidationReport:
    """Validate the default period (``now`` fixed unless given)."""
    return validate_period_file(path, PERIOD, "1D", **{"now": NOW, **kwargs})


def test_good_period_passes(tmp_path: Path) -> None:
    report = validate(write(tmp_path, good_frame()))
    assert report.success, report.failures
    assert report.failures == []
    assert report.n_rows == 12 and report.period == PERIOD
    assert report.suite_version == SUITE_VERSION
    md = report.to_markdown()
    assert "PASSED" in md and "FAILED" not in md
    for expectation in ("row count between", "column exists", "no null ids", "no duplicate rows"):
        assert expectation in md
    results = report.results
    assert results["success"] is True
    checks = [r["expectation_config"]["meta"]["check"] for r in results["results"]]
    assert checks[0] == "row_count" and checks[-1] == "no_duplicates"
    assert {"valid_ids", "timestamps_in_period", "timestamps_not_future"} <= set(checks)
    assert {"ratings_numeric", "ratings_in_range"} <= set(checks)
    json.dumps(report.to_dict())  # plain JSON all the way down


def test_good_parquet_with_string_ids_passes(tmp_path: Path) -> None:
    df = good_frame().assign(user_id=lambda d: "u" + d["user_id"].astype(str))
    report = validate(write(tmp_path, df, ".parquet"))
    assert report.success, report.failures


def test_stored_canonical_frame_passes() -> None:
    """The importer's canonical frame (tz-aware timestamps, str ids, period column) passes."""
    df = good_frame().assign(
        user_id=lambda d: d["user_id"].astype(str),
        item_id=lambda d: d["item_id"].astype(str),
        timestamp=lambda d: pd.to_datetime(d["timestamp"], unit="s", utc=True),
        period=PERIOD,
    )
    report = validate_frame(df, PERIOD, now=NOW)
    assert report.success, report.failures


def _drop(col: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda df: df.drop(columns=[col])


def _set(col: str, row: int, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def mutate(df: pd.DataFrame) -> pd.DataFrame:
        df = df.astype({col: object})
        df.loc[row, col] = value
        return df

    return mutate


# name, mutation of the good frame, file suffix, options, substrings of one failure
BAD_FRAMES = [
    ("missing column", _drop("item_id"), ".csv", {}, ["item_id: missing column"]),
    (
        "renamed column",
        lambda df: df.rename(columns={"user_id": "uid"}),
        ".csv",
        {},
        ["user_id: missing column", "found: uid, item_id"],
    ),
    (
        "custom rating column missing",
        lambda df: df,
        ".csv",
        {"rating_col": "stars"},
        ["stars: missing column"],
    ),
    (
        "float ids",
        lambda df: df.assign(item_id=df["item_id"] + 0.5),
        ".csv",
        {},
        ["item_id: 12 invalid ids", "row 1 = '100.5'"],
    ),
    (
        "float ids in parquet",
        lambda df: df.assign(item_id=df["item_id"] + 0.5),
        ".parquet",
        {},
        ["item_id: 12 invalid ids", "row 1 = 100.5"],
    ),
    ("null ids", _set("user_id", 2, None), ".csv", {}, ["user_id: 1 null value (examples: row 3)"]),
    ("negative ids", _set("user_id", 4, -1), ".csv", {}, ["user_id: 1 invalid id", "row 5 = '-1'"]),
    (
        "negative ids in parquet",
        lambda df: df.assign(item_id=-df["item_id"]),
        ".parquet",
        {},
        ["item_id: 12 invalid ids", "row 1 = -100, row 2 = -101, row 3 = -102)"],
    ),
    ("blank ids", _set("item_id", 1, "   "), ".csv", {}, ["item_id: 1 invalid id", "row 2"]),
    ("control chars", _set("item_id", 0, "a\x07b"), ".csv", {}, ["item_id: 1 invalid id"]),
    (
        "timestamps outside the period",
        _set("timestamp", 3, START + DAY),
        ".csv",
        {},
        ["timestamp: 1 timestamp outside period 2024-01-01", "row 4", "2024-01-02T00:00:00Z"],
    ),
    (
        "timestamps before the period",
        _set("timestamp", 0, START - 1),
        ".csv",
        {},
        ["timestamp: 1 timestamp outside period", "row 1"],
    ),
    (
        "timestamps in the future",
        lambda df: df,
        ".csv",
        {"now": pd.Timestamp("2024-01-01T00:30:00Z")},
        ["timestamp: 8 timestamps in the future (after 2024-01-01T00:30:00Z)", "row 5"],
    ),
    ("null timestamps", _set("timestamp", 6, None), ".csv", {}, ["timestamp: 1 null value"]),
    (
        "unparseable timestamps",
        _set("timestamp", 1, "yesterday"),
        ".csv",
        {},
        ["timestamp: 1 unparseable timestamp", "row 2 = 'yesterday'"],
    ),
    (
        "unparseable date-time text",
        lambda df: df.assign(timestamp="2024-01-01 10:00").pipe(_set("timestamp", 2, "noon")),
        ".csv",
        {},
        ["timestamp: 1 unparseable timestamp", "row 3 = 'noon'"],
    ),
    (
        "duplicated rows",
        lambda df: pd.concat([df, df.iloc[[3, 7]]], ignore_index=True),
        ".csv",
        {},
        ["user_id, item_id, timestamp, rating: 4 duplicate rows", "row 4, 8, 13"],
    ),
    (
        "ratings out of range",
        _set("rating", 5, 7.5),
        ".csv",
        {},
        ["rating: 1 rating outside [0, 5]", "row 6 = '7.5'"],
    ),
    (
        "negative ratings",
        lambda df: df.assign(rating=-1.0),
        ".parquet",
        {},
        ["rating: 12 ratings outside [0, 5]"],
    ),
    (
        "non-numeric ratings",
        _set("rating", 0, "five"),
        ".csv",
        {},
        ["rating: 1 non-numeric rating", "row 1 = 'five'"],
    ),
    ("no rows", lambda df: df.iloc[:0], ".csv", {}, ["table: 0 rows, expected between 1 and"]),
    (
        "too many rows",
        lambda df: df,
        ".csv",
        {"max_rows": 10},
        ["table: 12 rows, expected between 1 and 10"],
    ),
    (
        "too few rows",
        lambda df: df,
        ".parquet",
        {"min_rows": 100},
        ["table: 12 rows, expected between 100 and"],
    ),
]


@pytest.mark.parametrize(
    ("mutate", "suffix", "options", "expected"),
    [case[1:] for case in BAD_FRAMES],
    ids=[case[0] for case in BAD_FRAMES],
)
def test_bad_period_fails(
    tmp_path: Path,
    mutate: Callable[[pd.DataFrame], pd.DataFrame],
    suffix: str,
    options: dict[str, Any],
    expected: list[str],
) -> None:
    report = validate(write(tmp_path, mutate(good_frame()), suffix), **options)
    assert not report.success
    assert report.results and report.results["success"] is False
    matching = [f for f in report.failures if all(e in f for e in expected)]
    assert matching, f"no failure mentions {expected}: {report.failures}"
    assert "FAILED" in report.to_markdown()


GOOD_CSV = b"user_id,item_id,timestamp\n1,2,1704067200\n"
BAD_FILES = [
    ("empty file", b"", "period.csv", ["empty file"]),
    ("non-UTF-8 bytes", GOOD_CSV + b"3,\xff\xfe,1704067300\n", "period.csv", ["non-UTF-8"]),
    ("truncated parquet", None, "period.parquet", ["not valid Parquet"]),
    ("not a table", b"\x00\x01 binary junk", "period.parquet", ["not valid Parquet"]),
    ("ragged csv", GOOD_CSV + b"1,2,3,4,5\n", "period.csv", ["not valid CSV"]),
    ("unknown format", b"{}", "period.json", ["unknown file type"]),
]


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_unreadable_file_fails_without_raising(
    tmp_path: Path, data: bytes | None, name: str, expected: list[str]
) -> None:
    if data is None:  # a Parquet file cut in half
        whole = tmp_path / "whole.parquet"
        good_frame(1000).to_parquet(whole)
        data = whole.read_bytes()[: whole.stat().st_size // 2]
    report = validate(write_bytes(tmp_path, data, name))
    assert not report.success
    assert report.results == {} and report.n_rows == 0
    assert len(report.failures) == 1
    assert report.failures[0].startswith("file: could not be read")
    assert all(e in report.failures[0] for e in expected), report.failures
    md = report.to_markdown()
    assert "FAILED" in md and "could not be read" in md


def test_missing_file_fails(tmp_path: Path) -> None:
    report = validate(str(tmp_path / "absent.csv"))
    assert not report.success and "file not found" in report.failures[0]


def test_failure_lists_at_most_three_examples(tmp_path: Path) -> None:
    df = good_frame().assign(user_id=lambda d: d["user_id"].astype(object))
    df.loc[[1, 4, 5, 9], "user_id"] = None
    report = validate(write(tmp_path, df))
    assert "user_id: 4 null values (examples: row 2, 5, 6)" in report.failures


def test_extra_columns_are_allowed_and_noted(tmp_path: Path) -> None:
    df = good_frame().assign(session="s1", device="phone")
    report = validate(write(tmp_path, df))
    assert report.success, report.failures
    assert any("session, device" in note for note in report.notes)
    assert "session, device" in report.to_markdown()


def test_rating_column_is_optional(tmp_path: Path) -> None:
    report = validate(write(tmp_path, good_frame().drop(columns=["rating"])))
    assert report.success, report.failures
    assert any("rating" in note for note in report.notes)
    report = validate(write(tmp_path, good_frame().assign(rating=99)), rating_col=None)
    assert report.success, report.failures


def test_mixed_time_zones_inside_the_period_pass(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "user_id": ["a", "b", "c", "d"],
            "item_id": ["x", "y", "z", "x"],
            "timestamp": [
                "2024-01-01T10:00:00+02:00",  # 08:00Z
                "2024-01-01T05:00:00-05:00",  # 10:00Z
                "2024-01-01 12:00:00Z",
                "2024-01-01 23:59:59",  # naive = UTC
            ],
        }
    )
    report = validate(write(tmp_path, df))
    assert report.success, report.failures
    # the same wall-clock time with another offset falls in the previous UTC day
    df.loc[0, "timestamp"] = "2024-01-01T01:00:00+02:00"
    report = validate(write(tmp_path, df))
    assert not report.success
    assert any("row 1" in f and "2023-12-31T23:00:00Z" in f for f in report.failures)


def test_custom_columns_and_time_unit(tmp_path: Path) -> None:
    df = good_frame().rename(columns={"user_id": "uid", "item_id": "iid", "rating": "stars"})
    df["ts_ms"] = df.pop("timestamp") * 1000
    options = {"user_col": "uid", "item_col": "iid", "time_col": "ts_ms", "rating_col": "stars"}
    report = validate(write(tmp_path, df), time_unit="ms", **options)
    assert report.success, report.failures
    report = validate(write(tmp_path, df), **options)  # milliseconds read as seconds
    assert not report.success
    hint = "ts_ms: 12 unparseable timestamps; numbers are read as unix epochs in s"
    assert any(f.startswith(hint) for f in report.failures), report.failures


def test_weekly_period(tmp_path: Path) -> None:
    df = good_frame().assign(timestamp=START + np.arange(12) * DAY // 2)  # Monday to Saturday
    assert validate_period_file(write(tmp_path, df), "2024-01-01", "7D", now=NOW).success
    report = validate_period_file(write(tmp_path, df), "2024-01-01", "1D", now=NOW)
    assert not report.success


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    df = good_frame().pipe(_set("item_id", 0, "<b>x\x01"))  # invalid: a control character
    report = validate(write(tmp_path, df), max_rows=10)
    page = report.to_html()
    assert "http" not in page.lower()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "FAILED" in page
    assert "<b>x" not in page and "&lt;b&gt;x" in page
    assert "table: 12 rows, expected between 1 and 10" in page
    assert "http" not in validate(write(tmp_path, good_frame())).to_html().lower()


def test_markdown_lists_every_expectation(tmp_path: Path) -> None:
    report = validate(write(tmp_path, good_frame().pipe(_set("user_id", 0, None))))
    md = report.to_markdown()
    table_rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table_rows) == len(report.results["results"]) + 1  # + the header
    assert "| no null ids | user_id | NO | 1 unexpected of 12 |" in md


def test_programming_errors_raise(tmp_path: Path) -> None:
    path = write(tmp_path, good_frame())
    with pytest.raises(ValueError, match="invalid period id"):
        validate_period_file(path, "2024-1-1")
    with pytest.raises(ValueError, match="not the first day"):
        validate_period_file(path, "2024-01-02", "7D")
    with pytest.raises(ValueError, match="time unit"):
        validate_period_file(path, PERIOD, time_unit="hours")
    with pytest.raises(ValueError, match="row bounds"):
        validate_period_file(path, PERIOD, min_rows=10, max_rows=5)
    with pytest.raises(ValueError, match="rating_range"):
        validate_frame(good_frame(), PERIOD, rating_range=(5, 1))


def test_large_period_is_fast(tmp_path: Path) -> None:
    n = 200_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "user_id": rng.integers(0, 20_000, n),
            "item_id": rng.integers(0, 5_000, n),
            "timestamp": START + np.arange(n) * DAY // n,
        }
    )
    path = write(tmp_path, df)
    validate(write(tmp_path, good_frame(), ".parquet"))  # GE imported and warm
    began = time.perf_counter()
    report = validate(path)
    elapsed = time.perf_counter() - began
    assert report.success, report.failures
    assert elapsed < 10, f"{n} rows took {elapsed:.1f} s"
