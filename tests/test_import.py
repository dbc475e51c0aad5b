"""Bring your own logs: small hand-made files in the shapes public logs come in, each
imported with one `smlrec data import` command, and the wrong invocations users make, each
stopped with a message that names the fix (and nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from smlrec.data.cli import app
from smlrec.data.store import read_periods
from smlrec.schema import ITEM, TS, USER

# Ten interactions over three weeks of 2003 (epoch seconds 1041379200 = 2003-01-01).
DAYS = [0, 0, 1, 3, 7, 8, 9, 15, 16, 20]
EPOCHS = [1041379200 + d * 86400 + 3600 * i for i, d in enumerate(DAYS)]
USERS = ["1", "2", "1", "3", "2", "4", "1", "5", "3", "2"]
ITEMS = ["10", "11", "12", "10", "13", "11", "14", "10", "15", "12"]
RATINGS = [5, 4, 4, 5, 4, 5, 4, 4, 5, 4]
STAMPS = pd.to_datetime(EPOCHS, unit="s", utc=True)


def _rows(fmt: str) -> str:
    return "".join(fmt.format(u=u, i=i, t=t, r=r, d=d)
                   for u, i, t, r, d in zip(USERS, ITEMS, EPOCHS, RATINGS, STAMPS, strict=True))


def ml100k_udata(path: Path) -> list[str]:
    """MovieLens-100k u.data: tab-separated, no header, epoch seconds."""
    path.write_text(_rows("{u}\t{i}\t{r}\t{t}\n"))
    return ["--format", "tsv", "--no-header", "--user-col", "0", "--item-col", "1",
            "--rating-col", "2", "--time-col", "3"]


def ml1m_ratings_dat(path: Path) -> list[str]:
    """MovieLens-1M ratings.dat: '::'-separated, no header."""
    path.write_text(_rows("{u}::{i}::{r}::{t}\n"))
    return ["--sep", "::", "--no-header", "--user-col", "0", "--item-col", "1",
            "--rating-col", "2", "--time-col", "3"]


def ml_latest_csv(path: Path) -> list[str]:
    """ml-latest ratings.csv: a header, half-star ratings, epoch seconds."""
    path.write_text("userId,movieId,rating,timestamp\n" + _rows("{u},{i},{r}.0,{t}\n"))
    return ["--user-col", "userId", "--item-col", "movieId"]


def tag_log_parts(path: Path) -> list[str]:
    """A tag log whose time is three columns (year, month, day) and with an extra column."""
    path.write_text("user,item,tag,year,month,day\n" + _rows(
        "{u},{i},nice,{d.year},{d.month},{d.day}\n"))
    return ["--user-col", "user", "--item-col", "item", "--time-col", "year,month,day"]


def reviews_dates(path: Path) -> list[str]:
    """A reviews log with day/month/year date strings."""
    path.write_text("reviewer;asin;overall;reviewTime\n" + _rows(
        "{u};{i};{r};{d:%d/%m/%Y}\n"))
    return ["--format", "csv", "--sep", ";", "--user-col", "reviewer", "--item-col", "asin",
            "--rating-col", "overall", "--time-col", "reviewTime", "--time-format", "%d/%m/%Y"]


def parquet_file(path: Path) -> list[str]:
    pd.DataFrame({"user_id": USERS, "item_id": ITEMS, "timestamp": STAMPS}).to_parquet(path)
    return []


def jsonl_file(path: Path) -> list[str]:
    path.write_text(_rows('{{"user": "{u}", "item": {i}, "ts_ms": {t}000}}\n'))
    return ["--user-col", "user", "--item-col", "item", "--time-col", "ts_ms",
            "--time-unit", "ms"]


FIXTURES = [("u.data", ml100k_udata), ("ratings.dat", ml1m_ratings_dat),
            ("ratings.csv", ml_latest_csv), ("tags.csv", tag_log_parts),
            ("reviews.txt", reviews_dates), ("events.parquet", parquet_file),
            ("events.jsonl", jsonl_file)]


def _import(tmp_path: Path, name: str, make, extra: list[str] = ()) -> tuple[object, Path]:
    src = tmp_path / name
    args = make(src)
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["import", str(src), "--out", str(out),
                                      "--period-spec", "7D", *args, *extra])
    return result, out


@pytest.mark.parametrize(("name", "make"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_each_common_shape_imports_with_one_command(tmp_path: Path, name, make) -> None:
    result, out = _import(tmp_path, name, make)
    assert result.exit_code == 0, result.output
    df = read_periods(out).sort_values([TS, USER], ignore_index=True)
    assert len(df) == 10 and list(df[USER]) == USERS and list(df[ITEM]) == ITEMS
    if name == "tags.csv":  # the day is all the time there is
        assert list(df[TS]) == list(STAMPS.normalize())
    elif name == "reviews.txt":
        assert list(df[TS].dt.date) == list(STAMPS.date)
    else:
        assert list(df[TS]) == list(STAMPS)
    report = json.loads((out / "import_report.json").read_text())
    assert report["rows_read"] == 10 and report["rows_kept"] == 10
    assert sum(report["rows_per_period"].values()) == 10 and report["periods"] == 4  # Mondays
    assert "Read 10 rows, kept 10" in result.output
    if name == "tags.csv":
        assert report["columns_ignored"] == ["tag"] and "Columns ignored: tag" in result.output


def test_the_report_says_why_rows_were_dropped(tmp_path: Path) -> None:
    src = tmp_path / "r.csv"
    src.write_text("user_id,item_id,timestamp,rating\n" + "".join(
        f"u{i % 4},i{i % 7},{1041379200 + 86400 * i},{5 if i % 5 else 2}\n" for i in range(40))
        + "u1,i1,1041379200,5\nu1,i1,1041379200,5\n")  # one exact duplicate of a new row
    result = CliRunner().invoke(app, ["import", str(src), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "s" / "import_report.json").read_text())
    assert report["dropped"] == {"rating below 4": 8, "exact duplicates": 1}
    assert "dropped: 8 rating below 4, 1 exact duplicates" in result.output


WRONG = [
    # (what the user got wrong, the fixture, the wrong arguments, what the message names)
    ("the wrong separator", "ratings.dat", ml1m_ratings_dat, ["--sep", ","],
     "only one column was read: set --sep"),
    ("a .dat file with no --sep", "ratings.dat",
     lambda p: [a for a in ml1m_ratings_dat(p) if a not in ("--sep", "::")], [],
     "--sep '::'"),
    ("years read as epoch seconds", "tags.csv", tag_log_parts,
     ["--time-col", "year"], "--time-col year,month,day"),
    ("milliseconds read as seconds", "events.jsonl",
     lambda p: jsonl_file(p)[:-2], [], "--time-unit"),
    ("seconds read as days", "ratings.csv", ml_latest_csv, ["--time-unit", "D"], "--time-unit"),
    ("the wrong date format", "reviews.txt", reviews_dates, ["--time-format", "%m/%d/%Y"],
     "--time-format"),
    ("a header row read as data", "ratings.csv", ml_latest_csv, ["--no-header"], "found: 0, 1"),
]


@pytest.mark.parametrize(("why", "name", "make", "extra", "fix"), WRONG,
                         ids=[w[0] for w in WRONG])
def test_a_wrong_invocation_stops_and_names_the_fix(tmp_path: Path, why, name, make, extra,
                                                    fix) -> None:
    result, out = _import(tmp_path, name, make, extra)
    assert result.exit_code != 0, (why, result.output)
    message = " ".join(result.output.split())
    assert "error:" in message and fix in message, (why, message)
    assert "Traceback" not in result.output
    assert not (out / "interactions").exists(), why  # nothing was written


def test_force_imports_what_looks_wrong_and_says_so(tmp_path: Path) -> None:
    result, out = _import(tmp_path, "tags.csv", tag_log_parts, ["--time-col", "year", "--force"])
    assert result.exit_code == 0, result.output
    assert "Warning (imported with --force)" in result.output
    assert json.loads((out / "import_report.json").read_text())["forced"] is True


def test_calendar_periods_start_on_the_first_day_and_gaps_are_reported(tmp_path: Path) -> None:
    from smlrec.data.periods import next_period_start, period_bounds, period_range, period_start

    ts = pd.Series(pd.to_datetime(["2024-01-31 23:59", "2024-02-01 00:00", "2024-02-29 12:00",
                                   "2024-05-15 00:00"], utc=True))
    assert [str(s.date()) for s in period_start(ts, "M")] == [
        "2024-01-01", "2024-02-01", "2024-02-01", "2024-05-01"]
    assert [str(s.date()) for s in period_start(ts, "Q")] == [
        "2024-01-01", "2024-01-01", "2024-01-01", "2024-04-01"]
    assert str(period_start(ts, "W").iloc[0].date()) == "2024-01-29"  # ISO week: a Monday
    assert period_bounds("2024-02-01", "M") == (pd.Timestamp("2024-02-01", tz="UTC"),
                                                pd.Timestamp("2024-03-01", tz="UTC"))
    assert next_period_start(pd.Timestamp("2024-12-01", tz="UTC"), "M") == pd.Timestamp(
        "2025-01-01", tz="UTC")
    with pytest.raises(ValueError, match="not the first day"):
        period_bounds("2024-02-02", "M")
    assert period_range("2024-01-01", "2024-05-01", "M") == [
        "2024-01-01", "2024-02-01", "2024-03-01", "2024-04-01", "2024-05-01"]
    src = tmp_path / "monthly.csv"
    src.write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{i},i{i},{t}\n" for i, t in enumerate(ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))))
    result = CliRunner().invoke(app, ["import", str(src), "--out", str(tmp_path / "m"),
                                      "--period-spec", "M"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m" / "import_report.json").read_text())
    assert report["rows_per_period"] == {"2024-01-01": 1, "2024-02-01": 2, "2024-05-01": 1}
    assert report["empty_periods"] == ["2024-03-01", "2024-04-01"]
    assert "Empty periods (no rows, kept as gaps): 2024-03-01, 2024-04-01" in result.output


def test_the_backtest_names_empty_periods():
    from smlrec import backtest as bt

    frame = pd.DataFrame({"period": ["2024-01-01", "2024-02-01", "2024-05-01"]})
    assert bt.empty_periods(frame, "M") == ["2024-03-01", "2024-04-01"]
    assert bt.empty_periods(frame.iloc[:2], "M") == []
