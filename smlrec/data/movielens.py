"""MovieLens-100k, taken from the ``recbole==1.2.1`` wheel on the Python package index.

The wheel ships the dataset as RecBole atomic files (tab-separated, typed headers such as
``user_id:token``) under ``recbole/dataset_example/ml-100k/``. Fetching downloads the wheel
with pip (once; it is cached), checks each file against the sha256 recorded here, and stores
the positives (``rating >= 4``) by period plus the ``users`` and ``items`` side tables.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd

from smlrec.data import default_cache_dir
from smlrec.data.importer import normalize
from smlrec.data.store import (
    summarize,
    write_dataset_info,
    write_interactions,
    write_side_table,
)
from smlrec.errors import DataError, IntegrityError
from smlrec.schema import ITEM, USER

NAME = "ml-100k"
REQUIREMENT = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER_DIR = "recbole/dataset_example/ml-100k"
FILE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
PIP_TIMEOUT_S = 600


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure_wheel(cache_dir: Path) -> Path:
    """Return the cached recbole wheel, downloading it with pip if it is absent or altered."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if wheel.is_file() and _sha256(wheel.read_bytes()) == WHEEL_SHA256:
        return wheel
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("--disable-pip-version-check", "--quiet", "--dest", tmp, REQUIREMENT),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise DataError(REQUIREMENT, f"pip download timed out after {PIP_TIMEOUT_S} s") from exc
        downloaded = Path(tmp) / WHEEL_NAME
        if done.returncode != 0 or not downloaded.is_file():
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            raise DataError(
                REQUIREMENT, f"pip download failed (exit {done.returncode}): {lines[-1]}"
            )
        shutil.move(downloaded, wheel)
    return wheel


def read_wheel_files(wheel: Path) -> dict[str, bytes]:
    """Read the three ml-100k files from the wheel, checking each against its sha256."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            files = {name: archive.read(f"{MEMBER_DIR}/{name}") for name in FILE_SHA256}
    except (zipfile.BadZipFile, KeyError) as exc:
        raise IntegrityError(f"{wheel}: not the expected recbole wheel ({exc}); delete it") from exc
    for name, data in files.items():
        if _sha256(data) != FILE_SHA256[name]:
            raise IntegrityError(
                f"{wheel}!{MEMBER_DIR}/{name}: sha256 {_sha256(data)} does not match the "
                f"recorded {FILE_SHA256[name]}"
            )
    return files


def parse_atomic(data: bytes) -> pd.DataFrame:
    """Parse a RecBole atomic file: tab-separated text, headers typed as ``name:type``."""
    df = pd.read_csv(
        io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE
    )
    return df.rename(columns=lambda c: c.split(":", 1)[0])


def users_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Return the users side table: user_id, age, gender, occupation, zip_code."""
    users = raw[[USER, "age", "gender", "occupation", "zip_code"]].copy()
    users["age"] = pd.to_numeric(users["age"]).astype("int16")
    return users


def items_table(raw: pd.DataFrame) -> pd.DataFrame:
    """Return the items side table: item_id, title, year (nullable), genres (``|``-joined)."""
    return pd.DataFrame(
        {
            ITEM: raw[ITEM],
            "title": raw["movie_title"],
            "year": pd.to_numeric(raw["release_year"], errors="coerce").astype("Int16"),
            "genres": raw["class"].str.split().str.join("|"),
        }
    )


def fetch_movielens_100k(
    root: str,
    *,
    cache_dir: str | Path | None = None,
    period: str = "7D",
    min_rating: float = 4.0,
) -> dict[str, Any]:
    """Fetch MovieLens-100k into the store at ``root`` (replacing what is there).

    Stores the positives (``rating >= min_rating``) partitioned by ``period`` and the
    ``users`` and ``items`` side tables; returns the dataset summary (rows, users, items,
    periods). The wheel is cached in ``cache_dir`` (default: :func:`default_cache_dir`).
    """
    root = str(root)
    wheel = ensure_wheel(Path(cache_dir) if cache_dir else default_cache_dir())
    files = read_wheel_files(wheel)
    inter_source = f"{wheel}!{MEMBER_DIR}/ml-100k.inter"
    ratings = parse_atomic(files["ml-100k.inter"])
    positives = normalize(ratings, inter_source, min_rating=min_rating, period=period)
    write_interactions(positives, root, replace_all=True)
    write_side_table(users_table(parse_atomic(files["ml-100k.user"])), root, "users")
    write_side_table(items_table(parse_atomic(files["ml-100k.item"])), root, "items")
    sources = [{"path": f"{REQUIREMENT} ({WHEEL_NAME})", "sha256": WHEEL_SHA256}]
    sources += [{"path": f"{MEMBER_DIR}/{n}", "sha256": h} for n, h in FILE_SHA256.items()]
    info = write_dataset_info(root, NAME, period, sources=sources, extra={"min_rating": min_rating})
    return summarize(root, info)
