"""The console of the pipeline commands: the runner's noise goes to a log file."""

from __future__ import annotations

import os
import subprocess
import sys

from pipelines.local import Console


def test_console_sends_everything_but_the_table_to_the_log(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    with Console(log) as console:
        print("kfp executor chatter")
        print("a library warning", file=sys.stderr)
        os.write(2, b"native stderr\n")
        subprocess.run([sys.executable, "-c", "import sys; print('task out'); "
                        "print('task err', file=sys.stderr)"], check=True)
        console.echo("1998-02-16  promote ...")
    shown = capfd.readouterr()
    assert "1998-02-16  promote" in shown.out
    for noise in ("kfp executor chatter", "task out", "task err", "a library warning",
                  "native stderr"):
        assert noise not in shown.out + shown.err
        assert noise in log.read_text()
    print("after")  # the terminal is back
    assert "after" in capfd.readouterr().out


def test_verbose_console_redirects_nothing(tmp_path, capfd):
    with Console(tmp_path / "run.log", verbose=True) as console:
        print("runner output")
        console.echo("row")
    shown = capfd.readouterr().out
    assert "runner output" in shown and "row" in shown
    assert not (tmp_path / "run.log").exists()
