"""The ``smlrec`` command: the core's commands (``smlrec.cli``: data, backtest) and the
pipeline group (``pipelines.cli``), assembled here, where both are visible, so that the core
never imports the orchestrator. ``python -m pipelines.entry`` is the same command."""

from __future__ import annotations

from pipelines.cli import app as pipeline_app
from smlrec.cli import app

app.add_typer(pipeline_app, name="pipeline")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
