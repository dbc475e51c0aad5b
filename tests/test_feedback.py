"""The feedback log: durable appends, periods, torn tails, and the importer reading it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from smlrec.data.importer import import_file, read_table
from smlrec.data.store import list_periods, read_period
from smlrec.errors import DataError, StorageError
from smlrec.feedback import Event, FeedbackLog, count_events, periods_in, read_log

T0 = pd.Timestamp("2024-01-01T10:00:00Z").timestamp()  # a Monday: a 7D period starts there
DAY = 86_400.0


def _events() -> list[Event]:
    return [Event("u1", "i1", T0), Event("u1", "i2", T0 + 60, 5.0),
            Event("u2", "i1", T0 + 120, 2.0),  # a low rating: logged, not a positive
            Event("u2", "i3", T0 + 7 * DAY)]   # the next week


def test_appends_are_durable_lines_in_period_folders(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, "7D")
    assert log.append(_events()).result(timeout=10) == 4
    log.close()
    assert periods_in(tmp_path) == ["2024-01-01", "2024-01-08"]
    files = list((tmp_path / "period=2024-01-01").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events-")
    lines = [json.loads(v) for v in files[0].read_text().splitlines()]
    assert [(r["user_id"], r["item_id"], r.get("rating")) for r in lines] == [
        ("u1", "i1", None), ("u1", "i2", 5.0), ("u2", "i1", 2.0)]
    assert lines[0]["timestamp"] == "2024-01-01T10:00:00.000000Z"
    assert len({r["event_id"] for r in lines}) == 3 and "received_at" in lines[0]
    assert count_events(tmp_path) == 4


def test_concurrent_appends_are_group_committed_and_all_kept(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, "1D")
    futures = [log.append([Event(f"u{i}", f"i{j}", T0 + i) for j in range(3)])
               for i in range(200)]
    assert sum(f.result(timeout=10) for f in futures) == 600
    log.close()
    assert count_events(tmp_path) == 600
    assert log.commits < 200  # queued appends shared fsyncs
    frame = read_log(tmp_path)
    assert len(frame) == 600 and frame["timestamp"].is_monotonic_increasing


def test_a_torn_last_line_is_dropped_and_reported(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, "1D")
    log.append(_events()[:2]).result(timeout=10)
    log.close()
    path = next((tmp_path / "period=2024-01-01").iterdir())
    with open(path, "ab") as fh:  # a crash in the middle of a write
        fh.write(b'{"user_id":"u9","item_')
    notes: list[str] = []
    frame = read_log(tmp_path, notes)
    assert list(frame["item_id"]) == ["i1", "i2"]
    assert notes and "torn last line" in notes[0]


def test_a_damaged_line_inside_the_log_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "period=2024-01-01"
    folder.mkdir()
    (folder / "events-x.jsonl").write_text('{"user_id":"u1","item_id":"i1"}\nnot json\n'
                                           '{"user_id":"u1","item_id":"i2"}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        read_log(tmp_path)


def test_a_failed_write_is_not_acknowledged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SMLREC_FAILPOINTS", "feedback.write=enospc")
    log = FeedbackLog(tmp_path, "1D")
    with pytest.raises(StorageError, match="not acknowledged"):
        log.append(_events()[:1]).result(timeout=10)
    log.close()
    with pytest.raises(StorageError, match="closed"):
        log.append(_events()[:1]).result(timeout=10)


def test_an_object_store_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="local folder"):
        FeedbackLog("s3://bucket/feedback", "1D")


def test_the_importer_reads_a_period_folder_unrated_events_are_positives(tmp_path: Path
                                                                        ) -> None:
    log = FeedbackLog(tmp_path / "log", "7D")
    log.append(_events()).result(timeout=10)
    log.close()
    raw = read_table(str(tmp_path / "log" / "period=2024-01-01"))
    assert len(raw) == 3
    summary = import_file(str(tmp_path / "log" / "period=2024-01-01"), str(tmp_path / "store"),
                          period="7D")
    assert summary["rows_imported"] == 2  # the rating of 2 is below the positive threshold
    assert list_periods(str(tmp_path / "store")) == ["2024-01-01"]
    stored = read_period(str(tmp_path / "store"), "2024-01-01")
    assert sorted(zip(stored["user_id"], stored["item_id"], strict=True)) == [
        ("u1", "i1"), ("u1", "i2")]


def test_each_process_writes_its_own_file(tmp_path: Path) -> None:
    a, b = FeedbackLog(tmp_path, "1D"), FeedbackLog(tmp_path, "1D")
    a.append(_events()[:1]).result(timeout=10)
    b.append(_events()[1:2]).result(timeout=10)
    a.close()
    b.close()
    assert len(os.listdir(tmp_path / "period=2024-01-01")) == 2
    assert len(read_log(tmp_path / "period=2024-01-01")) == 2


def test_a_retried_event_is_counted_once(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, "1D")
    event = Event("u1", "i1", T0, 5.0)
    log.append([event]).result(timeout=10)
    log.append([event, Event("u1", "i1", T0 + 1, 5.0)]).result(timeout=10)  # a retry, then new
    log.close()
    notes: list[str] = []
    assert len(read_log(tmp_path, notes)) == 2
    assert "1 repeated events" in notes[0]
