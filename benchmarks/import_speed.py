"""Import benchmark: a synthetic interaction CSV of 10^7 rows through `smlrec data import`'s
code path (read, normalise, report, write by period), timed, with the peak memory.

    python -m benchmarks.import_speed                 # 10^7 rows
    python -m benchmarks.import_speed --rows 1000000  # a quicker look

Writes benchmarks/results/import_speed.json and .md (merged by row count).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.backtest import RESULTS, hardware, produced_by, provenance_line


def write_csv(path: Path, rows: int, seed: int = 0) -> float:
    """user_id,item_id,timestamp,rating: 10^5 users, 2*10^4 items, a year of epoch seconds,
    ratings 3-5 (two thirds positives); written in chunks with numpy. Returns the size in MB."""
    rng = np.random.default_rng(seed)
    start = 1_672_531_200  # 2023-01-01
    with path.open("w") as fh:
        fh.write("user_id,item_id,timestamp,rating\n")
        for lo in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - lo)
            block = np.column_stack([rng.integers(0, 100_000, n), rng.integers(0, 20_000, n),
                                     start + rng.integers(0, 365 * 86400, n),
                                     rng.integers(3, 6, n)])
            np.savetxt(fh, block, fmt="%d", delimiter=",")
    return path.stat().st_size / 1e6


def measure(csv: Path, out: Path) -> dict:
    """The import in a fresh process (so the peak memory is the import's own)."""
    code = (
        "import json, resource, sys, time\n"
        "from smlrec.data.importer import import_file\n"
        "t = time.perf_counter()\n"
        "s = import_file(sys.argv[1], sys.argv[2], period='7D')\n"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'rows_read': s['rows_read'],"
        " 'rows_imported': s['rows_imported'], 'periods': s['n_periods'],"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    done = subprocess.run([sys.executable, "-c", code, str(csv), str(out)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the import failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smlrec-import-") as tmp:
        csv = Path(tmp) / "log.csv"
        t = time.perf_counter()
        size = write_csv(csv, args.rows)
        print(f"wrote {args.rows:,} rows ({size:.0f} MB) in {time.perf_counter() - t:.0f} s")
        result = measure(csv, Path(tmp) / "store")
    result.update({"rows": args.rows, "csv_mb": size, "produced_by": produced_by()})
    print(f"imported {result['rows_imported']:,} of {result['rows_read']:,} rows into "
          f"{result['periods']} weekly periods in {result['seconds']:.1f} s, peak memory "
          f"{result['peak_rss_mb']:.0f} MB")
    path = RESULTS / "import_speed.json"
    old = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    import torch

    out = {"hardware": hardware(torch.device("cpu")),
           "cases": {**old.get("cases", {}), str(args.rows): result}}
    path.write_text(json.dumps(out, indent=2) + "\n")
    hw = out["hardware"]
    lines = ["# Importing an interaction CSV", "",
             f"Hardware: {hw['cpu']}, {hw['cpu_count']} cores. A synthetic CSV (user_id, "
             "item_id, timestamp as epoch seconds, rating 3-5) through the importer's code "
             "path: read, normalise, drop ratings below 4 and duplicates, report, write by "
             "weekly period. Peak memory: the importing process's maximum resident set. "
             "Reproduce: `python -m benchmarks.import_speed [--rows N]`.", "",
             "| rows | CSV (MB) | rows kept | periods | seconds | peak memory (MB) | produced by |",
             "|---|---|---|---|---|---|---|"]
    for rows, r in sorted(out["cases"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(rows):,} | {r['csv_mb']:.0f} | {r['rows_imported']:,} | "
                     f"{r['periods']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{provenance_line(r.get('produced_by'))} |")
    (RESULTS / "import_speed.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and import_speed.md")


if __name__ == "__main__":
    main()
