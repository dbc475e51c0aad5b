"""The serving image's Python requirements, taken from pyproject.toml (where pins live).

``python -m serving.requirements [OUT]`` writes the core dependencies plus the serving part of
the ``stack`` extra (BentoML, Feast for the online store, protobuf) as a requirements file;
``make bento`` passes it to ``bentoml build`` (see ``serving/bentofile.yaml``).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING_EXTRAS = ("bentoml", "feast", "protobuf")
"""Packages of the ``stack`` extra the service needs (KFP and Great Expectations it does not)."""


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def serving_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The pinned requirements of the serving image, in pyproject order."""
    project = tomllib.loads(pyproject.read_text())["project"]
    stack = project["optional-dependencies"]["stack"]
    picked = [r for r in stack if _name(r) in SERVING_EXTRAS]
    missing = set(SERVING_EXTRAS) - {_name(r) for r in picked}
    if missing:
        raise SystemExit(f"{pyproject}: the stack extra lacks {', '.join(sorted(missing))}")
    return [*project["dependencies"], *picked]


def main(argv: list[str]) -> None:
    text = "".join(f"{r}\n" for r in serving_requirements())
    if len(argv) > 1:
        out = Path(argv[1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main(sys.argv)
